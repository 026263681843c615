"""vit_t (MobileSAM, TinyViT encoder) against an oracle: MobileSAM's TinyViT as shipped by
``segment-anything-hq`` 0.3, assembled with the reference ``segment_anything`` prompt encoder
and mask decoder into a reference ``Sam``, with the same random weights as ours."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

with warnings.catch_warnings():  # timm's deprecation warnings on segment_anything_hq's import
    warnings.simplefilter("ignore")
    tiny_vit_oracle = pytest.importorskip("segment_anything_hq.modeling.tiny_vit_sam")
segment_anything = pytest.importorskip("segment_anything")

from napari_sam import SamPredictor  # noqa: E402
from napari_sam.automatic_mask_generator import SamAutomaticMaskGenerator  # noqa: E402
from napari_sam.build import build_sam_vit_t, sam_model_registry  # noqa: E402
from napari_sam.models.registry import detect_model_type  # noqa: E402
from napari_sam.models.sam_vit import SamConfig  # noqa: E402
from napari_sam.models.tiny_vit_sam import TinyViTSamConfig  # noqa: E402


class OracleTinyViT(tiny_vit_oracle.TinyViT):
    """The oracle's TinyViT returning only the embedding (its forward also returns HQ-SAM's
    intermediate features), so that the reference Sam and SamPredictor can use it."""

    def forward(self, x):
        return super().forward(x)[0]


def oracle_sam() -> "segment_anything.modeling.Sam":
    """MobileSAM as its build_sam_vit_t assembles it, from the oracle's TinyViT and the reference's decoder."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    encoder = OracleTinyViT(
        img_size=1024, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0,
        mbconv_expand_ratio=4.0, local_conv_size=3,
    )
    prompts = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                            mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
        depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3,
        iou_head_hidden_dim=256)
    return Sam(encoder, prompts, decoder, [123.675, 116.28, 103.53], [58.395, 57.12, 57.375])


