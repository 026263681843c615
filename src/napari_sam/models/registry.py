"""The model registry: one table of model types, and the one door from a model choice to a model.

Every model type is declared once, as a :class:`ModelEntry` (architecture, known weights,
recommended automatic-mask thresholds, whether users see it), by :func:`register_model`; the
project's own entries are in :mod:`napari_sam.models.zoo`. Everything that turns a name,
a checkpoint path or ``"auto"`` into a model asks this module: :func:`create_model` (the
reference-style ``build_sam``, the command lines, the napari widgets, ``napari_sam.segment``),
:func:`build_model` (the reference's ``sam_model_registry``), :func:`resolve_device` (the
one place where ``"auto"`` becomes a torch device) and :func:`detect_model_type`.

This module imports torch only when a model is built.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Protocol, Union

from . import weights
from .state_dict import CheckpointError, load_strict, read_state_dict

if TYPE_CHECKING:
    import torch

    from ..modeling import Sam

_logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
ProgressCallback = Callable[[int, int], None]

#: Device names a user can choose; "auto" is CUDA, then Apple MPS, then the CPU.
DEVICES = ("auto", "cpu", "cuda", "mps")
#: The model choice that means "the best model available offline" (see :func:`default_model_type`).
AUTO = "auto"
#: Seed of the random weights of test-only types that have no weights file.
RANDOM_WEIGHTS_SEED = 0
#: The menu groups, in menu order (:attr:`ModelEntry.group`); a type without a group is in the last.
GROUPS = (
    "General SAM", "Light microscopy", "Electron microscopy", "Histopathology", "Medical imaging", "Offline", "Other",
)


class Architecture(Protocol):
    """What the registry needs from an architecture config (e.g. :class:`~napari_sam.models.sam_vit.SamConfig`)."""

    def build(self) -> "Sam": ...

    def fits(self, state_dict: Mapping[str, Any]) -> bool: ...


@dataclass(frozen=True)
class SameAs:
    """The architecture of another registered type, looked up when it is used.

    For types that are other weights of an existing architecture (micro-sam's ``vit_b_lm`` is
    ``vit_b`` with other weights): the entry can be registered before (or without) the type it
    names. :func:`detect_model_type` never answers such a type (it answers the one named here).

    Attributes:
        model_type: the type whose architecture this is.
    """

    model_type: str

    def resolve(self) -> Architecture:
        """The named type's architecture.

        Raises:
            KeyError: that type is not registered in this install.
        """
        entry = _MODELS.get(self.model_type)
        if entry is None:
            raise KeyError(
                f"These weights load into the {self.model_type!r} architecture, which is not registered in this "
                f"install of napari-sam (known types: {', '.join(_MODELS)})."
            )
        return entry.architecture

    def build(self) -> "Sam":
        return self.resolve().build()

    def fits(self, state_dict: Mapping[str, Any]) -> bool:
        try:
            return self.resolve().fits(state_dict)
        except KeyError:
            return False


@dataclass(frozen=True)
class ModelEntry:
    """One model type.

    Attributes:
        name: the type's name, e.g. ``"vit_b"`` (``sam_model_registry`` key, ``--model-type`` value).
        architecture: builds the untrained model and recognises its state dicts.
        description: one line for menus and help texts.
        weights: the type's default weights file, or None (then only a checkpoint path loads
            weights; a test-only type without any known weights is built with seeded random
            weights).
        amg_thresholds: automatic-mask settings that replace the reference's defaults for this
            model (field names of :class:`napari_sam.amg_settings.AmgSettings`).
        user_facing: offered in the napari widgets' menus and the command lines' help; False
            for test-only types.
        auto_rank: candidates for ``"auto"`` (no model chosen): the lowest rank whose weights
            are available without a download (bundled, or in the cache folder) wins; None: never
            chosen automatically.
        aliases: other names of this type (the reference's ``"default"`` for vit_h).
        group: the menu group, one of :data:`GROUPS` ("" = "Other").
    """

    name: str
    architecture: Architecture
    description: str
    weights: Optional[weights.KnownWeights] = None
    amg_thresholds: Mapping[str, float] = field(default_factory=dict)
    user_facing: bool = True
    auto_rank: Optional[int] = None
    aliases: tuple[str, ...] = ()
    group: str = ""

    @property
    def base_type(self) -> str:
        """The type that owns this type's architecture (itself, or the :class:`SameAs` type)."""
        return self.architecture.model_type if isinstance(self.architecture, SameAs) else self.name

    @property
    def available(self) -> bool:
        """Its architecture is registered (a :class:`SameAs` type's may not be, in this install)."""
        return self.base_type in _MODELS


_MODELS: dict[str, ModelEntry] = {}
_ALIASES: dict[str, str] = {}


def register_model(entry: ModelEntry, *, replace: bool = False) -> ModelEntry:
    """Add a model type to the registry (and its weights to the weights table).

    Args:
        entry: the model type.
        replace: allow replacing a type of the same name.

    Returns:
        The entry.

    Raises:
        ValueError: the name or an alias is taken and ``replace`` is False, or the weights are
            for another model type.
    """
    taken = [n for n in (entry.name, *entry.aliases) if n in _MODELS or n in _ALIASES]
    if taken and not replace:
        raise ValueError(f"Model type {taken[0]!r} is already registered.")
    if entry.group and entry.group not in GROUPS:
        raise ValueError(f"Model group {entry.group!r} of {entry.name!r} is not one of {', '.join(GROUPS)}.")
    if entry.weights is not None and entry.weights.model_type != entry.name:
        raise ValueError(f"Weights {entry.weights.name!r} are for {entry.weights.model_type!r}, not {entry.name!r}.")
    if entry.weights is not None:
        weights.register_weights(entry.weights, replace=True)
    _MODELS[entry.name] = entry
    for alias in entry.aliases:
        _ALIASES[alias] = entry.name
        weights.WEIGHTS_ALIASES[alias] = entry.name
    return entry


def unregister_model(name: str) -> None:
    """Remove a model type, its aliases and its weights entry (for tests that register their own)."""
    entry = _MODELS.pop(name, None)
    if entry is None:
        return
    for alias in entry.aliases:
        _ALIASES.pop(alias, None)
        weights.WEIGHTS_ALIASES.pop(alias, None)
    if entry.weights is not None and weights.KNOWN_WEIGHTS.get(entry.weights.name) is entry.weights:
        del weights.KNOWN_WEIGHTS[entry.weights.name]


def canonical_type(name: str) -> str:
    """The type's own name for ``name`` or an alias of it (``"default"`` -> ``"vit_h"``); unknown names unchanged."""
    return _ALIASES.get(name, name)


def _architecture_type(name: str) -> str:
    """The registry type of ``name``: the type itself, or the type that known weights load into."""
    if name in _MODELS:
        return _MODELS[name].base_type
    known = weights.KNOWN_WEIGHTS.get(name)
    return _architecture_type(known.model_type) if known is not None and known.model_type != name else name


def model_entry(name: str) -> ModelEntry:
    """The registry entry of a model type or alias.

    Raises:
        KeyError: unknown type; the message lists the known ones.
    """
    entry = _MODELS.get(canonical_type(name))
    if entry is None:
        raise KeyError(f"Unknown SAM model type {name!r}; expected one of {', '.join(model_types(aliases=True))}.")
    return entry


def model_types(user_facing: Optional[bool] = None, aliases: bool = False) -> list[str]:
    """Registered type names, in registration order (types whose architecture is not
    registered in this install, see :class:`SameAs`, are left out).

    Args:
        user_facing: True: only the types users are offered; False: only test-only types;
            None: all.
        aliases: append the aliases (e.g. ``"default"``).
    """
    names = [n for n, e in _MODELS.items() if (user_facing is None or e.user_facing == user_facing) and e.available]
    if aliases:
        names += [a for a, n in _ALIASES.items() if n in names]
    return names


def group_of(entry: ModelEntry) -> str:
    """The entry's menu group ("Other" when it has none)."""
    return entry.group or GROUPS[-1]


def menu_types() -> list[str]:
    """The user-facing types in menu order: by :data:`GROUPS`, registration order within a group."""
    names = model_types(user_facing=True)
    return sorted(names, key=lambda n: GROUPS.index(group_of(_MODELS[n])))


def menu_label(name: str, cache_dir: Optional[PathLike] = None) -> str:
    """One menu line: ``"<group> | <name>: <description> [downloaded]"`` (the descriptions give
    the download size); the mark says whether the type's weights are in the cache folder
    ("downloaded") or not ("not downloaded"); none for bundled weights and types without any."""
    entry = model_entry(name)
    known = entry.weights
    mark = ""
    if known is not None and known.bundled is None:
        mark = " [downloaded]" if weights.is_cached(known.name, cache_dir) else " [not downloaded]"
    return f"{group_of(entry)} | {entry.name}: {entry.description}{mark}"


def model_choices(cache_dir: Optional[PathLike] = None) -> list[tuple[str, str]]:
    """``(label, name)`` of the user-facing types for menus, grouped (see :func:`menu_types`,
    :func:`menu_label`: group, description, size and whether the weights are downloaded)."""
    return [(menu_label(n, cache_dir), n) for n in menu_types()]


def amg_thresholds(model_type: Optional[str]) -> dict[str, float]:
    """Automatic-mask settings that replace the reference's defaults for ``model_type``
    (empty for unknown types and for types that use the defaults)."""
    entry = _MODELS.get(canonical_type(model_type)) if model_type else None
    return dict(entry.amg_thresholds) if entry is not None else {}


def architecture(model_type: str) -> Architecture:
    """The architecture config of a type (e.g. its :class:`~napari_sam.models.sam_vit.SamConfig`; for
    a :class:`SameAs` type, the config of the type it names)."""
    found = model_entry(model_type).architecture
    return found.resolve() if isinstance(found, SameAs) else found


# -- devices ------------------------------------------------------------------------------------

def resolve_device(device: Union[str, "torch.device", None] = AUTO) -> str:
    """The torch device to use for a device choice; the only place where ``"auto"`` is decided.

    Args:
        device: ``"auto"`` or None (CUDA if torch sees a GPU, else Apple MPS if available,
            else the CPU), or a torch device name (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``)
            or ``torch.device``.

    Returns:
        The device name, e.g. ``"cpu"`` or ``"cuda:1"``.

    Raises:
        ValueError: not a device name, or a device that is not available here.
    """
    import torch

    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device is None or device == AUTO:
        return "cuda" if cuda else "mps" if mps else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be one of {', '.join(DEVICES)} (or e.g. 'cuda:1'), got {device!r}.") from error
    if parsed.type == "cuda" and not cuda:
        raise ValueError(f"device {str(device)!r} was chosen but torch sees no CUDA GPU; choose 'auto' or 'cpu'.")
    if parsed.type == "mps" and not mps:
        raise ValueError(f"device {str(device)!r} was chosen but Apple MPS is not available; choose 'auto' or 'cpu'.")
    return str(parsed)


# -- which model ----------------------------------------------------------------------------------

def _available_offline(entry: ModelEntry, cache_dir: Optional[PathLike]) -> bool:
    if entry.weights is None:
        return False
    if entry.weights.bundled is not None:
        return entry.weights.bundled.is_file()
    return (weights.get_cache_dir(cache_dir) / entry.weights.filename).is_file()


def default_model_type(cache_dir: Optional[PathLike] = None) -> str:
    """The model used when none is chosen (``"auto"``): among the types with an ``auto_rank``,
    the lowest-ranked one whose weights are available without a download (bundled in the
    package, or already in the cache folder).

    Raises:
        KeyError: no such type (a broken install without the bundled weights).
    """
    ranked = sorted((e for e in _MODELS.values() if e.auto_rank is not None), key=lambda e: e.auto_rank)
    for entry in ranked:
        if _available_offline(entry, cache_dir):
            return entry.name
    raise KeyError("No model is available offline: the bundled weights are missing; reinstall napari-sam.")


def bundled_model_type() -> str:
    """The type whose weights ship inside the package (the offline default and the type the
    training command line builds from scratch by default).

    Raises:
        KeyError: no registered type has bundled weights.
    """
    for name, entry in _MODELS.items():
        if entry.weights is not None and entry.weights.bundled is not None:
            return name
    raise KeyError("No registered model type has bundled weights.")


def detect_model_type(state_dict: Mapping[str, Any]) -> str:
    """Tell the registry type of a SAM state dict from its tensor shapes.

    Returns:
        The first registered type whose architecture fits (see each architecture's ``fits``).

    Raises:
        CheckpointError: no registered type fits.
    """
    for name, entry in _MODELS.items():
        if not isinstance(entry.architecture, SameAs) and entry.architecture.fits(state_dict):
            return name
    if not any(str(key).startswith("image_encoder.") for key in state_dict):
        raise CheckpointError(
            "Not a Segment Anything state dict: no 'image_encoder.*' tensors (such as image_encoder.pos_embed)."
        )
    from .sam_vit import describe_state_dict

    owners = [n for n, e in _MODELS.items() if not isinstance(e.architecture, SameAs)]
    raise CheckpointError(
        f"Unknown SAM image encoder in checkpoint ({describe_state_dict(state_dict)}); "
        f"known types: {', '.join(owners)}."
    )


def _check_fits(state_dict: Mapping[str, Any], model_type: str) -> None:
    """Raise when the tensor shapes say the state dict is of another known type."""
    if model_entry(model_type).architecture.fits(state_dict):
        return
    try:
        fits = detect_model_type(state_dict)
    except CheckpointError:
        return  # not recognisable: the strict key check reports what is wrong
    raise CheckpointError(
        f"This checkpoint is a {fits} model, not {model_type}: build it with "
        f"sam_model_registry[{fits!r}] (or napari_sam.build_sam, which detects the type)."
    )


def load_weights(model: "Sam", state_dict: Mapping[str, Any], model_type: str) -> None:
    """Load a state dict into a model of ``model_type`` with strict key and shape matching.

    Raises:
        CheckpointError: the state dict fits another type (named in the message) or has
            missing, unexpected or mis-shaped tensors.
    """
    _check_fits(state_dict, model_type)
    load_strict(model, state_dict, f"{model_type} SAM")


def build_model(model_type: str, checkpoint: Optional[PathLike] = None) -> "Sam":
    """A model of a registry type on the CPU, in eval mode, with ``checkpoint``'s weights when given,
    else untrained (random) weights. What ``sam_model_registry[model_type](checkpoint)`` does.

    Raises:
        KeyError: unknown ``model_type``.
        FileNotFoundError, CheckpointError: a missing, unreadable or mismatched checkpoint.
    """
    entry = model_entry(model_type)
    state = read_state_dict(checkpoint) if checkpoint is not None else None
    if state is not None:
        _check_fits(state, entry.name)  # before building: a wrong type fails in milliseconds
    model = entry.architecture.build()
    if state is not None:
        load_strict(model, state, f"{entry.name} SAM")
    return model


def _random_model(entry: ModelEntry) -> "Sam":
    """A test-only type without weights: seeded random weights, the caller's random state untouched."""
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(RANDOM_WEIGHTS_SEED)
    try:
        return entry.architecture.build()
    finally:
        torch.random.set_rng_state(state)


def _has_known_weights(name: str) -> bool:
    try:
        weights.known_weights(name)
    except KeyError:
        return False
    return True


def _looks_like_path(value: str) -> bool:
    """True for a checkpoint path passed where a model type was expected (reference style)."""
    if value == AUTO or canonical_type(value) in _MODELS or value in weights.KNOWN_WEIGHTS:
        return False
    return value.endswith((".pth", ".pt")) or os.sep in value or os.path.isfile(value)


def create_model(
    model: Optional[str] = AUTO,
    checkpoint: Optional[PathLike] = None,
    device: Union[str, "torch.device", None] = AUTO,
    *,
    cache_dir: Optional[PathLike] = None,
    mirror: Optional[str] = None,
    progressbar: bool = True,
    progress_callback: Optional[ProgressCallback] = None,
) -> "Sam":
    """A ready model (weights loaded, on its device, eval mode) for a model choice.

    Args:
        model: a registry type or alias (``"vit_b"``, ``"default"``), a known weights name,
            ``"auto"`` or None (with ``checkpoint``: its type is detected from the tensor shapes;
            without: :func:`default_model_type`), or a checkpoint path (the reference's
            ``build_sam(path)`` call style).
        checkpoint: path of a PyTorch checkpoint holding a SAM state dict (bare, or under
            ``"model"`` / ``"state_dict"``). Its type is detected from the tensor shapes; a
            ``model`` other than "auto"/None must name the same type (or weights of that type).
        device: see :func:`resolve_device`.
        cache_dir, mirror, progressbar, progress_callback: see
            :func:`napari_sam.models.weights.fetch_weights`; used when the type's known
            weights are loaded (downloaded once into the cache folder when missing; bundled
            weights are never downloaded).

    Returns:
        The model (``napari_sam.modeling.Sam``), in eval mode, on the device.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        CheckpointError: the file is not a SAM checkpoint of a known type, or holds another
            type than ``model`` names.
        KeyError: unknown type, or no known weights for it.
        ValueError: an unavailable device.
        DownloadError, HashMismatchError: see :func:`~napari_sam.models.weights.fetch_weights`.
    """
    target = resolve_device(device)
    if model is not None and checkpoint is None and _looks_like_path(os.fspath(model)):
        model, checkpoint = None, model
    requested = None if model in (None, AUTO) else model
    if checkpoint is None:
        name = canonical_type(requested) if requested is not None else default_model_type(cache_dir)
        entry = _MODELS.get(name)
        if entry is None and name not in weights.KNOWN_WEIGHTS:
            model_entry(name)  # raises KeyError listing the known types
        if entry is not None and isinstance(entry.architecture, SameAs):
            entry.architecture.resolve()  # before any download: raises KeyError when it is missing here
        if entry is not None and not entry.user_facing and not _has_known_weights(name):
            return _random_model(entry).to(target).eval()
        path = weights.resolve_checkpoint(
            name, None, cache_dir=cache_dir, mirror=mirror, progressbar=progressbar,
            progress_callback=progress_callback,
        )
    else:
        path = Path(os.fspath(checkpoint)).expanduser()
    state = read_state_dict(path)
    detected = detect_model_type(state)
    if checkpoint is None and detected != _architecture_type(name):
        raise CheckpointError(
            f"The {name} weights file {path} holds a {detected} SAM checkpoint, not a {_architecture_type(name)} one; "
            f"delete it (it is downloaded again) or check the mirror."
        )
    if checkpoint is not None and requested is not None:
        expected = _architecture_type(canonical_type(requested))
        if expected != detected:
            raise CheckpointError(
                f"{path} holds a {detected} SAM checkpoint, not {requested} as requested; pass "
                f"model_type={detected!r}, or 'auto' to build whatever the file holds."
            )
    built = model_entry(detected).architecture.build()
    load_strict(built, state, f"{detected} SAM")
    return built.to(target).eval()


@dataclass(frozen=True)
class ModelSpec:
    """A model choice, as the napari widgets and ``napari_sam.segment`` hold it.

    Attributes:
        model_type: registry type, or ``"auto"`` (with a checkpoint: detected from the tensor
            shapes; without: :func:`default_model_type`).
        checkpoint: path of a ``.pth`` state dict, or None for the type's known weights.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"`` (see :func:`resolve_device`).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``, see :class:`napari_sam.SamPredictor`.
    """

    model_type: str = AUTO
    checkpoint: Optional[str] = None
    device: str = AUTO
    precision: str = "fp32"

    @property
    def label(self) -> str:
        """``"<type> (<weights>)"`` for status lines."""
        entry = _MODELS.get(canonical_type(self.model_type))
        if self.checkpoint:
            name = os.path.basename(self.checkpoint)
        elif entry is not None and entry.weights is None:
            name = "random weights"
        else:
            name = "known weights"
        return f"{self.model_type} ({name})"

    def load(self, progress_callback: Optional[ProgressCallback] = None) -> "Sam":
        """Build the model (see :func:`create_model`); download progress goes to ``progress_callback``."""
        return create_model(
            self.model_type, self.checkpoint, self.device, progressbar=False, progress_callback=progress_callback
        )


def as_spec(model: Any, device: str = AUTO, precision: str = "fp32") -> Optional[ModelSpec]:
    """Interpret a ``model=`` argument: a :class:`ModelSpec`, a registry type or alias, or a checkpoint path.

    Returns:
        The spec, or None for anything else (a ``Sam`` module or ``SamPredictor``, used directly).

    Raises:
        ValueError: a string that is neither a registry type nor an existing file.
    """
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, (str, os.PathLike)):
        text = os.fspath(model)
        if canonical_type(text) in _MODELS or text == AUTO:
            return ModelSpec(canonical_type(text), None, device, precision)
        if os.path.isfile(text):
            return ModelSpec(AUTO, text, device, precision)
        raise ValueError(
            f"model must be a registry type ({', '.join(model_types(aliases=True))}), a checkpoint file, a Sam "
            f"module or a SamPredictor; {text!r} is none of these."
        )
    return None
