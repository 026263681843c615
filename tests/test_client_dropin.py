"""Code written for the reference ``segment_anything`` runs on napari_sam behind an import alias.

:data:`CLIENT` is a script in the style of downstream libraries (micro-sam's precomputed and
tiled embeddings, its automatic-mask loop built from ``utils.amg`` pieces, the reference's
ONNX export). It imports only ``segment_anything``. It runs twice in fresh interpreters:
once on the reference, once with ``sys.modules`` aliases that make ``segment_anything`` and
its submodules napari_sam's modules; both runs load the same random weights, and their
results are compared. The ONNX part also runs in-process, exported with
``torch.onnx.export`` and run with onnxruntime (:func:`test_onnx_export_matches_torch_and_reference`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

ALIASED_MODULES = (
    "segment_anything",
    "segment_anything.modeling",
    "segment_anything.modeling.common",
    "segment_anything.modeling.image_encoder",
    "segment_anything.modeling.prompt_encoder",
    "segment_anything.modeling.mask_decoder",
    "segment_anything.modeling.transformer",
    "segment_anything.modeling.sam",
    "segment_anything.utils",
    "segment_anything.utils.transforms",
    "segment_anything.utils.amg",
    "segment_anything.utils.onnx",
    "segment_anything.predictor",
    "segment_anything.automatic_mask_generator",
    "segment_anything.build_sam",
)

# Run first when the backend is napari_sam: every reference module path names napari_sam's module.
ALIAS = f"""
import importlib, sys
for _name in {ALIASED_MODULES!r}:
    sys.modules[_name] = importlib.import_module("napari_sam" + _name[len("segment_anything"):])
