"""Cost of the relative-position terms in a global-attention block's training pass (issue 7).

SAM's decomposed relative-position terms (MViTv2) can enter the attention logits as a
dense BxNxN bias, which makes ``scaled_dot_product_attention`` materialise and
differentiate the whole bias. This compares, on ``vit_small``'s global blocks (4 images x
6 heads, a 32x32 token grid, head width 32), the forward and backward of:

* "dense bias": what the trainer ran until 2026-12-01;
* "augmented q/k": what it runs now (``attention_with_rel_pos_keys``): the same logits
  without a mask, by appending the row and column terms to the queries and one-hot row
  and column indicators to the keys (head width 32 + 2x32; v zero-padded to that width so
  that the fused kernel runs), an exact rewrite;
* "no relative position": plain fused attention, a lower bound (not the model).

    python experiments/bench_rel_pos_attention.py [--repeats 5] [--threads 2] [--whole-steps 16]

Prints the largest differences of the augmented form's output and gradients from the dense
form's, and the median milliseconds of each variant's forward + backward. With
``--whole-steps N`` it also times N whole training steps of the shipped model (the step of
``experiments/train_small_model.py``'s phases 1-3, eager), alternating the trainer's attention
and the dense bias on the same batches; the first pair is left out of the medians.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from napari_sam.modeling import image_encoder
from napari_sam.modeling.image_encoder import attention_with_rel_pos_keys, rel_pos_terms

BATCH, GRID, HEAD_DIM = 4 * 6, 32, 32  # vit_small: 4 images x 6 heads, 256 px / patch 8
TOKENS, SCALE = GRID * GRID, HEAD_DIM ** -0.5


def dense_bias(q, k, v, rel_h, rel_w):
    rows, cols = rel_pos_terms(q, rel_h, rel_w, (GRID, GRID))
    return dense_bias_attention(q, k, v, rows, cols, (GRID, GRID), SCALE)


def augmented(q, k, v, rel_h, rel_w):
    rows, cols = rel_pos_terms(q, rel_h, rel_w, (GRID, GRID))
    return attention_with_rel_pos_keys(q, k, v, rows, cols, (GRID, GRID), SCALE)


def no_relative_position(q, k, v, rel_h, rel_w):
    return F.scaled_dot_product_attention(q, k, v, scale=SCALE) + 0.0 * (rel_h.sum() + rel_w.sum())


def dense_bias_attention(q, k, v, row_term, col_term, grid, scale):
    """Drop-in for ``attention_with_rel_pos_keys`` with the terms as a dense NxN mask."""
    batch, tokens, _ = q.shape
    bias = (row_term.unsqueeze(-1) + col_term.unsqueeze(-2)).reshape(batch, tokens, tokens)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def whole_steps(count: int) -> None:
    """Median seconds of whole training steps with each attention form (see the docstring)."""
    from napari_sam.checkpoints import build_sam
    from napari_sam.training.trainer import StepFunctions, SyntheticData, TrainConfig, optimization_step

    model = build_sam("vit_small", device="cpu").train()
    config = TrainConfig(steps=count, images_per_step=4, objects_per_image=10, iterations=2, precision="bf16",
                         warmup_steps=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7)  # the weights barely move between the pair
    functions, data = StepFunctions.for_model(model), SyntheticData(seed=5)
    forms = {"augmented q/k": attention_with_rel_pos_keys, "dense bias": dense_bias_attention}
    times: dict[str, list[float]] = {name: [] for name in forms}
    try:
        for index in range(2 * count):
            name = list(forms)[index % 2]
            image_encoder.attention_with_rel_pos_keys = forms[name]
            started = time.perf_counter()
            optimization_step(model, optimizer, data, config, index // 2, functions)
            if index >= 2:
                times[name].append(time.perf_counter() - started)
    finally:
        image_encoder.attention_with_rel_pos_keys = attention_with_rel_pos_keys
    medians = {name: float(np.median(values)) for name, values in times.items()}
    print("whole training step: " + ", ".join(f"{name} {value:.2f} s" for name, value in medians.items())
          + f"; ratio {medians['augmented q/k'] / medians['dense bias']:.2f}")


def forward_backward(function, inputs):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = function(*leaves)
    out.backward(torch.ones_like(out) / out.numel())
    return out.detach(), [leaf.grad for leaf in leaves]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--whole-steps", type=int, default=0, metavar="N",
                        help="also time N whole training steps with each form (default: none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(BATCH, TOKENS, HEAD_DIM, generator=generator) for _ in range(3)]
    inputs += [0.1 * torch.randn(2 * GRID - 1, HEAD_DIM, generator=generator) for _ in range(2)]
    out, grads = forward_backward(dense_bias, inputs)
    out_aug, grads_aug = forward_backward(augmented, inputs)
    relative = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(grads_aug, grads))
    print(f"augmented vs dense: output max |diff| {float((out_aug - out).abs().max()):.1e}, "
          f"gradients max relative diff {relative:.1e}")
    for name, function in (("dense bias", dense_bias), ("augmented q/k", augmented),
                           ("no relative position", no_relative_position)):
        forward_backward(function, inputs)  # warm-up
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            forward_backward(function, inputs)
            times.append(time.perf_counter() - started)
        print(f"{name}: {1000 * float(np.median(times)):.0f} ms forward + backward per global block")
    if args.whole_steps:
        whole_steps(args.whole_steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
