"""SamPredictor's input contracts and state: bad prompts raise, odd images work, predictor
state set directly by clients (as the reference allows) is never stale, and every model
takes SAM's 256x256 mask prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from napari_sam import SamPredictor, build_sam, sam_model_registry


@pytest.fixture(scope="module")
def model(checkpoint_factory):
    return sam_model_registry["vit_test"](checkpoint=checkpoint_factory("vit_test"))


@pytest.fixture(scope="module")
def coins_predictor(model):
    predictor = SamPredictor(model)
    predictor.set_image(data.coins())
    return predictor


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_coordinates_are_refused(coins_predictor, bad):
    with pytest.raises(ValueError, match="point_coords must be finite"):
        coins_predictor.predict(point_coords=np.array([[10.0, bad]]), point_labels=np.array([1]))
    with pytest.raises(ValueError, match="box must be finite"):
        coins_predictor.predict(box=np.array([0, 0, bad, 50]))
    with pytest.raises(ValueError, match="point_coords must be finite"):
        coins_predictor.predict_torch(torch.tensor([[[bad, 3.0]]]), torch.ones(1, 1))
    with pytest.raises(ValueError, match="boxes must be finite"):
        coins_predictor.predict_torch(None, None, boxes=torch.tensor([[0.0, 0.0, bad, 9.0]]))


@pytest.mark.parametrize("label", [5, 0.7, 2, -2])
def test_labels_other_than_positive_negative_padding_are_refused(coins_predictor, label):
    with pytest.raises(ValueError, match="1 \\(positive point\\), 0 \\(negative point\\)"):
        coins_predictor.predict(point_coords=np.array([[50, 50]]), point_labels=np.array([label]))
    with pytest.raises(ValueError, match="point_labels must be 1"):
        coins_predictor.predict_torch(torch.tensor([[[50.0, 50.0]]]), torch.tensor([[label]]))


def test_integer_valued_float_and_boolean_labels_mean_the_same(coins_predictor):
    coords = np.array([[120, 80], [200, 150]])
    expected = coins_predictor.predict(point_coords=coords, point_labels=np.array([1, 0]))
    for labels in (np.array([1.0, 0.0]), np.array([True, False])):
        got = coins_predictor.predict(point_coords=coords, point_labels=labels)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_allclose(got[1], expected[1])


def test_a_box_with_reordered_corners_is_the_same_rectangle(coins_predictor):
    expected, iou, _ = coins_predictor.predict(box=np.array([60, 40, 220, 180]), multimask_output=False)
    assert expected.any()
    for corners in ([220, 180, 60, 40], [220, 40, 60, 180], [60, 180, 220, 40]):
        masks, got_iou, _ = coins_predictor.predict(box=np.array(corners), multimask_output=False)
        np.testing.assert_array_equal(masks, expected)
        np.testing.assert_allclose(got_iou, iou, rtol=1e-5)
    boxes = coins_predictor.transform.apply_boxes_torch(torch.tensor([[220.0, 180.0, 60.0, 40.0]]), (303, 384))
    masks_t, _, _ = coins_predictor.predict_torch(None, None, boxes=boxes, multimask_output=False)
    np.testing.assert_array_equal(masks_t[0].numpy(), expected)


@pytest.mark.parametrize("shape", [(1, 5000), (10, 6000), (5000, 1), (3, 3)])
def test_thin_and_tiny_images_are_embedded_and_segmented(model, shape):
    image = np.random.default_rng(0).integers(0, 255, size=(*shape, 3), dtype=np.uint8)
    predictor = SamPredictor(model)
    predictor.set_image(image)
    assert min(predictor.input_size) >= 1 and max(predictor.input_size) == 1024
    masks, iou, low_res = predictor.predict(
        point_coords=np.array([[shape[1] // 2, shape[0] // 2]]), point_labels=np.array([1])
    )
    assert masks.shape == (3, *shape) and np.isfinite(iou).all() and low_res.shape == (3, 256, 256)


def test_an_empty_image_is_refused_with_its_size(model):
    with pytest.raises(ValueError, match="non-empty image, got shape \\(0, 40, 3\\)"):
        SamPredictor(model).set_image(np.zeros((0, 40, 3), np.uint8))


def _features_and_sizes(model, image):
    predictor = SamPredictor(model)
    predictor.set_image(image)
    return predictor.features.clone(), predictor.original_size, predictor.input_size


def test_assigning_another_images_features_directly_is_never_stale(model):
    """Clients of the reference precompute embeddings and assign the predictor's attributes."""
    image_a, image_b = data.coins(), data.astronaut()[:300, :420]
    features_b, original_b, input_b = _features_and_sizes(model, image_b)
    fresh = SamPredictor(model)
    fresh.set_image(image_b)
    prompts = [
        dict(point_coords=np.array([[200, 120]]), point_labels=np.array([1])),
        dict(box=np.array([100, 50, 300, 250])),
        dict(point_coords=np.array([[200, 120], [50, 60]]), point_labels=np.array([1, 0]), multimask_output=False),
    ]
    expected = [fresh.predict(**prompt) for prompt in prompts]

    predictor = SamPredictor(model)
    predictor.set_image(image_a)
    predictor.predict(**prompts[0])  # builds the per-image decoder work for image A
    predictor.features, predictor.original_size, predictor.input_size = features_b, original_b, input_b
    predictor.is_image_set = True
    for prompt, (masks, iou, low_res) in zip(prompts, expected):
        got = predictor.predict(**prompt)
        np.testing.assert_array_equal(got[0], masks)
        np.testing.assert_allclose(got[1], iou, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[2], low_res, rtol=1e-4, atol=1e-4)

    # The same when the features tensor is overwritten in place.
    predictor.set_image(image_a)
    predictor.predict(**prompts[0])
    predictor.features.copy_(features_b)
    predictor.original_size, predictor.input_size = original_b, input_b
    got = predictor.predict(**prompts[1])
    np.testing.assert_array_equal(got[0], expected[1][0])


