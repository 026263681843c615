"""Training code: prompt simulation, losses, a learning step, fine-tuning, resume, synthetic data, CLI.

Small models only (a 128 px variant of vit_small for full training, vit_small with random
weights for decoder-only fine-tuning), one torch thread, each test a few seconds.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import draw, io

from napari_sam.build import MODEL_CONFIGS, build_sam_from_config
from napari_sam.training import losses
from napari_sam.training.cli import main as train_cli
from napari_sam.training.parallel import Replica
from napari_sam.training.prompts import (
    BOX_NOISE_FRACTION,
    BOX_NOISE_MAX_AT_1024,
    corrective_points,
    mask_boxes,
    noisy_boxes,
    sample_points_in,
)
from napari_sam.training.synthetic import (
    HELDOUT_SEED,
    MAX_OVERLAP_WITHOUT_OCCLUSION,
    _label_edges,
    _place_objects,
    heldout_set,
    synthetic_image,
)
from napari_sam.training.checkpointing import read_training_progress
from napari_sam.training.config import TrainConfig
from napari_sam.training.data import AnnotatedImages, SyntheticData, prepare
from napari_sam.training.initialization import init_from_scratch
from napari_sam.training.step import StepFunctions, iou_head_step, training_step
from napari_sam.training.trainer import step_loss, train

# vit_small's layout, shrunk: 128 px input, 8 px patches (16x16 grid), 2 blocks of width 32.
TINY_CONFIG = dataclasses.replace(
    MODEL_CONFIGS["vit_small"], embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), img_size=128,
    window_size=8, decoder_mlp_dim=256,
)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 0):
    # init_from_scratch re-draws linear layers, norms and pos_embed only; convolutions, embeddings
    # and the prompt encoder's random Fourier features are drawn at construction, from the global RNG
    torch.manual_seed(seed)
    return init_from_scratch(build_sam_from_config(TINY_CONFIG), seed=seed)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """A random-weight vit_small checkpoint (the bundled weights may not exist yet)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("small") / "random_vit_small.pth"
    torch.save(build_sam_from_config(MODEL_CONFIGS["vit_small"]).state_dict(), path)
    return path


def annotated_pair(seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    sample = synthetic_image(np.random.default_rng(seed), shape=(size, size), kind="nuclei", min_area=16)
    assert sample.labels.max() > 0
    return sample.image, sample.labels


# --------------------------------------------------------------------------- prompts
def shape_masks(size: int = 64) -> torch.Tensor:
    """Disk, ellipse, triangle, thin rectangle and a crescent (non-convex), as KxHxW bool."""
    masks = np.zeros((5, size, size), bool)
    masks[0][draw.disk((20, 30), 9, shape=(size, size))] = True
    masks[1][draw.ellipse(40, 20, 6, 15, shape=(size, size), rotation=0.5)] = True
    masks[2][draw.polygon([5, 50, 30], [5, 10, 60], shape=(size, size))] = True
    masks[3][10:13, 40:62] = True
    masks[4][draw.disk((32, 32), 14, shape=(size, size))] = True
    masks[4][draw.disk((32, 40), 11, shape=(size, size))] = False
    return torch.from_numpy(masks)


def test_sample_points_in_lies_inside_each_mask():
    masks = shape_masks()
    repeated = masks.repeat(40, 1, 1)
    points = sample_points_in(repeated, torch.Generator().manual_seed(0))
    assert points.shape == (len(repeated), 2) and points.dtype == torch.float32
    x, y = points[:, 0].long(), points[:, 1].long()
    assert torch.equal(points, points.round()), "points are pixel indices"
    assert repeated[torch.arange(len(repeated)), y, x].all(), "every point lies on its mask"


def test_sample_points_in_is_uniform_and_handles_empty_masks():
    # two disjoint squares of 100 and 400 pixels: a uniform draw lands in the big one 80 % of the time
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, 2:12, 2:12] = True
    mask[0, 30:50, 30:50] = True
    points = sample_points_in(mask.expand(4000, -1, -1), torch.Generator().manual_seed(1))
    in_big = (points[:, 0] >= 30).float().mean().item()
    assert abs(in_big - 0.8) < 0.03
    empty = sample_points_in(torch.zeros(2, 40, 60, dtype=torch.bool), torch.Generator().manual_seed(0))
    assert torch.equal(empty, torch.tensor([[30.0, 20.0], [30.0, 20.0]]))


