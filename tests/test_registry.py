"""The model registry: a model type is one entry, and everything that takes a model asks the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam import SamPredictor, build_sam, sam_model_registry
from napari_sam.amg_settings import AmgSettings
from napari_sam.cli import build_parser
from napari_sam.models import (
    CheckpointError,
    ModelEntry,
    SamConfig,
    as_spec,
    canonical_type,
    create_model,
    default_model_type,
    detect_model_type,
    model_choices,
    model_types,
    register_model,
    resolve_device,
    unregister_model,
)
from napari_sam.models.weights import KNOWN_WEIGHTS, KnownWeights
from napari_sam.training.cli import build_parser as build_train_parser

# A new architecture size nobody registered: 128 px input, 16 px patches, a 32-wide decoder.
TINY = SamConfig(
    embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), img_size=128, window_size=4,
    prompt_embed_dim=32, decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32, mask_in_chans=4,
)
NAME = "vit_tiny_registry_test"


def _train_help(command: str) -> str:
    import argparse

    (subparsers,) = [a for a in build_train_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return subparsers.choices[command].format_help()


@pytest.fixture
def tiny_type():
    entry = register_model(ModelEntry(NAME, TINY, "Tiny SAM registered by a test",
                                      amg_thresholds={"pred_iou_thresh": 0.5}, aliases=("tiny_alias",)))
    yield entry
    unregister_model(NAME)
    assert NAME not in model_types() and "tiny_alias" not in sam_model_registry


def test_one_entry_reaches_every_door(tiny_type, tmp_path):
    # The reference's registry and builders, with the alias resolving to the same builder.
    assert NAME in sam_model_registry and sam_model_registry["tiny_alias"] is sam_model_registry[NAME]
    model = sam_model_registry[NAME]()
    assert model.image_encoder.img_size == 128 and model.prompt_encoder.embed_dim == 32
    path = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), path)
    # Detected from the tensor shapes; loaded by build_sam (reference call style) and the registry builder.
    assert detect_model_type(model.state_dict()) == NAME
    loaded = build_sam(str(path), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert torch.equal(sam_model_registry[NAME](checkpoint=path).image_encoder.pos_embed, model.image_encoder.pos_embed)
    # A checkpoint of this type offered as another type names this one.
    with pytest.raises(CheckpointError, match=NAME):
        sam_model_registry["vit_test"](checkpoint=path)
    # The predictor works on it (its own input size and embedding grid).
    predictor = SamPredictor(loaded)
    predictor.set_image(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    masks, scores, low_res = predictor.predict(np.array([[60.0, 45.0]]), np.array([1]))
    assert masks.shape == (3, 90, 120) and low_res.shape == (3, 32, 32)
    # Menus, command lines and AMG thresholds.
    assert (f"Other | {NAME}: {tiny_type.description}", NAME) in model_choices()
    assert NAME in build_parser().format_help() and NAME in _train_help("scratch")
    assert AmgSettings.for_model(NAME).pred_iou_thresh == 0.5
    assert as_spec("tiny_alias").model_type == NAME and canonical_type("tiny_alias") == NAME
    # No weights file: a user-facing type without one says so instead of inventing weights.
    with pytest.raises(KeyError, match="No known weights"):
        create_model(NAME, device="cpu")


def test_weights_and_auto_rank_pick_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_SAM_CACHE_DIR", str(tmp_path))
    assert default_model_type() == "vit_small"  # nothing cached: the bundled model
    weights = KnownWeights(NAME, NAME, "tiny.pth", "http://127.0.0.1:9/tiny.pth", "xxh128:00", "tiny")
    register_model(ModelEntry(NAME, TINY, "tiny", weights=weights, auto_rank=-1))
    try:
        assert KNOWN_WEIGHTS[NAME] is weights
        assert default_model_type() == "vit_small"  # ranked first, but not in the cache folder
        (tmp_path / "tiny.pth").write_bytes(b"x")
        assert default_model_type() == NAME
    finally:
        unregister_model(NAME)
    assert NAME not in KNOWN_WEIGHTS


def test_registering_twice_and_unknown_types_fail_clearly(tiny_type):
    with pytest.raises(ValueError, match="already registered"):
        register_model(ModelEntry(NAME, TINY, "again"))
    with pytest.raises(KeyError, match="vit_b"):
        sam_model_registry["vit_nope"]  # noqa: B018
    with pytest.raises(KeyError, match="expected one of"):
        create_model("vit_nope_but_not_a_path")
    with pytest.raises(ValueError, match="neither|none of these"):
        as_spec("vit_nope")


def test_test_only_types_stay_out_of_menus_and_get_seeded_weights():
    assert "vit_test" in model_types() and "vit_test" not in model_types(user_facing=True)
    assert "vit_test" not in [name for _, name in model_choices()]
    assert "vit_test" not in build_parser().format_help().split("--model-type")[1].split("--checkpoint")[0]
    state = torch.random.get_rng_state()
    first, second = create_model("vit_test", device="cpu"), create_model("vit_test", device="cpu")
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    assert torch.equal(first.image_encoder.pos_embed, second.image_encoder.pos_embed)


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") in ("cpu", "mps") and resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == "cpu" and resolve_device(torch.device("cpu")) == "cpu"
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("gpu please")
