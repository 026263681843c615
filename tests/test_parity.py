"""Numerical parity with the reference ``segment_anything`` (same random weights, loaded
through the checkpoint path). Tolerances from the foundation issue: image embedding
<= 1e-4, low-res logits <= 1e-3, predicted IoU <= 1e-4, boolean masks equal except where
|logit| < 1e-3.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam import SamPredictor, sam_model_registry

segment_anything = pytest.importorskip("segment_anything")

MODEL_TYPES = ["vit_test", "vit_small", pytest.param("vit_b", marks=pytest.mark.slow)]


def build_reference(model_type: str, checkpoint, reference_sam):
    from napari_sam.build import MODEL_CONFIGS

    if model_type in segment_anything.sam_model_registry:
        return segment_anything.sam_model_registry[model_type](checkpoint=str(checkpoint))
    model = reference_sam(MODEL_CONFIGS[model_type])  # the reference's classes, our sizes
    model.load_state_dict(torch.load(checkpoint, weights_only=True), strict=True)
    return model


@pytest.fixture(scope="module", params=MODEL_TYPES)
def models(request, checkpoint_factory, reference_builder):
    checkpoint = checkpoint_factory(request.param)
    reference = build_reference(request.param, checkpoint, reference_builder)
    return reference, sam_model_registry[request.param](checkpoint=checkpoint)


@pytest.fixture(scope="module", params=["truck", "groceries"])
def predictors(request, models):
    """(reference predictor, our predictor, image) with the image embedded by both."""
    image = request.getfixturevalue(request.param)
    reference, ours = models
    ref_predictor, our_predictor = segment_anything.SamPredictor(reference), SamPredictor(ours)
    ref_predictor.set_image(image)
    our_predictor.set_image(image)
    return ref_predictor, our_predictor, image


def assert_masks_match(ref_masks, our_masks, logits):
    """Masks equal wherever the logit is not within 1e-3 of the threshold."""
    ref_masks, our_masks, logits = (np.asarray(a) for a in (ref_masks, our_masks, logits))
    assert ref_masks.shape == our_masks.shape
    assert ref_masks.dtype == our_masks.dtype == np.bool_
    differ = ref_masks != our_masks
    assert not np.any(differ & (np.abs(logits) >= 1e-3)), f"{differ.sum()} mask pixels differ"
    # The comparison must have teeth: the masks hold both classes.
    assert 0 < ref_masks.mean() < 1


def assert_prediction_matches(ref_out, our_out, ref_predictor, prompts):
    ref_masks, ref_iou, ref_low = ref_out
    our_masks, our_iou, our_low = our_out
    assert our_low.shape == ref_low.shape and our_low.dtype == ref_low.dtype == np.float32
    assert our_iou.shape == ref_iou.shape and our_iou.dtype == ref_iou.dtype
    assert np.abs(our_low - ref_low).max() <= 1e-3
    assert np.abs(our_iou - ref_iou).max() <= 1e-4
    logits, _, _ = ref_predictor.predict(**prompts, return_logits=True)
    assert_masks_match(ref_masks, our_masks, logits)


def test_image_embedding(predictors):
    ref_predictor, our_predictor, image = predictors
    ours, ref = our_predictor.get_image_embedding(), ref_predictor.get_image_embedding()
    encoder = our_predictor.model.image_encoder
    grid = encoder.img_size // encoder.patch_embed.proj.kernel_size[0]
    channels = our_predictor.model.prompt_encoder.embed_dim
    assert ours.shape == ref.shape == (1, channels, grid, grid) and ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= 1e-4
    assert our_predictor.original_size == ref_predictor.original_size == image.shape[:2]
    assert our_predictor.input_size == ref_predictor.input_size


def test_one_positive_point_multimask(predictors):
    ref_predictor, our_predictor, image = predictors
    h, w = image.shape[:2]
    prompts = dict(point_coords=np.array([[w * 0.45, h * 0.55]]), point_labels=np.array([1]))
    ref_out = ref_predictor.predict(**prompts, multimask_output=True)
    our_out = our_predictor.predict(**prompts, multimask_output=True)
    assert our_out[0].shape == (3, h, w)
    assert_prediction_matches(ref_out, our_out, ref_predictor, prompts)


def test_points_with_previous_mask_input(predictors):
    ref_predictor, our_predictor, image = predictors
    h, w = image.shape[:2]
    first = dict(point_coords=np.array([[w * 0.3, h * 0.4]]), point_labels=np.array([1]))
    _, ref_iou, ref_low = ref_predictor.predict(**first)
    best = int(np.argmax(ref_iou))
    prompts = dict(
        point_coords=np.array([[w * 0.3, h * 0.4], [w * 0.6, h * 0.5], [w * 0.2, h * 0.8]]),
        point_labels=np.array([1, 1, 0]),
        mask_input=ref_low[best][None],
    )
    ref_out = ref_predictor.predict(**prompts, multimask_output=False)
    our_out = our_predictor.predict(**prompts, multimask_output=False)
    assert our_out[0].shape == (1, h, w)
    assert_prediction_matches(ref_out, our_out, ref_predictor, dict(prompts, multimask_output=False))


def test_box(predictors):
    ref_predictor, our_predictor, image = predictors
    h, w = image.shape[:2]
    prompts = dict(box=np.array([w * 0.1, h * 0.2, w * 0.7, h * 0.9]))
    ref_out = ref_predictor.predict(**prompts, multimask_output=False)
    our_out = our_predictor.predict(**prompts, multimask_output=False)
    assert_prediction_matches(ref_out, our_out, ref_predictor, dict(prompts, multimask_output=False))


def test_box_with_negative_point(predictors):
    ref_predictor, our_predictor, image = predictors
    h, w = image.shape[:2]
    prompts = dict(
        box=np.array([w * 0.2, h * 0.1, w * 0.9, h * 0.7]),
        point_coords=np.array([[w * 0.5, h * 0.4]]),
        point_labels=np.array([0]),
    )
    ref_out = ref_predictor.predict(**prompts)
    our_out = our_predictor.predict(**prompts)
    assert_prediction_matches(ref_out, our_out, ref_predictor, prompts)


def test_several_boxes_through_predict_torch(predictors):
    ref_predictor, our_predictor, image = predictors
    h, w = image.shape[:2]
    boxes = torch.tensor(
        [[0.1 * w, 0.1 * h, 0.5 * w, 0.6 * h], [0.4 * w, 0.3 * h, 0.95 * w, 0.9 * h], [0, 0, w - 1, h - 1]]
    )
    ref_boxes = ref_predictor.transform.apply_boxes_torch(boxes, image.shape[:2])
    our_boxes = our_predictor.transform.apply_boxes_torch(boxes, image.shape[:2])
    assert torch.equal(ref_boxes, our_boxes) and our_boxes.dtype == torch.float32
    ref_masks, ref_iou, ref_low = ref_predictor.predict_torch(None, None, boxes=ref_boxes, multimask_output=False)
    our_masks, our_iou, our_low = our_predictor.predict_torch(None, None, boxes=our_boxes, multimask_output=False)
    assert our_masks.shape == ref_masks.shape == (3, 1, h, w)
    assert (our_low - ref_low).abs().max().item() <= 1e-3
    assert (our_iou - ref_iou).abs().max().item() <= 1e-4
    ref_logits, _, _ = ref_predictor.predict_torch(
        None, None, boxes=ref_boxes, multimask_output=False, return_logits=True
    )
    assert_masks_match(ref_masks.numpy(), our_masks.numpy(), ref_logits.numpy())


def test_batched_forward_two_images(models, truck, groceries):
    """``Sam.forward`` on two images of different sizes, each with its own prompts."""
    reference, ours = models
    from segment_anything.utils.transforms import ResizeLongestSide as RefResize

    from napari_sam.utils.transforms import ResizeLongestSide

    ref_resize, our_resize = RefResize(1024), ResizeLongestSide(1024)

    def batch(resize):
        records = []
        for image, prompt in (
            (truck, dict(points=[[[500.0, 375.0], [1200.0, 600.0]]], labels=[[1, 0]])),
            (groceries, dict(boxes=[[100.0, 80.0, 500.0, 400.0], [300.0, 200.0, 780.0, 520.0]])),
        ):
            resized = torch.as_tensor(resize.apply_image(image)).permute(2, 0, 1).contiguous()
            record = {"image": resized, "original_size": image.shape[:2]}
            if "points" in prompt:
                record["point_coords"] = resize.apply_coords_torch(torch.tensor(prompt["points"]), image.shape[:2])
                record["point_labels"] = torch.tensor(prompt["labels"])
            else:
                record["boxes"] = resize.apply_boxes_torch(torch.tensor(prompt["boxes"]), image.shape[:2])
            records.append(record)
        return records

    ref_out = reference(batch(ref_resize), multimask_output=True)
    our_out = ours(batch(our_resize), multimask_output=True)
    assert len(our_out) == 2
    for ref_record, our_record, image in zip(ref_out, our_out, (truck, groceries)):
        assert our_record["masks"].shape == ref_record["masks"].shape
        assert our_record["masks"].shape[-2:] == image.shape[:2]
        assert (our_record["low_res_logits"] - ref_record["low_res_logits"]).abs().max().item() <= 1e-3
        assert (our_record["iou_predictions"] - ref_record["iou_predictions"]).abs().max().item() <= 1e-4
        logits = reference.postprocess_masks(
            ref_record["low_res_logits"], tuple(ref_resize.get_preprocess_shape(*image.shape[:2], 1024)), image.shape[:2]
        )
        assert_masks_match(ref_record["masks"].numpy(), our_record["masks"].numpy(), logits.numpy())