def test_noisy_boxes_near_tight_box_ordered_and_inside_image():
    size = 256  # a 256 px model input: the noise cap is 20 * 256 / 1024 = 5 px
    cap = BOX_NOISE_MAX_AT_1024 * size / 1024
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    masks[0, 100:120, 50:70] = True  # 20 px box: noise std 2 px (10 % of the side)
    masks[1, 5:250, 0:240] = True  # large box touching the image border: std capped at 5 px
    count = 1000
    repeated = masks.repeat_interleave(count, 0)
    boxes = noisy_boxes(repeated, torch.Generator().manual_seed(0), size)
    tight = mask_boxes(repeated)
    assert torch.equal(mask_boxes(masks), torch.tensor([[50.0, 100.0, 69.0, 119.0], [0.0, 5.0, 239.0, 249.0]]))
    assert boxes.shape == (2 * count, 4)
    assert (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all()
    assert (boxes >= 0).all() and (boxes <= size - 1).all()
    stds = torch.tensor([BOX_NOISE_FRACTION * 20, cap])
    deviation = (boxes - tight).abs().reshape(2, count, 4)
    # Gaussian noise: never beyond 5 standard deviations, and the small box's spread is ~2 px
    assert (deviation <= 5 * stds[:, None, None] + 1e-4).all()
    assert (deviation <= 5 * cap + 1e-4).all()
    small_std = (boxes[:count] - tight[:count]).std(0)
    assert torch.allclose(small_std, torch.full((4,), 2.0), rtol=0.15)
    # the large box's right and bottom edges are free to move both ways: spread ~ the 5 px cap
    large = (boxes[count:] - tight[count:])[:, 2]
    assert abs(large.std().item() - cap) < 0.15 * cap


def test_corrective_points_label_missed_and_spilled_pixels():
    target = torch.zeros(1, 48, 48, dtype=torch.bool)
    target[0, 10:30, 10:30] = True
    predicted = torch.zeros_like(target)
    predicted[0, 15:35, 15:35] = True  # shifted: misses part of the object, spills over elsewhere
    count = 500
    points, labels = corrective_points(
        predicted.expand(count, -1, -1).clone(), target.expand(count, -1, -1).clone(), torch.Generator().manual_seed(0)
    )
    x, y = points[:, 0].long(), points[:, 1].long()
    missed = target[0] & ~predicted[0]
    spilled = predicted[0] & ~target[0]
    positive = labels == 1
    assert set(labels.tolist()) == {0.0, 1.0}
    assert missed[y[positive], x[positive]].all(), "positive clicks lie on missed object pixels"
    assert spilled[y[~positive], x[~positive]].all(), "negative clicks lie on false-positive pixels"
    # missed and spilled regions have equal areas here: about half the clicks are positive
    assert abs(positive.float().mean().item() - 0.5) < 0.08
    # a perfect prediction gets a positive click inside the object
    points, labels = corrective_points(target.clone(), target.clone(), torch.Generator().manual_seed(0))
    assert labels.tolist() == [1.0] and target[0, int(points[0, 1]), int(points[0, 0])]


# --------------------------------------------------------------------------- losses
def test_losses_small_for_confident_correct_and_large_for_inverse():
    target = torch.zeros(2, 32, 32, dtype=torch.bool)
    target[0, 4:20, 6:30] = True
    target[1, 10:12, 10:25] = True  # a small object: dice still ~0 when right
    correct = torch.where(target, 20.0, -20.0).unsqueeze(1)  # Kx1xHxW logits
    inverse = -correct
    assert (losses.dice_loss(correct, target.float().unsqueeze(1)) < 1e-3).all()
    assert (losses.dice_loss(inverse, target.float().unsqueeze(1)) > 0.97).all()
    good, bad = losses.mask_loss(correct, target), losses.mask_loss(inverse, target)
    assert good.shape == (2, 1) and bad.shape == (2, 1)
    assert (good < 1e-3).all()
    # every pixel confidently wrong: focal ~ alpha_t per pixel (0.25 or 0.75), times 20
    assert (bad > 20 * 0.25).all()
    # an uncertain prediction lies in between
    middle = losses.mask_loss(torch.zeros_like(correct), target)
    assert (good < middle).all() and (middle < bad).all()


def test_mask_iou_hand_example():
    target = torch.zeros(1, 4, 4, dtype=torch.bool)
    target[0, 0:2, 0:2] = True  # 4 pixels
    logits = torch.full((1, 3, 4, 4), -1.0)
    logits[0, 0, 0:2, 1:3] = 1.0  # 2 of them plus 2 outside: IoU 2 / 6
    logits[0, 1, 0:2, 0:2] = 1.0  # exact: IoU 1
    # output 2 predicts nothing: IoU 0
    iou = losses.mask_iou(logits, target)
    assert torch.allclose(iou, torch.tensor([[2 / 6, 1.0, 0.0]]))
    empty = losses.mask_iou(torch.full((1, 1, 4, 4), -1.0), torch.zeros(1, 4, 4, dtype=torch.bool))
    assert empty.item() == 1.0


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("rel_pos_zero_init", [True, False])
def test_training_attention_matches_the_reference_with_gradients(rel_pos_zero_init):
    """The training branch folds the relative-position terms into the queries and keys
    (``attention_with_rel_pos_keys``); on a non-square grid, so that rows and columns
    cannot be swapped unnoticed, its output and every gradient equal the reference's
    dense-bias attention."""
    reference_attention = pytest.importorskip("segment_anything.modeling.image_encoder").Attention
    from napari_sam.modeling.image_encoder import Attention

    grid, dim, heads = (5, 7), 32, 2
    torch.manual_seed(0)
    ours = Attention(dim, heads, use_rel_pos=True, rel_pos_zero_init=rel_pos_zero_init, input_size=grid)
    reference = reference_attention(dim, heads, use_rel_pos=True, input_size=grid)
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.normal_(0, 0.3)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(3, *grid, dim)
    outputs, gradients = [], []
    for module in (ours, reference):
        leaf = x.clone().requires_grad_()
        out = module(leaf)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(out.detach())
        gradients.append([leaf.grad] + [p.grad for p in module.parameters()])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    assert gradients[0][1:] and all(g is not None for g in gradients[0])
    for ours_grad, reference_grad in zip(*gradients):  # float32 rounding, relative to each gradient's size
        scale = float(reference_grad.abs().max())
        torch.testing.assert_close(ours_grad, reference_grad, rtol=1e-4, atol=1e-5 * scale)


def test_training_step_lowers_loss_on_fixed_batch():
    model = tiny_model().train()
    pairs = SyntheticData(seed=0).batch(0, 2)
    prepared = [prepare(model, image, labels) for image, labels in pairs]
    inputs = torch.stack([p[0] for p in prepared])
    labels = [p[1] for p in prepared]
    assert inputs.shape == (2, 3, 128, 128) and labels[0].shape == (128, 128)
    config = TrainConfig(objects_per_image=4, iterations=2, min_object_area=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    history = []
    for step in range(20):
        generator = torch.Generator().manual_seed(0)  # same objects and prompts every step
        loss, result = training_step(model, model.image_encoder(inputs), labels, config, generator, "box")
        assert result.objects == 8 and torch.isfinite(loss)
        assert abs(result.loss - (result.mask_loss + result.iou_loss)) < 1e-4 * max(1.0, result.loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(result.loss)
    assert history[-1] < 0.7 * history[0], history


@pytest.mark.parametrize("settings, message", [
    (dict(corrective_fraction=0.0), "corrective_fraction must be in \\(0, 1\\], got 0.0"),
    (dict(corrective_fraction=1.5), "corrective_fraction must be in"),
    (dict(distractor_probability=-0.1), "distractor_probability must be between 0 and 1"),
    (dict(processes=0), "processes must be at least 1, got 0"),
    (dict(iterations=0), "iterations must be at least 1"),
    (dict(steps=0), "steps must be at least 1"),
    (dict(warmup_steps=-1), "warmup_steps must be at least 0"),
    (dict(lr=0.0), "lr must be positive"),
    (dict(precision="fp16"), "precision must be 'fp32' or 'bf16'"),
])
def test_train_config_refuses_settings_out_of_range(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)
    with pytest.raises(ValueError, match=message):  # also when derived from a valid one
        dataclasses.replace(TrainConfig(), **settings)


@pytest.mark.parametrize("fraction, sizes", [(1.0, [8, 8, 8]), (0.5, [8, 4, 4]), (0.01, [8, 1, 1])])
def test_corrective_fraction_sends_a_share_of_the_objects_to_the_later_rounds(fraction, sizes):
    model = tiny_model().train()
    prepared = [prepare(model, image, labels) for image, labels in SyntheticData(seed=0).batch(0, 2)]
    inputs, labels = torch.stack([p[0] for p in prepared]), [p[1] for p in prepared]
    own = StepFunctions.for_model(model)
    seen = []

    def counting_predict_masks(embeddings, *args):
        seen.append(len(embeddings))
        return own.predict_masks(embeddings, *args)

    functions = dataclasses.replace(own, predict_masks=counting_predict_masks)
    config = TrainConfig(objects_per_image=4, iterations=3, min_object_area=4, corrective_fraction=fraction)
    loss, result = training_step(model, model.image_encoder(inputs), labels, config, torch.Generator().manual_seed(0),
                                 "point", functions=functions)
    assert seen == sizes and result.objects == 8 and torch.isfinite(loss)
    loss.backward()
    assert model.mask_decoder.iou_token.weight.grad.abs().sum() > 0


def test_compiled_training_matches_eager(tmp_path, monkeypatch):
    """torch_compile=True runs the compiled encoder, decoder and loss, with the eager losses.

    The graphs go through torch.compile's "aot_eager" backend: the same capture, dynamic
    shapes and autograd as the default backend, without its minutes of C++ code
    generation (experiments/bench_training_step.py runs the default one).
    """
    compile_calls = []

    def compile_aot_eager(function, **kwargs):
        compile_calls.append(kwargs)
        return original_compile(function, backend="aot_eager", **kwargs)

    original_compile = torch.compile
    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    config = TrainConfig(steps=2, objects_per_image=4, iterations=2, min_object_area=4, lr=1e-3, warmup_steps=1,
                         checkpoint_every=10)
    runs = {}
    for compiled in (False, True):
        losses_seen = []
        train(tiny_model(), SyntheticData(seed=0), dataclasses.replace(config, torch_compile=compiled),
              tmp_path / str(compiled), progress=lambda step, total, result: losses_seen.append(result.loss))
        runs[compiled] = losses_seen
    assert len(runs[True]) == 2 and runs[True][0] != runs[True][1]  # the weights moved
    assert compile_calls == [{}, {}, {}]  # encoder, decoder, loss (automatic dynamic shapes); eager run: none
    # same data, prompts and weights: the same losses up to the compiled kernels' rounding
    np.testing.assert_allclose(runs[True], runs[False], rtol=1e-3)
    model = tiny_model()
    functions = StepFunctions.for_model(model, compiled=True)
    assert functions.encode is not model.image_encoder and functions.mask_loss is not losses.mask_loss
    assert set(model.state_dict()) == set(tiny_model().state_dict())  # wrappers, the model is unchanged


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="needs a C++ compiler")
def test_compiled_decoder_default_backend_follows_changing_object_counts():
    """The decoder compiled by the default (inductor) backend, as ``--compile`` runs it, gives
    the eager logits and IoU predictions for object counts that change from call to call
    (with ``dynamic=True`` its code generation failed on torch 2.14)."""
    model = tiny_model()
    decoder = StepFunctions.for_model(model, compiled=True).predict_masks
    image_pe = model.prompt_encoder.get_dense_pe()  # 1 x C x h x w, the embedding's shape
    embedding = torch.randn(image_pe.shape, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(0)
    for count, points in ((3, 1), (5, 2), (2, 3)):
        coords = torch.rand((count, points, 2), generator=generator) * TINY_CONFIG.img_size
        sparse, dense = model.prompt_encoder(points=(coords, torch.ones((count, points))), boxes=None, masks=None)
        expected = model.mask_decoder.predict_masks(embedding.expand(count, -1, -1, -1), image_pe, sparse, dense)
        got = decoder(embedding.expand(count, -1, -1, -1), image_pe, sparse, dense)
        for a, b in zip(got, expected):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_data_parallel_step_is_the_object_weighted_mean_of_the_shares(tmp_path):
    """processes=2: two spawned-and-calling processes make the update that one process makes
    from the gradient of both halves of the batch, each weighted by its share of the objects.

    The expected update is computed here, in one process, from each replica's share
    (``step_loss``); the run's weights must match it to the last bits (1 thread each, and
    the all-reduce adds the two weighted gradients as autograd accumulates them).
    """
    config = TrainConfig(steps=1, images_per_step=3, objects_per_image=4, iterations=2, min_object_area=4, lr=1e-3,
                         warmup_steps=1, checkpoint_every=1, seed=5, processes=2)
    data = SyntheticData(seed=5)
    run_dir = tmp_path / "parallel"
    losses_seen = []
    trained = train(tiny_model(seed=5), data, config, run_dir,
                    progress=lambda done, total, result: losses_seen.append(result))
    assert torch.get_num_threads() == 1  # the caller's threads come back

    model = tiny_model(seed=5).train()
    functions = StepFunctions.for_model(model)
    shares = [step_loss(model, data, config, 0, functions, replica=Replica(rank, 2)) for rank in (0, 1)]
    counts = [result.objects for _, result in shares]
    assert min(counts) > 0 and counts[0] != counts[1]  # 2 images against 1: unequal weights are exercised
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    for loss, result in shares:
        (loss * (result.objects / sum(counts))).backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
    optimizer.step()
    expected = model.state_dict()
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-7, msg=name)
    assert not torch.equal(expected["mask_decoder.iou_token.weight"],
                           tiny_model(seed=5).state_dict()["mask_decoder.iou_token.weight"])
    # the progress and history report the whole batch once, from the calling process
    assert len(losses_seen) == 1 and losses_seen[0].objects == sum(counts)
    weighted = sum(result.loss * result.objects for _, result in shares) / sum(counts)
    assert losses_seen[0].loss == pytest.approx(weighted, rel=1e-6)
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["objects"] == sum(counts)
    # replica 1 drew its own prompts: its share is not replica 0's prompts on other images
    assert Replica(1, 2).prompt_seed(5, 0) != Replica(0, 2).prompt_seed(5, 0) == Replica().prompt_seed(5, 0)
    with pytest.raises(ValueError, match="processes=2"):  # resume with another process count
        train(tiny_model(seed=5), data, dataclasses.replace(config, steps=2, processes=1), run_dir)


def test_data_parallel_rejects_fewer_images_than_processes(tmp_path):
    config = TrainConfig(steps=1, images_per_step=1, processes=2)
    with pytest.raises(ValueError, match="at least as many images per step"):
        train(tiny_model(), SyntheticData(seed=0), config, tmp_path)


@pytest.mark.parametrize("tie", [False, True])
def test_tied_cross_attention_points_each_prompt_at_its_position(tie):
    # the final token-to-image attention, fed only the positional encodings: with tied
    # query and key projections a point's attention logits peak within two embedding cells
    # (16 px at vit_small's 256 px input) of the point; SAM's initialisation peaks anywhere
    torch.manual_seed(0)
    model = init_from_scratch(build_sam_from_config(MODEL_CONFIGS["vit_small"]), seed=0, tie_cross_attention=tie)
    encoder = model.prompt_encoder
    grid = encoder.get_dense_pe()[0]
    channels, height, width = grid.shape
    points = torch.rand(30, 2, generator=torch.Generator().manual_seed(1)) * 256
    queries = encoder.pe_layer.forward_with_coords(points[:, None], (256, 256))[:, 0]
    attention = model.mask_decoder.transformer.final_attn_token_to_image
    with torch.no_grad():
        logits = attention.q_proj(queries) @ attention.k_proj(grid.flatten(1).T).T
    best = logits.argmax(1)
    centres = torch.stack([best % width, best // width], 1).float() * (256 / width) + 128 / width
    near = ((centres - points).norm(dim=1) < 16).float().mean().item()
    if tie:
        assert near == 1.0
        for block in model.mask_decoder.transformer.layers:
            image_to_token = block.cross_attn_image_to_token
            assert torch.equal(image_to_token.k_proj.weight, image_to_token.q_proj.weight)
            assert not torch.equal(block.self_attn.k_proj.weight, block.self_attn.q_proj.weight)
    else:
        assert near < 0.3


def record_point_prompts(model) -> list:
    """Make the prompt encoder append each call's ``points`` ((coords, labels) or None) to the returned list."""
    seen = []
    encode = model.prompt_encoder.forward

    def recording(points, boxes, masks):
        seen.append(points)
        return encode(points, boxes, masks)

    model.prompt_encoder.forward = recording
    return seen


def test_distractor_negative_point_lies_on_another_object():
    model = tiny_model().train()
    prepared = [prepare(model, image, labels) for image, labels in SyntheticData(seed=0).batch(0, 2)]
    inputs = torch.stack([p[0] for p in prepared])
    labels = [p[1] for p in prepared]
    seen = record_point_prompts(model)
    first_rounds = {}
    for probability, expected in ((1.0, [1.0, 0.0]), (0.0, [1.0])):
        seen.clear()
        config = TrainConfig(objects_per_image=4, iterations=2, min_object_area=4, distractor_probability=probability)
        with torch.no_grad():
            training_step(model, model.image_encoder(inputs), labels, config, torch.Generator().manual_seed(0), "point")
        assert len(seen) == 2 and seen[1][0].shape[1] == len(expected) + 1  # then one corrective point
        coords, point_labels = seen[0]  # the first round's prompt
        assert (point_labels == torch.tensor(expected)).all()
        first_rounds[probability] = coords
    # objects are picked per image, in order: the owner of each prompt follows from the counts
    counts = [min(4, int(((torch.unique(l, return_counts=True)[1][1:]) >= 4).sum())) for l in labels]
    owners = [b for b, n in enumerate(counts) for _ in range(n)]
    assert len(owners) == len(first_rounds[1.0]) and len(set(owners)) == 2
    for b, (positive, negative) in zip(owners, first_rounds[1.0].long().tolist()):
        target = int(labels[b][positive[1], positive[0]])
        other = int(labels[b][negative[1], negative[0]])
        assert target > 0 and other > 0 and other != target
    # without distractors the positive points are the same draw
    assert torch.equal(first_rounds[0.0][:, 0], first_rounds[1.0][:, 0])


def test_distractor_on_an_image_with_one_object_stays_on_its_background():
    # a 64x128 image in the 128x128 input frame: rows 64-127 are padding
    model = tiny_model()
    labels = torch.zeros((128, 128), dtype=torch.int64)
    rr, cc = draw.disk((30, 40), 10)
    labels[rr, cc] = 1
    seen = record_point_prompts(model)
    config = TrainConfig(objects_per_image=1, iterations=1, min_object_area=4, distractor_probability=1.0)
    embeddings = model.image_encoder(torch.zeros((1, 3, 128, 128)))
    negatives = []
    with torch.no_grad():
        for seed in range(12):
            seen.clear()
            training_step(model, embeddings, [labels], config, torch.Generator().manual_seed(seed), "point",
                          extents=[(64, 128)])
            coords, point_labels = seen[0]
            assert point_labels.tolist() == [[1.0, 0.0]]
            negatives.append(coords[0, 1].long().tolist())
    for x, y in negatives:
        assert y < 64 and x < 128, (x, y)  # inside the image, not in the padding
        assert labels[y, x] == 0  # and off the object


def test_best_object_iou_hand_example():
    labels = torch.zeros(4, 6, dtype=torch.int64)
    labels[:, :2] = 1  # 8 px
    labels[:2, 3:] = 2  # 6 px
    masks = torch.zeros(2, 2, 4, 6, dtype=torch.bool)
    masks[0, 0, :, :2] = True  # object 1 exactly
    masks[0, 1, :, :3] = True  # object 1 and the empty column beside it: 8 / 12
    masks[1, 0, :2, 4:] = True  # 4 of object 2's 6 pixels, nothing else
    # masks[1, 1] is empty: IoU 0 with every object
    expected = torch.tensor([[1.0, 8 / 12], [4 / 6, 0.0]])
    assert torch.allclose(losses.best_object_iou(masks, labels), expected)
    assert torch.equal(losses.best_object_iou(masks, torch.zeros_like(labels)), torch.zeros(2, 2))


def test_iou_head_step_fits_the_best_object_iou_of_each_output():
    model = tiny_model().train()
    pairs = SyntheticData(seed=0).batch(0, 2)
    prepared = [prepare(model, image, labels) for image, labels in pairs]
    with torch.no_grad():
        embeddings = model.image_encoder(torch.stack([p[0] for p in prepared]))
    labels = [p[1] for p in prepared]
    extents = [(128, 128)] * 2
    model.requires_grad_(False)
    head = model.mask_decoder.iou_prediction_head.requires_grad_(True)
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0.0)
    config = TrainConfig(objects_per_image=16, iou_head_only=True)
    history = []
    for _ in range(40):
        loss, result = iou_head_step(model, embeddings, labels, extents, config, torch.Generator().manual_seed(0))
        assert result.objects == 32 and 0.0 <= result.last_round_iou <= 1.0
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(result.loss)
    assert history[-1] < 0.3 * history[0], history


def test_iou_head_calibration_changes_only_the_head(tmp_path):
    model = tiny_model()
    model.image_encoder.requires_grad_(False)  # a flag the run must leave as it found it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    config = TrainConfig(steps=3, images_per_step=2, objects_per_image=8, lr=1e-3, warmup_steps=1,
                         iou_head_only=True, checkpoint_every=10)
    train(model, SyntheticData(seed=0), config, tmp_path / "run", log_every=1)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert changed == {k for k in before if k.startswith("mask_decoder.iou_prediction_head.")}
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3] and all(h["mask_loss"] == 0.0 for h in history)

    class Failing(SyntheticData):  # the data source breaks at step 1, as an interrupted run would
        def batch(self, step, count):
            if step == 1:
                raise KeyboardInterrupt
            return super().batch(step, count)

    with pytest.raises(KeyboardInterrupt):
        train(model, Failing(seed=0), dataclasses.replace(config, steps=5), tmp_path / "interrupted")
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags


def _parameters(state: dict, prefix: str) -> dict:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def test_decoder_only_finetuning_changes_only_the_decoder(small_checkpoint, tmp_path):
    import napari_sam

    model = napari_sam.build_sam(str(small_checkpoint), device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pairs = [annotated_pair(1), annotated_pair(2)]
    data = AnnotatedImages([p[0] for p in pairs], [p[1] for p in pairs], seed=0)
    config = TrainConfig(steps=3, images_per_step=2, objects_per_image=4, iterations=2, lr=1e-3, warmup_steps=1,
                         decoder_only=True, checkpoint_every=2)
    calls = []
    train(model, data, config, tmp_path / "run", progress=lambda done, total, result: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    loaded = napari_sam.build_sam(str(tmp_path / "run" / "model.pth"), device="cpu")
    after = loaded.state_dict()
    assert set(after) == set(before)
    for name in _parameters(before, "image_encoder."):
        assert torch.equal(after[name], before[name]), f"{name} changed in decoder-only training"
    changed = [k for k in _parameters(before, "mask_decoder.") if not torch.equal(after[k], before[k])]
    assert len(changed) > 0.5 * len(_parameters(before, "mask_decoder.")), "the mask decoder trained"
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 3 and np.isfinite(history[-1]["loss"])


def test_init_from_scratch_seed_fixes_all_initial_weights():
    torch.manual_seed(1)
    a = init_from_scratch(build_sam_from_config(TINY_CONFIG), seed=0).state_dict()
    torch.manual_seed(2)
    b = init_from_scratch(build_sam_from_config(TINY_CONFIG), seed=0).state_dict()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


def test_init_from_scratch_positional_encoding_scale_multiplies_the_fourier_matrix():
    def matrix(scale):
        model = init_from_scratch(build_sam_from_config(TINY_CONFIG), seed=0, positional_encoding_scale=scale)
        return model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    base = matrix(1.0)
    assert 0.5 < float(base.std()) < 1.5  # SAM's scale 1: standard normal
    torch.testing.assert_close(matrix(3.0), 3.0 * base)


def test_cli_scratch_is_reproducible(tmp_path):
    argv = ["--steps", "1", "--images-per-step", "1", "--objects-per-image", "2", "--iterations", "1",
            "--model-type", "vit_small", "--seed", "5"]
    torch.manual_seed(1)
    assert train_cli(["scratch", str(tmp_path / "a"), *argv]) == 0
    torch.manual_seed(2)  # whatever the global RNG state, --seed fixes the run
    assert train_cli(["scratch", str(tmp_path / "b"), *argv]) == 0
    a = torch.load(tmp_path / "a" / "model.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # --tie-cross-attention reaches the initialisation: one step later, keys still track queries
    assert train_cli(["scratch", str(tmp_path / "c"), *argv, "--tie-cross-attention"]) == 0
    c = torch.load(tmp_path / "c" / "model.pth", weights_only=True)
    name = "mask_decoder.transformer.final_attn_token_to_image"
    for state, tied in ((a, False), (c, True)):
        q, k = state[f"{name}.q_proj.weight"], state[f"{name}.k_proj.weight"]
        assert (torch.nn.functional.cosine_similarity(q.flatten(), k.flatten(), dim=0) > 0.9) == tied


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("how", ["interrupted", "extended"])
def test_resumed_run_ends_with_the_same_weights(tmp_path, how):
    """A run stopped after k steps and started again equals an uninterrupted run of N steps.

    "interrupted": the run is killed during step 3 of 4 (after the state of step 2 was saved),
    as Ctrl-C would; "extended": a finished run of k = 2 steps is continued to N = 4 steps
    (k within the warm-up, so the two runs had the same learning rates up to k).
    """
    config = TrainConfig(steps=4, images_per_step=1, objects_per_image=3, iterations=2, lr=1e-3, warmup_steps=2,
                         checkpoint_every=2, min_object_area=4, seed=3)
    data = SyntheticData(seed=3)
    reference = train(tiny_model(seed=3), data, config, tmp_path / "reference").state_dict()

    resumed_dir = tmp_path / "resumed"
    if how == "interrupted":
        def stop_at_three(done, total, result):
            if done == 3:
                raise _Interrupt

        with pytest.raises(_Interrupt):
            train(tiny_model(seed=3), data, config, resumed_dir, progress=stop_at_three)
        assert not (resumed_dir / "model.pth").exists()
    else:
        train(tiny_model(seed=3), data, dataclasses.replace(config, steps=2), resumed_dir)
    steps_seen = []
    resumed = train(tiny_model(seed=3), data, config, resumed_dir,
                    progress=lambda done, total, result: steps_seen.append(done))
    assert steps_seen == [3, 4], "the second call resumes after step 2 instead of starting over"
    state = resumed.state_dict()
    assert set(state) == set(reference)
    fresh = tiny_model(seed=3).state_dict()
    assert not torch.allclose(reference["mask_decoder.iou_token.weight"], fresh["mask_decoder.iou_token.weight"])
    for name, tensor in reference.items():
        assert torch.allclose(state[name], tensor, rtol=1e-5, atol=1e-6), name
    saved = torch.load(resumed_dir / "model.pth", map_location="cpu", weights_only=True)
    assert all(torch.equal(saved[k], state[k]) for k in state)


# --------------------------------------------------------------------------- synthetic data
def test_synthetic_image_labels_and_dtypes():
    dtypes, channels, kinds = set(), set(), set()
    for seed in range(60):
        sample = synthetic_image(np.random.default_rng(seed))
        image, labels = sample.image, sample.labels
        assert labels.dtype == np.int32
        assert labels.shape == image.shape[:2]
        assert image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
        ids = np.unique(labels)
        count = int(labels.max())
        assert set(ids.tolist()) - {0} == set(range(1, count + 1)), f"seed {seed}: labels not 1..N"
        assert max(labels.shape) == 256
        dtypes.add(image.dtype)
        channels.add(1 if image.ndim == 2 else 3)
        kinds.add(sample.kind)
        if seed >= 19 and {np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32)} <= dtypes \
                and channels == {1, 3} and kinds >= {"nuclei", "cells", "shapes"}:
            break
    assert dtypes == {np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32)}
    assert channels == {1, 3}
    assert kinds == {"nuclei", "cells", "shapes"}
    # same generator state, same sample
    a = synthetic_image(np.random.default_rng(7))
    b = synthetic_image(np.random.default_rng(7))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)


def test_heldout_set_is_deterministic_and_not_in_the_training_stream():
    first, second = heldout_set(count=3), heldout_set(count=3)
    for a, b in zip(first, second):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
        assert a.kind == "shapes" and a.labels.shape == (256, 256) and a.labels.max() > 0
    other = heldout_set(count=1, seed=1)[0]
    assert not np.array_equal(other.labels, first[0].labels)
    assert HELDOUT_SEED >= 10**9
    # the training stream (seeds [seed, step, i]) never produces a held-out image
    training = [labels for step in range(3) for _, labels in SyntheticData(seed=0).batch(step, 2)]
    for held in first:
        assert not any(t.shape == held.labels.shape and np.array_equal(t, held.labels) for t in training)


def test_occlusion_off_keeps_objects_whole_and_touching():
    # the same candidates, with and without occlusion: without it every object keeps at
    # least 90 % of the pixels it was drawn with; with it some objects lose more
    cut_with, cut_without, touching = 0, 0, 0
    for seed in range(8):
        for occlusion in (True, False):
            labels, objects = _place_objects(
                np.random.default_rng(seed), (256, 256), "shapes", ("star", "crescent", "ellipse"), 0.4, 25, occlusion
            )
            visible = np.bincount(labels.ravel(), minlength=len(objects) + 1)
            kept = np.array([visible[o["index"]] / o["drawn_area"] for o in objects])
            if occlusion:
                cut_with += int((kept < 1 - MAX_OVERLAP_WITHOUT_OCCLUSION).sum())
            else:
                cut_without += int((kept < 1 - MAX_OVERLAP_WITHOUT_OCCLUSION).sum())
                touching += int(_label_edges(labels, between_objects=True).any())
    assert cut_without == 0
    assert cut_with > 0
    assert touching >= 4  # objects still touch in most images
    # heldout_set(occlusion=False) is built the same way
    sample = heldout_set(count=1, occlusion=False)[0]
    assert sample.labels.max() > 0 and sample.labels.shape == (256, 256)


def test_synthetic_data_stream_and_kind_weights():
    # the default stream is the generator's own draw from (seed, step, index): the shipped
    # model's first training phase depends on it staying so
    image, labels = SyntheticData(seed=4).batch(7, 2)[1]
    direct = synthetic_image(np.random.default_rng([4, 7, 1]))
    assert np.array_equal(image, direct.image) and np.array_equal(labels, direct.labels)
    # kind weights pick the kind per image; a single kind gives exactly that kind's images
    only_cells = SyntheticData(seed=4, kind_weights={"cells": 1.0}).batch(7, 2)
    cells = SyntheticData(seed=4, kind="cells").batch(7, 2)
    for (a, la), (b, lb) in zip(only_cells, cells):
        assert np.array_equal(a, b) and np.array_equal(la, lb)
    mixed = SyntheticData(seed=4, kind_weights={"shapes": 2.0, "nuclei": 1.0, "cells": 1.0})
    again = SyntheticData(seed=4, kind_weights={"shapes": 2.0, "nuclei": 1.0, "cells": 1.0})
    for (a, la), (b, lb) in zip(mixed.batch(3, 3), again.batch(3, 3)):
        assert np.array_equal(a, b) and np.array_equal(la, lb)
    # occlusion_probability 0: every image is the generator's draw without occlusion
    image, labels = SyntheticData(seed=4, occlusion_probability=0.0).batch(7, 2)[1]
    direct = synthetic_image(np.random.default_rng([4, 7, 1]), occlusion=False)
    assert np.array_equal(image, direct.image) and np.array_equal(labels, direct.labels)


def test_synthetic_data_shapes_restrict_the_shapes_kind():
    from skimage.measure import regionprops

    data = SyntheticData(seed=4, kind="shapes", shapes=("ellipse",), occlusion_probability=0.0)
    pairs = data.batch(7, 3)
    image, labels = pairs[1]
    direct = synthetic_image(np.random.default_rng([4, 7, 1]), kind="shapes", shapes=("ellipse",), occlusion=False)
    assert np.array_equal(image, direct.image) and np.array_equal(labels, direct.labels)
    # ellipses that touch without overlapping stay (nearly) convex; the default mix has crescents
    solidity = [r.solidity for _, lab in pairs for r in regionprops(lab) if r.area >= 50]
    assert solidity and min(solidity) > 0.85
    # other kinds drawn by kind_weights are unaffected
    nuclei = SyntheticData(seed=4, kind_weights={"nuclei": 1.0}, shapes=("ellipse",)).batch(7, 2)
    plain = SyntheticData(seed=4, kind="nuclei").batch(7, 2)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(nuclei, plain))
    with pytest.raises(ValueError, match="kind='shapes' or kind_weights"):
        SyntheticData(shapes=("ellipse",))
    with pytest.raises(ValueError, match="non-empty choice"):
        SyntheticData(kind="shapes", shapes=("square",))


