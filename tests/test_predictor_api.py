"""SamPredictor beyond parity: errors, image inputs, reduced precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from napari_sam import SamPredictor, sam_model_registry


@pytest.fixture(scope="module")
def model(checkpoint_factory):
    return sam_model_registry["vit_test"](checkpoint=checkpoint_factory("vit_test"))


def test_prediction_before_set_image_raises(model):
    predictor = SamPredictor(model)
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(point_coords=np.array([[1, 1]]), point_labels=np.array([1]))
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.get_image_embedding()
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict_torch(None, None, boxes=torch.zeros(1, 4))


def test_bad_prompts_raise_clear_errors(model):
    predictor = SamPredictor(model)
    predictor.set_image(data.coins())
    with pytest.raises(ValueError, match="needs a prompt"):
        predictor.predict()
    with pytest.raises(ValueError, match="point_labels must be given"):
        predictor.predict(point_coords=np.array([[10, 10]]))
    with pytest.raises(ValueError, match="Nx2"):
        predictor.predict(point_coords=np.array([10, 10]), point_labels=np.array([1]))
    with pytest.raises(ValueError, match="predict_torch"):
        predictor.predict(box=np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"logits of 256x256 \(1xhxw for predict"):
        predictor.predict(point_coords=np.array([[10, 10]]), point_labels=np.array([1]), mask_input=np.zeros((256, 256)))
    with pytest.raises(ValueError, match="RGB"):
        predictor.set_image(data.astronaut(), image_format="HSV")
    with pytest.raises(ValueError, match="long side 1024"):
        predictor.set_torch_image(torch.zeros(1, 4, 1024, 1024), (1024, 1024))


def test_reset_image(model):
    predictor = SamPredictor(model)
    predictor.set_image(data.coins())
    assert predictor.is_image_set and predictor.features.shape == (1, 256, 64, 64)
    assert predictor.original_size == (303, 384) and predictor.input_size == (808, 1024)
    predictor.reset_image()
    assert not predictor.is_image_set and predictor.features is None and predictor.original_size is None


def test_grayscale_and_16_bit_images_embed_as_their_rgb_conversion(model):
    gray = data.coins()
    predictor, expected = SamPredictor(model), SamPredictor(model)
    expected.set_image(np.repeat(gray[..., None], 3, axis=2))
    for variant in (gray, gray[..., None]):
        predictor.set_image(variant)
        assert torch.equal(predictor.features, expected.features)
    as_uint16 = gray.astype(np.uint16) * 257  # full 16-bit range, same picture
    predictor.set_image(as_uint16, contrast_limits=(0, 65535))
    assert torch.equal(predictor.features, expected.features)


def test_rgba_and_bgr(model):
    rgb = data.astronaut()
    reference, predictor = SamPredictor(model), SamPredictor(model)
    reference.set_image(rgb)
    predictor.set_image(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]))
    assert torch.equal(predictor.features, reference.features)
    predictor.set_image(np.ascontiguousarray(rgb[..., ::-1]), image_format="BGR")
    assert torch.equal(predictor.features, reference.features)


def test_float64_never_reaches_the_model(model):
    """Float64 prompts (as numpy gives them) are cast before the model (reference #94)."""
    seen = []

    def record(module, inputs, output):
        seen.extend(t.dtype for t in inputs if isinstance(t, torch.Tensor))
        seen.extend(t.dtype for t in (output if isinstance(output, tuple) else (output,)) if isinstance(t, torch.Tensor))

    handles = [m.register_forward_hook(record) for m in model.modules()]
    try:
        predictor = SamPredictor(model)
        predictor.set_image(data.coins().astype(np.float64))
        predictor.predict(point_coords=np.array([[100.0, 120.0]]), point_labels=np.array([1]), box=np.array([5.0, 5, 200, 200]))
    finally:
        for handle in handles:
            handle.remove()
    assert seen and torch.float64 not in seen


def test_bf16_precision_close_to_fp32(model, groceries):
    fp32, bf16 = SamPredictor(model), SamPredictor(model, precision="bf16")
    fp32.set_image(groceries)
    bf16.set_image(groceries)
    assert bf16.features.dtype == torch.float32
    prompts = dict(point_coords=np.array([[400, 250], [600, 100]]), point_labels=np.array([1, 0]))
    masks32, _, _ = fp32.predict(**prompts)
    masks16, iou16, low16 = bf16.predict(**prompts)
    assert iou16.dtype == low16.dtype == np.float32
    for a, b in zip(masks32, masks16):
        iou = np.logical_and(a, b).sum() / np.logical_or(a, b).sum()
        assert iou >= 0.97


def test_precision_validation(model):
    with pytest.raises(ValueError, match="precision"):
        SamPredictor(model, precision="int4")
    with pytest.raises(ValueError, match="needs a GPU"):
        SamPredictor(model, precision="fp16")


def test_bf16_large_batch_then_single_prompt(model, groceries):
    """The per-image decoder cache is built in float32 whatever precision runs first."""
    fp32, bf16 = SamPredictor(model), SamPredictor(model, precision="bf16")
    fp32.set_image(groceries)
    bf16.set_image(groceries)
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 500, size=(20, 2))
    boxes = torch.as_tensor(np.hstack([corners, corners + 200]), dtype=torch.float32)
    boxes = bf16.transform.apply_boxes_torch(boxes, groceries.shape[:2])
    masks, iou, low_res = bf16.predict_torch(None, None, boxes=boxes, multimask_output=False)
    assert masks.shape == (20, 1, *groceries.shape[:2]) and iou.dtype == low_res.dtype == torch.float32
    prompt = dict(point_coords=np.array([[300, 200]]), point_labels=np.array([1]))
    single16, _, _ = bf16.predict(**prompt)
    single32, _, _ = fp32.predict(**prompt)
    for a, b in zip(single16, single32):
        assert np.logical_and(a, b).sum() / np.logical_or(a, b).sum() >= 0.97