"""

CLIENT = textwrap.dedent(
    '''
    import json, sys
    from functools import partial

    import numpy as np
    import torch
    from torchvision.ops.boxes import batched_nms

    import segment_anything.utils.amg as amg_utils
    from segment_anything import SamPredictor
    from segment_anything.build_sam import sam_model_registry  # noqa: F401  (the module path exists)
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    from segment_anything.utils.amg import MaskData, batch_iterator, calculate_stability_score
    from segment_anything.utils.onnx import SamOnnxModel

    config, checkpoint, images_path, out_path, onnx_path = (
        json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    )
    torch.manual_seed(0)

    # A custom-size SAM built from the modeling classes, as libraries with their own sizes do.
    grid = config["img_size"] // config["patch_size"]
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=config["depth"], embed_dim=config["embed_dim"], img_size=config["img_size"], mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=config["num_heads"],
            patch_size=config["patch_size"], qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=config["global_attn_indexes"], window_size=config["window_size"],
            out_chans=config["prompt_embed_dim"],
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=config["prompt_embed_dim"], image_embedding_size=(grid, grid),
            input_image_size=(config["img_size"], config["img_size"]), mask_in_chans=config["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=config["prompt_embed_dim"], mlp_dim=config["decoder_mlp_dim"],
                num_heads=config["decoder_num_heads"],
            ),
            transformer_dim=config["prompt_embed_dim"], iou_head_depth=3,
            iou_head_hidden_dim=config["iou_head_hidden_dim"],
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.load_state_dict(torch.load(checkpoint, map_location="cpu"))
    sam.eval()

    images = np.load(images_path)
    tiles = [images["a"], images["b"]]
    points = np.array([[40, 30], [90, 70]])
    labels = np.array([1, 0])
    out = {}

    # 1. Precomputed embeddings (micro-sam's precompute_image_embeddings / set_precomputed).
    predictor = SamPredictor(sam)
    saved = []
    for index, tile in enumerate(tiles):
        predictor.set_image(tile)
        saved.append((predictor.features.clone(), predictor.original_size, predictor.input_size))
        masks, scores, logits = predictor.predict(point_coords=points, point_labels=labels, multimask_output=True)
        out[f"fresh_{index}"] = logits
        out[f"fresh_scores_{index}"] = scores
    # A predictor that saw another image, then the tiles' embeddings assigned in turn (tiling).
    tiled = SamPredictor(sam)
    tiled.set_image(tiles[0])
    for step, index in enumerate([1, 0, 1]):
        features, original_size, input_size = saved[index]
        tiled.features = features
        tiled.original_size = original_size
        tiled.input_size = input_size
        tiled.is_image_set = True
        masks, scores, logits = tiled.predict(point_coords=points, point_labels=labels, multimask_output=True)
        out[f"assigned_{step}_tile_{index}"] = logits

    # 2. An automatic-mask loop from utils.amg pieces on one crop of tile b.
    image = tiles[1]
    im_h, im_w = image.shape[:2]
    crop_boxes, layer_idxs = amg_utils.generate_crop_boxes((im_h, im_w), 1, 512 / 1500)
    crop_box = crop_boxes[1]
    x0, y0, x1, y1 = crop_box
    crop = image[y0:y1, x0:x1]
    predictor.set_image(crop)
    grid_points = amg_utils.build_all_layer_point_grids(8, 1, 2)[layer_idxs[1]] * np.array(crop.shape[:2])[None, ::-1]
    data = MaskData()
    for (batch_points,) in batch_iterator(16, grid_points):
        coords = predictor.transform.apply_coords(batch_points, crop.shape[:2])
        in_points = torch.as_tensor(coords, dtype=torch.float32)
        in_labels = torch.ones(in_points.shape[0], dtype=torch.int64)
        logits, iou_preds, _ = predictor.predict_torch(
            in_points[:, None, :], in_labels[:, None], multimask_output=True, return_logits=True
        )
        batch = MaskData(
            masks=logits.flatten(0, 1),
            iou_preds=iou_preds.flatten(0, 1),
            points=torch.as_tensor(batch_points.repeat(logits.shape[1], axis=0)),
        )
        # Offset 0.1, not 1.0: the random model's logits stay within a few tenths of 0.
        batch["stability_score"] = calculate_stability_score(batch["masks"], sam.mask_threshold, 0.1)
        batch.filter(batch["stability_score"] >= 0.5)
        batch["masks"] = batch["masks"] > sam.mask_threshold
        batch["boxes"] = amg_utils.batched_mask_to_box(batch["masks"])
        # Recorded rather than filtered on: the random model's masks fill their crop.
        batch["near_edge"] = amg_utils.is_box_near_crop_edge(batch["boxes"], crop_box, [0, 0, im_w, im_h])
        batch["masks"] = amg_utils.uncrop_masks(batch["masks"], crop_box, im_h, im_w)
        batch["rles"] = amg_utils.mask_to_rle_pytorch(batch["masks"])
        del batch["masks"]
        data.cat(batch)
    keep = batched_nms(data["boxes"].float(), data["iou_preds"], torch.zeros_like(data["boxes"][:, 0]), 0.7)
    data.filter(keep)
    data["boxes"] = amg_utils.uncrop_boxes_xyxy(data["boxes"], crop_box)
    data["points"] = amg_utils.uncrop_points(data["points"], crop_box)
    data["crop_boxes"] = torch.tensor([crop_box for _ in range(len(data["rles"]))])
    data.to_numpy()
    records = []
    for i, rle in enumerate(data["rles"]):
        records.append({
            "area": amg_utils.area_from_rle(rle),
            "bbox": amg_utils.box_xyxy_to_xywh(data["boxes"][i]).tolist(),
            "crop_box": amg_utils.box_xyxy_to_xywh(data["crop_boxes"][i]).tolist(),
            "predicted_iou": float(data["iou_preds"][i]),
            "stability_score": float(data["stability_score"][i]),
            "point_coords": [data["points"][i].tolist()],
            "near_edge": bool(data["near_edge"][i]),
        })
        out[f"amg_mask_{i}"] = amg_utils.rle_to_mask(rle)
    out["amg_n"] = np.array(len(records))
    tensor_box = amg_utils.box_xyxy_to_xywh(torch.tensor([3, 4, 10, 20]))
    out["xywh_is_tensor"] = np.array(isinstance(tensor_box, torch.Tensor))

    # 3. ONNX export of the prompt encoder + mask decoder, run on tile b's embedding.
    onnx_model = SamOnnxModel(sam, return_single_mask=True)
    embedding = saved[1][0]
    onnx_points = np.concatenate([points, np.zeros((1, 2))], axis=0)[None].astype(np.float32)
    onnx_inputs = {
        "image_embeddings": embedding,
        "point_coords": torch.as_tensor(
            predictor.transform.apply_coords(onnx_points, tiles[1].shape[:2]), dtype=torch.float32
        ),
        "point_labels": torch.tensor([[1.0, 0.0, -1.0]]),
        "mask_input": torch.zeros(1, 1, 4 * grid, 4 * grid),
        "has_mask_input": torch.tensor([0.0]),
        "orig_im_size": torch.tensor(tiles[1].shape[:2], dtype=torch.float32),
    }
    torch.onnx.export(
        onnx_model, tuple(onnx_inputs.values()), onnx_path, input_names=list(onnx_inputs),
        output_names=["masks", "iou_predictions", "low_res_masks"],
        dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
        opset_version=17, do_constant_folding=True, dynamo=False,
    )
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {k: v.numpy() for k, v in onnx_inputs.items()})
    torch_out = onnx_model(**onnx_inputs)
    out["onnx_masks"], out["onnx_scores"] = onnx_out[0], onnx_out[1]
    out["onnx_vs_torch"] = np.array(max(float(np.abs(a - b.numpy()).max()) for a, b in zip(onnx_out, torch_out)))
    np.savez(out_path, **out)
    with open(out_path + ".json", "w") as f:
        json.dump(records, f)
    '''
)


def _run_client(backend: str, folder: Path, checkpoint: Path, images: Path, config: dict) -> tuple[dict, list]:
    script = (ALIAS if backend == "napari_sam" else "") + CLIENT
    out = folder / f"{backend}.npz"
    command = [sys.executable, "-c", script, json.dumps(config), str(checkpoint), str(images), str(out), str(folder / f"{backend}.onnx")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"client script failed on {backend}:\n{result.stderr[-6000:]}"
    if backend == "napari_sam":
        assert "segment_anything/" not in result.stderr  # no traceback through the reference
    with np.load(out) as arrays:
        values = dict(arrays)
    return values, json.loads(Path(str(out) + ".json").read_text())


@pytest.fixture(scope="module")
def client_runs(checkpoint_factory, truck, groceries, tmp_path_factory):
    import dataclasses

    from napari_sam.build import MODEL_CONFIGS

    config = dataclasses.asdict(MODEL_CONFIGS["vit_test"])
    config["global_attn_indexes"] = list(config["global_attn_indexes"])
    folder = tmp_path_factory.mktemp("client")
    images = folder / "tiles.npz"
    # Two tiles of different sizes (subsampled real photos).
    np.savez(images, a=np.ascontiguousarray(truck[::6, ::6]), b=np.ascontiguousarray(groceries[::5, ::4]))
    checkpoint = checkpoint_factory("vit_test")
    return {backend: _run_client(backend, folder, checkpoint, images, config) for backend in ("napari_sam", "reference")}


def _assert_logits_close(ours: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-3)


def test_precomputed_embeddings_match_reference(client_runs):
    ours, _ = client_runs["napari_sam"]
    ref, _ = client_runs["reference"]
    for index in (0, 1):
        _assert_logits_close(ours[f"fresh_{index}"], ref[f"fresh_{index}"])
        np.testing.assert_allclose(ours[f"fresh_scores_{index}"], ref[f"fresh_scores_{index}"], rtol=1e-3, atol=1e-4)


def test_assigned_embeddings_predict_like_set_image(client_runs):
    """features / original_size / input_size / is_image_set assigned after another image
    (micro-sam's tiling) predict what set_image of that tile predicts, in both packages."""
    for backend in ("reference", "napari_sam"):
        values, _ = client_runs[backend]
        for step, index in enumerate([1, 0, 1]):
            np.testing.assert_allclose(
                values[f"assigned_{step}_tile_{index}"], values[f"fresh_{index}"], rtol=1e-5, atol=1e-5,
                err_msg=f"{backend}: step {step}, tile {index}",
            )


def test_amg_loop_from_pieces_matches_reference(client_runs):
    ours, our_records = client_runs["napari_sam"]
    ref, ref_records = client_runs["reference"]
    assert bool(ours["xywh_is_tensor"]) and bool(ref["xywh_is_tensor"])
    assert int(ref["amg_n"]) > 0, "the reference kept no masks: the loop's thresholds test nothing"
    assert int(ours["amg_n"]) == int(ref["amg_n"])
    for i, (a, b) in enumerate(zip(our_records, ref_records)):
        assert a["crop_box"] == b["crop_box"]
        assert a["near_edge"] == b["near_edge"]
        assert a["point_coords"][0] == pytest.approx(b["point_coords"][0])
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-3)
        assert a["stability_score"] == pytest.approx(b["stability_score"], abs=1e-2)
        assert np.abs(np.array(a["bbox"]) - np.array(b["bbox"])).max() <= 1
        mask_a, mask_b = ours[f"amg_mask_{i}"], ref[f"amg_mask_{i}"]
        assert mask_a.shape == mask_b.shape and mask_a.dtype == mask_b.dtype == bool
        assert (mask_a != mask_b).mean() < 1e-3
        assert abs(a["area"] - b["area"]) <= max(3, 1e-3 * mask_a.size)


