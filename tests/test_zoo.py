"""micro-sam's domain-tuned SAM weights in the model zoo: every entry's facts, the doors a name
opens (build_sam, sam_model_registry, --model-type, menus), and a real download of a
stand-in file in micro-sam's training-checkpoint (torch_em) layout from a local HTTP server,
through the same path as the real files, with progress, cache, menu status and cancellation."""

from __future__ import annotations

import re
import sys
import types

import pooch
import pytest
import torch

from test_checkpoints import _Server  # the local weights server (same folder, imported by name)

from napari_sam import build_sam, sam_model_registry
from napari_sam.cli import build_parser
from napari_sam.models import create_model, registry, weights, zoo
from napari_sam.models.registry import GROUPS, ModelEntry, SameAs, model_choices, register_model, unregister_model
from napari_sam.models.state_dict import LAYOUTS, checkpoint_layout, load_checkpoint_file, read_state_dict

MICRO_SAM = (
    "vit_b_lm", "vit_l_lm", "vit_t_lm", "vit_b_em_organelles", "vit_l_em_organelles", "vit_t_em_organelles",
    "vit_b_histopathology", "vit_l_histopathology", "vit_h_histopathology", "vit_b_medical_imaging",
)
STANDIN = "vit_test_lm_standin"


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(weights.MIRROR_ENV, raising=False)
    return tmp_path / "cache"


def _has_vit_t() -> bool:
    return "vit_t" in registry._MODELS


# -- the entries --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MICRO_SAM)
def test_every_micro_sam_entry_has_its_facts(name):
    entry = registry._MODELS[name]
    known = entry.weights
    assert [e.name for e in zoo.MICRO_SAM_MODELS].count(name) == 1
    assert known is not None and known.name == name and known.model_type == name
    assert known.url.startswith("https://") and " " not in known.url
    assert re.fullmatch(r"xxh128:[0-9a-f]{32}", known.known_hash)
    assert entry.group in GROUPS and entry.group not in ("General SAM", "Offline", "Other")
    assert known.layout in LAYOUTS
    assert known.size_mb and known.size_text in entry.description.replace("~", "")
    assert "CC-BY 4.0" in entry.description and "third-party" in known.description
    assert isinstance(entry.architecture, SameAs) and entry.base_type == name[:5]
    assert entry.user_facing and entry.auto_rank is None  # never picked by "auto" (never downloaded unasked)
    # One cache file per weights: no two entries share a file name.
    assert [k.filename for k in weights.KNOWN_WEIGHTS.values()].count(known.filename) == 1


def test_domain_names_reach_every_door():
    help_text = build_parser().format_help()
    labels = dict((n, label) for label, n in model_choices())
    for name in MICRO_SAM:
        offered = not name.startswith("vit_t_") or _has_vit_t()
        assert (name in registry.model_types(user_facing=True)) == offered
        assert (name in sam_model_registry) == offered and (name in labels) == offered
        assert (name in help_text) == offered
        if offered:
            assert labels[name].startswith(registry._MODELS[name].group + " | ")
            assert registry.architecture(name) is registry.architecture(name[:5])
    # The menu is grouped in GROUPS order, the offline default last but still the default.
    groups = [label.split(" | ")[0] for label, _ in model_choices()]
    assert groups == sorted(groups, key=GROUPS.index) and groups[-1] == "Offline"
    assert registry.default_model_type() == "vit_small"


def test_vit_t_weights_wait_for_the_vit_t_architecture(monkeypatch):
    """Registered before (or without) vit_t: hidden and refused clearly, never downloaded; offered
    and built as vit_t as soon as a vit_t type is registered."""
    if not _has_vit_t():
        monkeypatch.setenv(weights.MIRROR_ENV, "http://127.0.0.1:9")  # a download attempt would fail loudly
        with pytest.raises(KeyError, match="'vit_t' architecture, which is not registered"):
            create_model("vit_t_lm", device="cpu")
        register_model(ModelEntry("vit_t", zoo.VIT_TEST, "stand-in vit_t", group="General SAM"))
    try:
        assert "vit_t_lm" in registry.model_types(user_facing=True)
        assert registry.architecture("vit_t_em_organelles") is registry.architecture("vit_t")
    finally:
        if registry._MODELS["vit_t"].description == "stand-in vit_t":
            unregister_model("vit_t")
    assert ("vit_t_lm" in registry.model_types(user_facing=True)) == _has_vit_t()


# -- a stand-in file in micro-sam's training-checkpoint layout ----------------------------------

class TrainerConfig:
    """Stands for a torch_em class that napari-sam cannot (and must not) import."""

    def __init__(self) -> None:
        self.learning_rate, self.name = 1e-5, "vit_b_lm"