# --------------------------------------------------------------------------- CLI
def write_dataset(folder: Path, seeds=(1, 2)) -> tuple[Path, Path]:
    images, labels = folder / "images", folder / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for seed in seeds:
        image, label = annotated_pair(seed)
        io.imsave(images / f"cell_{seed}.tif", image, check_contrast=False)
        io.imsave(labels / f"cell_{seed}_labels.tif", label, check_contrast=False)
    return images, labels


def test_cli_finetune_end_to_end(small_checkpoint, tmp_path, capsys):
    import napari_sam

    images, labels = write_dataset(tmp_path)
    out = tmp_path / "out"
    argv = ["finetune", str(out), "--images", str(images), "--labels", str(labels), "--model", str(small_checkpoint),
            "--decoder-only", "--steps", "2", "--images-per-step", "2", "--objects-per-image", "3",
            "--iterations", "2", "--lr", "1e-3", "--threads", "1", "--corrective-fraction", "0.5"]
    assert train_cli(argv) == 0
    captured = capsys.readouterr()
    assert str(out / "model.pth") in captured.out
    assert "training" in captured.err  # the tqdm bar
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "finetune" and len(run["images"]) == 2 and run["config"]["decoder_only"] is True
    assert run["config"]["corrective_fraction"] == 0.5
    model = napari_sam.build_sam(str(out / "model.pth"), device="cpu")
    original = torch.load(small_checkpoint, map_location="cpu", weights_only=True)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in original.items() if k.startswith("image_encoder."))
    assert any(not torch.equal(state[k], v) for k, v in original.items() if k.startswith("mask_decoder."))

    # a finished run is not replaced without --overwrite
    assert train_cli(argv) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_iou_head_only_changes_only_the_head(small_checkpoint, tmp_path):
    import napari_sam

    images, labels = write_dataset(tmp_path)
    out = tmp_path / "calibrated"
    argv = ["finetune", str(out), "--images", str(images), "--labels", str(labels), "--model", str(small_checkpoint),
            "--iou-head-only", "--steps", "2", "--images-per-step", "1", "--objects-per-image", "4",
            "--lr", "1e-3", "--threads", "1"]
    assert train_cli(argv) == 0
    assert json.loads((out / "run.json").read_text())["config"]["iou_head_only"] is True
    state = napari_sam.build_sam(str(out / "model.pth"), device="cpu").state_dict()
    original = torch.load(small_checkpoint, map_location="cpu", weights_only=True)
    changed = {k for k, v in original.items() if not torch.equal(state[k], v)}
    assert changed and all(k.startswith("mask_decoder.iou_prediction_head.") for k in changed), changed