def test_embedding_steps_and_a_stored_embedding_give_the_same_masks(model):
    """The public embedding API: steps with progress, then predicting from a stored embedding
    in another predictor (no encoder work) gives the masks of set_image."""
    from napari_sam.predictor import ImageEmbedding

    image = data.coins()  # 303x384 grayscale
    direct = SamPredictor(model)
    direct.set_image(image)
    steps = SamPredictor(model).embedding_steps(image)
    progress = []
    while True:
        try:
            progress.append(next(steps))
        except StopIteration as stop:
            embedding = stop.value
            break
    total = len(model.image_encoder.blocks) + 1
    assert progress == [(step, total) for step in range(1, total + 1)]
    assert isinstance(embedding, ImageEmbedding)
    assert embedding.original_size == (303, 384) and embedding.input_size == direct.input_size
    torch.testing.assert_close(embedding.features, direct.features, rtol=0, atol=0)
    assert embedding.nbytes == embedding.features.numel() * 4

    stored = SamPredictor(model)
    stored.set_image_embedding(direct.image_embedding)
    prompt = dict(point_coords=np.array([[200.0, 150.0]]), point_labels=np.array([1]))
    for a, b in zip(direct.predict(**prompt), stored.predict(**prompt)):
        np.testing.assert_array_equal(a, b)
    assert (stored.orig_h, stored.orig_w) == (303, 384) and stored.is_image_set


def test_set_image_embedding_rejects_what_does_not_fit(model):
    from napari_sam.predictor import ImageEmbedding

    predictor = SamPredictor(model)
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.image_embedding  # noqa: B018
    good = torch.zeros(1, 256, 64, 64)
    with pytest.raises(ValueError, match=r"expects \(1, 256, 64, 64\)"):
        predictor.set_image_embedding(ImageEmbedding(torch.zeros(1, 128, 32, 32), (10, 10), (1024, 1024)))
    with pytest.raises(ValueError, match="long side 1024"):
        predictor.set_image_embedding(ImageEmbedding(good, (10, 20), (256, 512)))
    assert not predictor.is_image_set