def load_oracle(model, state: dict) -> None:
    """Strict load, then eval(): the oracle caches its attention biases when switched to eval."""
    model.load_state_dict(state, strict=True)
    model.eval()


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Our vit_t's state dict with every constant-initialised tensor randomised too: batch-norm
    statistics and affines, layer norms, biases, attention bias tables; the hypernetwork
    outputs are scaled so mask logits leave [-1, 1]."""
    torch.manual_seed(seed)
    state = build_sam_vit_t().state_dict()
    generator = torch.Generator().manual_seed(seed + 1)

    def randn(shape):
        return torch.randn(shape, generator=generator)

    for name, tensor in state.items():
        if not tensor.dtype.is_floating_point:
            continue
        if name.endswith("running_var"):
            tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
        elif name.endswith("running_mean"):
            tensor.copy_(0.1 * randn(tensor.shape))
        elif name.endswith("attention_biases"):
            tensor.copy_(0.5 * randn(tensor.shape))
        elif tensor.ndim == 1 and name.endswith("weight"):  # batch and layer norms
            tensor.copy_(1.0 + 0.2 * randn(tensor.shape))
        elif name.endswith("bias"):
            tensor.copy_(0.05 * randn(tensor.shape))
    for i in range(4):
        state[f"mask_decoder.output_hypernetworks_mlps.{i}.layers.2.weight"].mul_(8.0)
    return state


@pytest.fixture(scope="module")
def state():
    return random_state()


@pytest.fixture(scope="module")
def models(state):
    ours = sam_model_registry["vit_t"]()
    ours.load_state_dict(state, strict=True)
    oracle = oracle_sam()
    load_oracle(oracle, state)
    return ours.eval(), oracle


@pytest.fixture(scope="module")
def predictors(models, truck):
    ours, oracle = models
    mine, reference = SamPredictor(ours), segment_anything.SamPredictor(oracle)
    mine.set_image(truck)
    reference.set_image(truck)
    return mine, reference


def test_state_dict_keys_are_mobile_sam(state):
    assert "image_encoder.patch_embed.seq.0.c.weight" in state
    assert "image_encoder.layers.0.blocks.1.conv3.bn.running_var" in state
    assert state["image_encoder.layers.2.blocks.5.attn.attention_biases"].shape == (5, 196)
    assert state["image_encoder.head.weight"].shape == (1000, 320)
    assert "image_encoder.norm_head.weight" in state and "image_encoder.neck.3.bias" in state
    assert not any("offset_index" in key or "attention_bias_idxs" in key for key in state)


def test_steps_cover_every_block(models):
    encoder = models[0].image_encoder
    assert encoder.img_size == 1024 and encoder.pos_embed is None
    assert len(encoder.blocks) == 2 + 2 + 6 + 2


def test_image_embedding_matches_oracle(predictors):
    mine, reference = predictors
    assert mine.features.shape == reference.features.shape == (1, 256, 64, 64)
    assert mine.input_size == reference.input_size and mine.original_size == reference.original_size
    assert reference.features.abs().max() > 1.0  # not a degenerate embedding
    torch.testing.assert_close(mine.features, reference.features, atol=1e-4, rtol=0)


def test_forward_equals_steps(models, predictors, truck):
    """The encoder's own forward computes what the predictor's step-by-step walk computed."""
    ours, mine = models[0], predictors[0]
    image = torch.as_tensor(mine.transform.apply_image(truck)).permute(2, 0, 1)[None]
    with torch.no_grad():
        direct = ours.image_encoder(ours.preprocess(image.float()))
    torch.testing.assert_close(mine.features, direct, atol=1e-5, rtol=0)


def _prompts(height: int, width: int) -> list[dict]:
    return [
        dict(point_coords=np.array([[width * 0.45, height * 0.55]]), point_labels=np.array([1])),
        dict(point_coords=np.array([[width * 0.3, height * 0.4], [width * 0.6, height * 0.5]]),
             point_labels=np.array([1, 0])),
        dict(box=np.array([width * 0.1, height * 0.2, width * 0.7, height * 0.9]), multimask_output=False),
        dict(box=np.array([width * 0.2, height * 0.1, width * 0.9, height * 0.7]),
             point_coords=np.array([[width * 0.5, height * 0.4]]), point_labels=np.array([0])),
    ]


def test_masks_match_oracle(predictors, truck):
    mine, reference = predictors
    for prompt in _prompts(*truck.shape[:2]):
        ours = mine.predict(**prompt, return_logits=True)
        ref = reference.predict(**prompt, return_logits=True)
        assert np.abs(ours[0]).max() > 1.0
        np.testing.assert_allclose(ours[0], ref[0], atol=1e-3, rtol=0)
        np.testing.assert_allclose(ours[1], ref[1], atol=1e-3, rtol=0)
        np.testing.assert_allclose(ours[2], ref[2], atol=1e-3, rtol=0)
    # Mask input: the low-res logits of the last prediction fed back with a point.
    point = dict(point_coords=np.array([[truck.shape[1] * 0.5, truck.shape[0] * 0.5]]), point_labels=np.array([1]))
    mask_input = ref[2][:1]
    ours_m = mine.predict(**point, mask_input=mask_input, multimask_output=False, return_logits=True)
    ref_m = reference.predict(**point, mask_input=mask_input, multimask_output=False, return_logits=True)
    np.testing.assert_allclose(ours_m[0], ref_m[0], atol=1e-3, rtol=0)
    np.testing.assert_allclose(ours_m[1], ref_m[1], atol=1e-3, rtol=0)


def test_checkpoint_round_trip(models, state, tmp_path):
    """Ours -> oracle -> a fresh ours -> file -> build_sam_vit_t, all strict and bit-identical."""
    ours, _ = models
    oracle = oracle_sam()
    load_oracle(oracle, ours.state_dict())
    back = sam_model_registry["vit_t"]()
    back.load_state_dict(oracle.state_dict(), strict=True)
    path = tmp_path / "vit_t.pth"
    torch.save(back.state_dict(), path)
    loaded = build_sam_vit_t(checkpoint=path)
    for name, tensor in state.items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def _shape_state(model_type: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return sam_model_registry[model_type]().state_dict()


def test_detect_model_type(state):
    assert detect_model_type(state) == "vit_t"
    vit_b, vit_test = _shape_state("vit_b"), _shape_state("vit_test")
    assert detect_model_type(vit_b) == "vit_b"
    assert detect_model_type(vit_test) == "vit_test"
    config = TinyViTSamConfig()
    assert config.fits(state) and not config.fits(vit_b) and not config.fits(vit_test)
    assert not SamConfig(768, 12, 12, (2, 5, 8, 11)).fits(state)
    # A TinyViT of other sizes (e.g. a wider stage) is not MobileSAM.
    other = dict(state)
    other["image_encoder.layers.3.blocks.0.attn.attention_biases"] = torch.zeros(8, 49)
    assert not config.fits(other)
    assert not config.fits({k: v for k, v in state.items() if not k.startswith("image_encoder.layers.3.")})


def test_automatic_masks_run(models, truck):
    crop = np.ascontiguousarray(truck[300:556, 400:784])
    generator = SamAutomaticMaskGenerator(models[0], points_per_side=4, pred_iou_thresh=0.0,
                                          stability_score_thresh=0.0)
    masks = generator.generate(crop)
    assert isinstance(masks, list)
    for record in masks:
        assert record["segmentation"].shape == crop.shape[:2]