def test_cli_rejects_bad_label_images(small_checkpoint, tmp_path, capsys):
    images, labels = write_dataset(tmp_path)
    out = tmp_path / "out"
    base = ["finetune", str(out), "--model", str(small_checkpoint)]

    wrong_shape = tmp_path / "wrong_shape.tif"
    io.imsave(wrong_shape, np.ones((32, 64), np.uint16), check_contrast=False)
    image = images / "cell_1.tif"
    assert train_cli(base + ["--images", str(image), "--labels", str(wrong_shape)]) == 2
    err = capsys.readouterr().err
    assert "wrong_shape.tif" in err and "(32, 64)" in err and "Traceback" not in err

    floats = tmp_path / "float_labels.tif"
    io.imsave(floats, np.ones((64, 64), np.float32), check_contrast=False)
    assert train_cli(base + ["--images", str(image), "--labels", str(floats)]) == 2
    err = capsys.readouterr().err
    assert "float_labels.tif" in err and "integer" in err

    assert train_cli(base + ["--images", str(images), "--labels", str(labels / "cell_1_labels.tif")]) == 2
    assert "2 image file(s)" in capsys.readouterr().err

    assert train_cli(base + ["--images", str(tmp_path / "missing.tif"), "--labels", str(labels)]) == 2
    assert "missing.tif" in capsys.readouterr().err

    both = ["--images", str(images), "--labels", str(labels)]
    assert train_cli(base + both + ["--distractor-probability", "1.5"]) == 2
    assert "--distractor-probability must be between 0 and 1, got 1.5" in capsys.readouterr().err
    assert train_cli(["scratch", str(out), "--occlusion-probability", "-0.1"]) == 2
    assert "--occlusion-probability must be between 0 and 1" in capsys.readouterr().err
    assert train_cli(base + both + ["--processes", "0"]) == 2
    assert "--processes must be at least 1, got 0" in capsys.readouterr().err
    assert train_cli(base + both + ["--corrective-fraction", "0"]) == 2
    assert "--corrective-fraction must be in (0, 1], got 0.0" in capsys.readouterr().err
    assert train_cli(base + both + ["--steps", "0"]) == 2
    assert "--steps must be at least 1, got 0" in capsys.readouterr().err
    assert train_cli(base + both + ["--lr", "0"]) == 2
    assert "--lr must be positive, got 0.0" in capsys.readouterr().err
    assert not out.exists(), "nothing is written when the inputs are refused"


