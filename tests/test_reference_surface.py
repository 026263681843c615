"""Every public name of the reference ``segment_anything`` exists at the same path in napari_sam.

Code written for the reference must run on napari_sam after only the import changes (project
issue 30). This test walks the installed reference (pip ``segment-anything==1.0``, the test
oracle of the ``testing`` extra) with importlib and ``inspect``: for each module below, every
public name it defines or re-exports from the reference package (not the third-party names it
imports: ``torch``, ``np``, ``Tuple``, ``batched_nms`` ...) must exist in the napari_sam module
of the same path, and

* functions, classes' ``__init__``, dunder and public methods must accept the reference's calls:
  the reference's parameters, by name, in order, of the same kind and with equal defaults
  (a list default equals a tuple with the same items); ours may add parameters with
  defaults (or ``*args``/``**kwargs``) after them;
* properties stay properties, class constants keep their values;
* a name the reference re-exports from another of its modules is, in napari_sam too, the
  same object as at its home path (one ``MaskData``, one ``Sam``).

The few deliberate differences are listed in :data:`DELIBERATE_DIFFERENCES`, each with its
reason; an entry that no longer differs fails too, so the list stays true. A name that
disappears from napari_sam fails its own test case.

The second part checks that the reference helpers added for the surface compute what the
reference computes (the encoder's window and relative-position helpers; the amg helpers are
tested in tests/test_amg.py).
"""

from __future__ import annotations

import importlib
import inspect
import types
from typing import Any, Iterator

import pytest
import torch

import segment_anything  # noqa: F401  (hard requirement: without the oracle this test must fail, not skip)

REFERENCE_MODULES = (
    "segment_anything",
    "segment_anything.build_sam",
    "segment_anything.predictor",
    "segment_anything.automatic_mask_generator",
    "segment_anything.modeling",
    "segment_anything.modeling.sam",
    "segment_anything.modeling.image_encoder",
    "segment_anything.modeling.prompt_encoder",
    "segment_anything.modeling.mask_decoder",
    "segment_anything.modeling.transformer",
    "segment_anything.modeling.common",
    "segment_anything.utils",
    "segment_anything.utils.amg",
    "segment_anything.utils.transforms",
    "segment_anything.utils.onnx",
)

#: "reference path" -> why napari_sam differs there on purpose. Paths are
#: ``module:name`` or ``module:Class.method``.
DELIBERATE_DIFFERENCES: dict[str, str] = {
    "segment_anything:build_sam": (
        "napari_sam.build_sam is napari-sam's loader build_sam(model_type=None, checkpoint=None, "
        "device=None, ...), not build_sam_vit_h(checkpoint=None): build_sam(path) and "
        "build_sam(checkpoint=path) work as in the reference, while build_sam() loads known "
        "weights (downloading them) instead of building an untrained ViT-H. After "
        "`import napari_sam.build_sam` the name is the callable module of that path."
    ),
    "segment_anything.build_sam:build_sam": "the same function as napari_sam.build_sam (see above)",
}


def _same_default(ours: Any, ref: Any) -> bool:
    if isinstance(ours, (list, tuple)) and isinstance(ref, (list, tuple)):
        return tuple(ours) == tuple(ref)
    if ours is ref:
        return True
    try:
        return bool(ours == ref)
    except Exception:  # noqa: BLE001  (tensors and the like: identity only)
        return False


def signature_problems(ours: Any, ref: Any) -> list[str]:
    """Why a call written for ``ref`` could fail on ``ours`` (empty when compatible)."""
    try:
        ref_sig = inspect.signature(ref)
    except (TypeError, ValueError):
        return []  # a builtin without a signature: nothing to compare
    try:
        our_sig = inspect.signature(ours)
    except (TypeError, ValueError):
        return [f"no signature for {ours!r}"]
    ref_params = list(ref_sig.parameters.values())
    our_params = list(our_sig.parameters.values())
    problems = []
    for index, ref_param in enumerate(ref_params):
        if index >= len(our_params):
            problems.append(f"missing parameter {ref_param.name!r}")
            continue
        our_param = our_params[index]
        if our_param.name != ref_param.name:
            problems.append(f"parameter {index} is {our_param.name!r}, the reference's is {ref_param.name!r}")
        if our_param.kind != ref_param.kind:
            problems.append(f"{ref_param.name!r} is {our_param.kind.description}, not {ref_param.kind.description}")
        if ref_param.default is inspect.Parameter.empty:
            if our_param.default is not inspect.Parameter.empty:
                continue  # an optional parameter accepts every call of a required one
        elif not _same_default(our_param.default, ref_param.default):
            problems.append(f"{ref_param.name!r} defaults to {our_param.default!r}, not {ref_param.default!r}")
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    for extra in our_params[len(ref_params) :]:
        if extra.kind not in variadic and extra.default is inspect.Parameter.empty:
            problems.append(f"extra parameter {extra.name!r} has no default")
    return problems


