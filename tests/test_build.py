"""Registry, strict checkpoint loading and its errors."""

from __future__ import annotations

import pytest
import torch

from napari_sam import sam_model_registry
from napari_sam.build import CheckpointError, MODEL_CONFIGS, build_sam_from_config, detect_model_type

# Parameter and state-dict key counts of the official models (measured on the reference).
OFFICIAL = {"vit_b": (93_735_472, 314), "vit_l": (312_342_832, 482), "vit_h": (641_090_608, 594)}


@pytest.mark.parametrize("model_type", sorted(OFFICIAL))
def test_official_architectures_have_the_checkpoint_layout(model_type):
    with torch.device("meta"):
        model = build_sam_from_config(MODEL_CONFIGS[model_type])
    params, keys = OFFICIAL[model_type]
    assert sum(p.numel() for p in model.parameters()) == params
    state = model.state_dict()
    assert len(state) == keys
    assert detect_model_type(state) == model_type
    assert "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in state
    assert "pixel_mean" not in state and "pixel_std" not in state


def test_registry_keys_and_default():
    assert {"default", "vit_h", "vit_l", "vit_b"} <= set(sam_model_registry)
    assert sam_model_registry["default"] is sam_model_registry["vit_h"]


def test_registry_loads_checkpoint_and_model_is_in_eval_mode(checkpoint_factory):
    path = checkpoint_factory("vit_test")
    model = sam_model_registry["vit_test"](checkpoint=path)
    assert not model.training
    saved = torch.load(path, weights_only=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_checkpoint_of_another_type_names_the_type_it_fits(checkpoint_factory):
    path = checkpoint_factory("vit_test")
    with pytest.raises(CheckpointError, match=r"is a vit_test model, not vit_b.*sam_model_registry\['vit_test'\]"):
        sam_model_registry["vit_b"](checkpoint=path)


def test_missing_file_and_garbage_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        sam_model_registry["vit_test"](checkpoint=tmp_path / "nope.pth")
    garbage = tmp_path / "notes.pth"
    garbage.write_text("these are not weights")
    with pytest.raises(CheckpointError, match="Could not read"):
        sam_model_registry["vit_test"](checkpoint=garbage)


def test_truncated_state_dict_lists_missing_keys(checkpoint_factory, tmp_path):
    state = torch.load(checkpoint_factory("vit_test"), weights_only=True)
    del state["mask_decoder.iou_token.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing 1 keys \(mask_decoder.iou_token.weight\)"):
        sam_model_registry["vit_test"](checkpoint=path)


def test_nested_checkpoint_formats_load(checkpoint_factory, tmp_path):
    state = torch.load(checkpoint_factory("vit_test"), weights_only=True)
    for wrapper in ("model", "state_dict"):
        path = tmp_path / f"{wrapper}.pth"
        torch.save({wrapper: {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
        model = sam_model_registry["vit_test"](checkpoint=path)
        assert torch.equal(model.mask_decoder.iou_token.weight, state["mask_decoder.iou_token.weight"])


def test_unknown_model_type():
    from napari_sam.build import build_sam_type

    with pytest.raises(KeyError, match="vit_b"):
        build_sam_type("vit_x")