def test_cli_interrupted_run_resumes(small_checkpoint, tmp_path, capsys, monkeypatch):
    from napari_sam.training import trainer

    images, labels = write_dataset(tmp_path, seeds=(3,))
    out = tmp_path / "out"
    argv = ["finetune", str(out), "--images", str(images), "--labels", str(labels), "--model", str(small_checkpoint),
            "--decoder-only", "--steps", "3", "--images-per-step", "1", "--objects-per-image", "2",
            "--iterations", "1", "--checkpoint-every", "1"]
    real_train = trainer.train

    def ctrl_c_at_step_two(*args, progress=None, **kwargs):
        def wrapped(done, total, result):
            progress(done, total, result)
            if done == 2:
                raise KeyboardInterrupt

        return real_train(*args, progress=wrapped, **kwargs)

    monkeypatch.setattr(trainer, "train", ctrl_c_at_step_two)
    assert train_cli(argv) == 130
    assert "run the same command again to resume" in capsys.readouterr().err.lower()
    assert (out / "training_state.pt").exists() and not (out / "model.pth").exists()
    monkeypatch.setattr(trainer, "train", real_train)

    # other settings for the unfinished run are refused, naming what changed
    assert train_cli([*argv[:-1], "2"]) == 2
    assert "checkpoint_every" in capsys.readouterr().err
    assert train_cli(argv) == 0
    output = capsys.readouterr().out
    assert "Resuming" in output and str(out / "model.pth") in output
    assert read_training_progress(out / "training_state.pt")["step"] == 3


def test_training_modules_depend_one_way_and_trainer_keeps_the_documented_names():
    """No import cycle among napari_sam.training's modules, counting imports inside functions;
    the names the README documents stay importable from napari_sam.training.trainer."""
    import ast

    from napari_sam.training import config, data, initialization, step, trainer

    folder = Path(trainer.__file__).parent
    imports = {}
    for path in folder.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
        imports[path.stem] = found

    def reaches(start: str, goal: str, seen: frozenset = frozenset()) -> bool:
        return any(m == goal or (m not in seen and reaches(m, goal, seen | {m})) for m in imports.get(start, ()))

    assert not reaches("parallel", "trainer")
    assert [module for module in imports if reaches(module, module)] == []
    assert (trainer.train, trainer.TrainConfig, trainer.SyntheticData, trainer.AnnotatedImages) == (
        train, config.TrainConfig, data.SyntheticData, data.AnnotatedImages)
    assert trainer.init_from_scratch is initialization.init_from_scratch and trainer.StepFunctions is step.StepFunctions