_FAKE_MODULE = "torch_em_standin_trainer"


def _torch_em_bytes(tmp_path, state: dict) -> bytes:
    module = types.ModuleType(_FAKE_MODULE)
    TrainerConfig.__module__, module.TrainerConfig = _FAKE_MODULE, TrainerConfig
    sys.modules[_FAKE_MODULE] = module
    try:
        path = tmp_path / "best.pt"
        torch.save({
            "model_state": {f"sam.{k}": v for k, v in state.items()},
            "decoder_state": {"encoder.weight": torch.zeros(2)},  # micro-sam's instance decoder: ignored
            "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-5}]},
            "iteration": 1000, "config": TrainerConfig(),
        }, path)
    finally:
        del sys.modules[_FAKE_MODULE]
        TrainerConfig.__module__ = __name__
    return path.read_bytes()


@pytest.fixture
def standin(tmp_path):
    """A domain type like vit_b_lm, on the vit_test architecture, served by a local server in
    the torch_em layout (its hash computed from the stand-in file)."""
    torch.manual_seed(3)
    reference = registry.architecture("vit_test").build()
    body = _torch_em_bytes(tmp_path, reference.state_dict())
    (tmp_path / "standin.pt").write_bytes(body)
    server = _Server({"download": body})
    known = weights.KnownWeights(
        STANDIN, STANDIN, f"{STANDIN}.pt", server.base_url + "/download",
        "xxh128:" + pooch.file_hash(str(tmp_path / "standin.pt"), alg="xxh128"),
        "stand-in (CC-BY 4.0, third-party)", size_mb=len(body) / 1e6, layout="torch_em",
    )
    register_model(ModelEntry(STANDIN, SameAs("vit_test"), "stand-in for vit_b_lm", weights=known,
                              group="Light microscopy"))
    yield reference, server
    unregister_model(STANDIN)
    server.stop()


def test_the_torch_em_layout_is_read_without_its_classes(tmp_path):
    torch.manual_seed(0)
    state = registry.architecture("vit_test").build().state_dict()
    path = tmp_path / "best.pt"
    path.write_bytes(_torch_em_bytes(tmp_path, state))
    loaded = load_checkpoint_file(path)
    assert checkpoint_layout(loaded) == "torch_em" and loaded["iteration"] == 1000
    assert "torch_em_standin_trainer.TrainerConfig" in repr(loaded["config"])  # an inert placeholder
    read = read_state_dict(path)
    assert read.keys() == state.keys() and all(torch.equal(read[k], v) for k, v in state.items())


def test_a_domain_model_downloads_caches_and_builds(standin, isolated_env):
    reference, server = standin
    label = dict((n, lbl) for lbl, n in model_choices())[STANDIN]
    assert label.startswith("Light microscopy | ") and label.endswith("[not downloaded]")
    events, progress = [], []
    disconnect = weights.on_download(events.append)
    try:
        model = create_model(STANDIN, device="cpu", progressbar=False, progress_callback=lambda d, t: progress.append((d, t)))
    finally:
        disconnect()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert progress and progress[-1][0] == progress[-1][1] > 0
    assert events[0].state == "started" and events[-1].state == "finished" and events[-1].name == STANDIN
    assert sorted(p.name for p in isolated_env.iterdir()) == [f"{STANDIN}.pt", f"{STANDIN}.pt.verified"]
    assert dict((n, lbl) for lbl, n in model_choices())[STANDIN].endswith("[downloaded]")
    # Cached: build_sam by name and the command line's resolution make no second request.
    again = build_sam(STANDIN, device="cpu")
    assert torch.equal(again.image_encoder.pos_embed, reference.image_encoder.pos_embed)
    from napari_sam.cli import resolve_checkpoint

    assert resolve_checkpoint(STANDIN, None) == (STANDIN, str(isolated_env.resolve() / f"{STANDIN}.pt"))
    assert server.requests == ["/download"]


def test_a_cancelled_download_leaves_nothing(standin, isolated_env):
    events = []
    disconnect = weights.on_download(events.append)
    try:
        with pytest.raises(weights.DownloadCancelled, match="cancelled"):
            # As the picker's Cancel button does, from another thread, while the transfer runs.
            weights.fetch_weights(STANDIN, progressbar=False, progress_callback=lambda *_: weights.cancel_downloads())
    finally:
        disconnect()
    assert events[-1].state == "cancelled" and weights.downloads_running() == 0
    assert not isolated_env.exists() or not list(isolated_env.iterdir())
    assert weights.fetch_weights(STANDIN, progressbar=False).is_file()  # a later download runs