def _is_reference_object(value: Any) -> bool:
    """Defined in the reference package (not torch, numpy, typing, functools ...)."""
    if isinstance(value, types.ModuleType):
        return value.__name__.startswith("segment_anything")
    module = getattr(value, "__module__", None)
    if module is None:  # data without a home module, e.g. the sam_model_registry dict
        return not isinstance(value, type)
    return module.startswith("segment_anything")


def _our_path(ref_module: str) -> str:
    return "napari_sam" + ref_module[len("segment_anything") :]


def _home(value: Any, name: str) -> tuple[str, str] | None:
    """(module, name) where the reference defines ``value``, when that module holds it as ``name``."""
    module_name = getattr(value, "__module__", None)
    if module_name is None or not module_name.startswith("segment_anything"):
        return None
    home = importlib.import_module(module_name)
    for candidate in (name, getattr(value, "__name__", name)):
        if getattr(home, candidate, None) is value:
            return module_name, candidate
    return None


def reference_names() -> Iterator[tuple[str, str]]:
    """(reference module, public name) for every name this test checks."""
    for module_name in REFERENCE_MODULES:
        module = importlib.import_module(module_name)
        for name, value in sorted(vars(module).items()):
            if not name.startswith("_") and _is_reference_object(value):
                yield module_name, name


def reference_members() -> Iterator[tuple[str, str, str]]:
    """(module, class, member) for the public members and dunder methods (``__init__``,
    ``__getitem__`` ...) that the reference's classes define."""
    seen = set()
    for module_name, name in reference_names():
        value = getattr(importlib.import_module(module_name), name)
        if not isinstance(value, type) or value.__module__ != module_name or value in seen:
            continue
        seen.add(value)
        for member, raw in sorted(vars(value).items()):
            dunder_method = member.startswith("__") and member.endswith("__") and inspect.isfunction(raw)
            if dunder_method or not member.startswith("_"):
                yield module_name, name, member


NAMES = list(reference_names())
MEMBERS = list(reference_members())


def test_the_walk_finds_the_reference_surface():
    """A guard on the walk itself: an import or filter mistake must not empty the lists."""
    found = {f"{m}:{n}" for m, n in NAMES}
    for expected in (
        "segment_anything.utils.amg:MaskData",
        "segment_anything.utils.amg:mask_to_rle_pytorch",
        "segment_anything.modeling.image_encoder:window_partition",
        "segment_anything.utils.onnx:SamOnnxModel",
        "segment_anything.build_sam:sam_model_registry",
        "segment_anything:SamPredictor",
    ):
        assert expected in found
    assert len(NAMES) > 80 and len(MEMBERS) > 60
    assert not {key.split(":")[0] for key in DELIBERATE_DIFFERENCES} - set(REFERENCE_MODULES)


@pytest.mark.parametrize("module_name, name", NAMES, ids=[f"{m}:{n}" for m, n in NAMES])
def test_name_exists_with_compatible_signature(module_name, name):
    ref = getattr(importlib.import_module(module_name), name)
    ours_module = importlib.import_module(_our_path(module_name))
    assert hasattr(ours_module, name), f"{_our_path(module_name)} has no {name!r} (the reference's {module_name}.{name})"
    ours = getattr(ours_module, name)
    key = f"{module_name}:{name}"

    if isinstance(ref, types.ModuleType):
        importlib.import_module(_our_path(ref.__name__))  # the submodule exists
        return
    if not callable(ref):
        # Data (the registry): a mapping with the reference's keys.
        assert set(ref) <= set(ours), f"{key}: missing keys {set(ref) - set(ours)}"
        return
    assert callable(ours), f"{key} is not callable in napari_sam"
    problems = signature_problems(ours, ref)
    if key in DELIBERATE_DIFFERENCES:
        assert problems, f"{key} is listed as a deliberate difference but no longer differs: remove the entry"
        return
    assert not problems, f"{key}: " + "; ".join(problems)
    assert isinstance(ours, type) == isinstance(ref, type), f"{key}: a class in one package, not in the other"

    home = _home(ref, name)
    if home is not None and home[0] != module_name:
        our_home = getattr(importlib.import_module(_our_path(home[0])), home[1])
        assert ours is our_home, f"{key} is not the same object as {_our_path(home[0])}.{home[1]}"


@pytest.mark.parametrize("module_name, cls, member", MEMBERS, ids=[f"{m}:{c}.{n}" for m, c, n in MEMBERS])
def test_class_member_exists_with_compatible_signature(module_name, cls, member):
    ref_cls = getattr(importlib.import_module(module_name), cls)
    our_cls = getattr(importlib.import_module(_our_path(module_name)), cls)
    key = f"{module_name}:{cls}.{member}"
    raw = vars(ref_cls)[member]
    assert hasattr(our_cls, member), f"napari_sam's {cls} has no {member!r}"
    if isinstance(raw, property):
        assert isinstance(inspect.getattr_static(our_cls, member), property), f"{key} is not a property"
        return
    if not callable(raw) and not isinstance(raw, (staticmethod, classmethod)):
        assert getattr(our_cls, member) == raw, f"{key} = {getattr(our_cls, member)!r}, the reference's is {raw!r}"
        return
    static = isinstance(raw, staticmethod)
    assert isinstance(inspect.getattr_static(our_cls, member), staticmethod) == static, f"{key}: staticmethod or not"
    problems = signature_problems(getattr(our_cls, member), getattr(ref_cls, member))
    if key in DELIBERATE_DIFFERENCES:
        assert problems, f"{key} is listed as a deliberate difference but no longer differs: remove the entry"
        return
    assert not problems, f"{key}: " + "; ".join(problems)