def test_small_model_takes_sams_256_mask_prompts():
    model = build_sam("vit_small", device="cpu")
    predictor = SamPredictor(model)
    predictor.set_image(data.coins())
    own = tuple(model.prompt_encoder.mask_input_size)
    assert own != (256, 256)  # the case this test is about
    point = dict(point_coords=np.array([[128, 82]]), point_labels=np.array([1]))
    masks, iou, low_res = predictor.predict(**point, multimask_output=False)
    assert low_res.shape == (1, *own)
    # A client that keeps SAM-size logits sends 256x256; the documented rule (bilinear, half-pixel
    # centres: the mean of each 2x2 block) turns 2x2 blocks of equal logits back into the model's own.
    logits_256 = np.repeat(np.repeat(low_res, 2, axis=1), 2, axis=2)
    refined_own, iou_own, _ = predictor.predict(**point, mask_input=low_res, multimask_output=False)
    refined_256, iou_256, low_res_256 = predictor.predict(**point, mask_input=logits_256, multimask_output=False)
    assert low_res_256.shape == (1, *own)
    assert refined_own.any() and not np.array_equal(refined_own, masks)  # the mask prompt took effect
    np.testing.assert_array_equal(refined_256, refined_own)
    np.testing.assert_allclose(iou_256, iou_own, rtol=1e-5)
    # Smooth (bilinear) upsampled logits give nearly the same object.
    smooth_256 = torch.nn.functional.interpolate(
        torch.from_numpy(low_res)[None], (256, 256), mode="bilinear", align_corners=False
    )[0].numpy()
    refined_smooth, _, _ = predictor.predict(**point, mask_input=smooth_256, multimask_output=False)
    assert _box_iou(refined_smooth, refined_own) > 0.85
    with pytest.raises(ValueError, match=r"logits of 256x256 or 128x128 .*got shape \(1, 100, 100\)"):
        predictor.predict(**point, mask_input=np.zeros((1, 100, 100), np.float32))
    with pytest.raises(ValueError, match=r"logits of 256x256 or 128x128 .*got shape \(1, 64, 64\)"):
        predictor.predict_torch(None, None, mask_input=torch.zeros(1, 1, 64, 64))