def test_onnx_export_in_the_client_matches_reference(client_runs):
    ours, _ = client_runs["napari_sam"]
    ref, _ = client_runs["reference"]
    assert float(ours["onnx_vs_torch"]) < 1e-3
    assert ours["onnx_masks"].shape == ref["onnx_masks"].shape
    np.testing.assert_allclose(ours["onnx_masks"], ref["onnx_masks"], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(ours["onnx_scores"], ref["onnx_scores"], rtol=1e-3, atol=1e-4)


# -- ONNX in-process: our export at several sizes against torch and the reference ---------------


@pytest.fixture(scope="module")
def small_pair(checkpoint_factory, reference_builder):
    """Our vit_test SAM and the reference's classes with the same random weights."""
    from napari_sam.build import MODEL_CONFIGS, sam_model_registry

    checkpoint = checkpoint_factory("vit_test")
    ours = sam_model_registry["vit_test"](checkpoint=checkpoint)
    ref = reference_builder(MODEL_CONFIGS["vit_test"])
    ref.load_state_dict(torch.load(checkpoint, map_location="cpu"))
    return ours, ref


@pytest.mark.parametrize("single, stability, extra", [(True, False, False), (False, True, True)])
def test_onnx_export_matches_torch_and_reference(small_pair, tmp_path, single, stability, extra):
    """``export_onnx`` (torch.onnx.export, TorchScript-based exporter: ``dynamo=False``) run by
    onnxruntime equals our torch forward and the reference's SamOnnxModel, for point counts
    and image sizes other than the ones traced."""
    import onnxruntime
    from segment_anything.utils.onnx import SamOnnxModel as RefOnnxModel

    from napari_sam.utils.onnx import SamOnnxModel, example_inputs, export_onnx

    ours, ref = small_pair
    path = tmp_path / "sam.onnx"
    export_onnx(ours, path, return_single_mask=single, use_stability_score=stability, return_extra_metrics=extra)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    our_wrapper = SamOnnxModel(ours, single, stability, extra).eval()
    ref_wrapper = RefOnnxModel(ref, single, stability, extra).eval()
    torch.manual_seed(1)
    for num_points, size, has_mask in [(2, (600, 400), 0.0), (5, (1500, 2250), 1.0), (3, (333, 1000), 1.0)]:
        inputs = example_inputs(ours, num_points=num_points, orig_im_size=size)
        inputs["has_mask_input"] = torch.tensor([has_mask])
        expected = our_wrapper(**inputs)
        onnx_out = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        reference = ref_wrapper(**inputs)
        assert len(onnx_out) == len(expected) == len(reference) == (5 if extra else 3)
        for got, want, oracle in zip(onnx_out, expected, reference):
            assert got.shape == tuple(want.shape) == tuple(oracle.shape)
            if want.dtype == torch.int64:  # areas: pixel counts; rounding flips a few pixels at 0
                slack = 2 + 1e-5 * size[0] * size[1]
                assert np.abs(got - want.numpy()).max() <= slack
                assert np.abs(want.numpy() - oracle.numpy()).max() <= slack
                continue
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(want.numpy(), oracle.numpy(), rtol=1e-3, atol=1e-3)


def test_onnx_extra_missing_names_the_extra(monkeypatch):
    from napari_sam.utils import onnx as onnx_utils

    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(ImportError, match=r"napari-sam\[onnx\]"):
        onnx_utils.import_onnx_extra("onnx")