# -- the encoder helpers compute what the reference's compute ---------------------------------


@pytest.mark.parametrize("shape, window", [((2, 14, 14, 8), 7), ((1, 10, 13, 4), 4), ((3, 5, 5, 2), 14)])
def test_window_partition_round_trip_equals_reference(shape, window):
    from segment_anything.modeling import image_encoder as ref

    from napari_sam.modeling import image_encoder as ours

    x = torch.randn(shape)
    windows, padded = ours.window_partition(x, window)
    ref_windows, ref_padded = ref.window_partition(x, window)
    assert padded == ref_padded
    torch.testing.assert_close(windows, ref_windows, rtol=0, atol=0)
    back = ours.window_unpartition(windows, window, padded, shape[1:3])
    torch.testing.assert_close(back, ref.window_unpartition(ref_windows, window, ref_padded, shape[1:3]), rtol=0, atol=0)
    torch.testing.assert_close(back, x, rtol=0, atol=0)


@pytest.mark.parametrize("q_size, k_size, table", [((6, 5), (6, 5), (11, 9)), ((4, 8), (8, 4), (9, 13)), ((3, 3), (6, 6), (7, 7))])
def test_decomposed_rel_pos_equals_reference(q_size, k_size, table):
    """Equal and unequal query/key grids, tables of the right length and resized ones."""
    from segment_anything.modeling import image_encoder as ref

    from napari_sam.modeling import image_encoder as ours

    generator = torch.Generator().manual_seed(0)
    batch, channels = 3, 8
    q = torch.randn(batch, q_size[0] * q_size[1], channels, generator=generator)
    attn = torch.randn(batch, q_size[0] * q_size[1], k_size[0] * k_size[1], generator=generator)
    rel_h = torch.randn(table[0], channels, generator=generator)
    rel_w = torch.randn(table[1], channels, generator=generator)
    torch.testing.assert_close(
        ours.add_decomposed_rel_pos(attn, q, rel_h, rel_w, q_size, k_size),
        ref.add_decomposed_rel_pos(attn, q, rel_h, rel_w, q_size, k_size),
    )
    for q_len, k_len, rel in ((q_size[0], k_size[0], rel_h), (q_size[1], k_size[1], rel_w)):
        torch.testing.assert_close(ours.get_rel_pos(q_len, k_len, rel), ref.get_rel_pos(q_len, k_len, rel), rtol=0, atol=0)


def test_encoder_attention_and_block_equal_reference():
    """The reference's Attention and Block, called as the reference calls them, on our classes."""
    from segment_anything.modeling import image_encoder as ref

    from napari_sam.modeling import image_encoder as ours

    torch.manual_seed(0)
    kwargs = dict(dim=32, num_heads=4, use_rel_pos=True, rel_pos_zero_init=False, window_size=4, input_size=(9, 9))
    ref_block = ref.Block(**kwargs).eval()
    our_block = ours.Block(**kwargs).eval()
    our_block.load_state_dict(ref_block.state_dict())
    x = torch.randn(2, 9, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(our_block(x), ref_block(x), rtol=1e-5, atol=1e-5)
        windows, _ = ref.window_partition(x, 4)
        torch.testing.assert_close(our_block.attn(windows), ref_block.attn(windows), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("function_first", [True, False])
def test_build_sam_is_callable_and_a_module_in_either_import_order(function_first):
    """``napari_sam.build_sam(...)`` stays callable after ``import napari_sam.build_sam``, and the
    module's names import, whichever comes first (fresh interpreter each)."""
    import subprocess
    import sys

    first = "f = napari_sam.build_sam; assert callable(f)\n" if function_first else ""
    script = (
        "import inspect, napari_sam\n" + first
        + "import napari_sam.build_sam\n"
        "from napari_sam.build_sam import sam_model_registry, build_sam_vit_b, build_sam, Sam\n"
        "from napari_sam import build_sam as exported\n"
        "for f in (napari_sam.build_sam, exported, build_sam):\n"
        "    assert callable(f)\n"
        "    assert list(inspect.signature(f).parameters)[:2] == ['model_type', 'checkpoint']\n"
        "assert 'vit_b' in sam_model_registry and callable(build_sam_vit_b)\n"
        "model = napari_sam.build_sam(model_type='vit_small')\n"
        "assert isinstance(model, Sam)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
