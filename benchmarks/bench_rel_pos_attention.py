"""Cost of the relative-position terms in a global-attention block's training pass (issue 7).

In training, ``Attention._attend`` adds SAM's decomposed relative-position terms (MViTv2)
to the logits as a dense BxNxN bias, so ``scaled_dot_product_attention`` takes its math
path. This compares, on ``vit_small``'s global blocks (4 images x 6 heads, a 32x32 token
grid, head width 32), the forward and backward of:

* "dense bias": what the trainer runs;
* "augmented q/k": the same logits without a mask, by appending the row and column terms
  to the queries and one-hot row and column indicators to the keys (head width 32 + 2x32;
  v zero-padded to that width so that the fused kernel runs), an exact rewrite;
* "no relative position": plain fused attention, a lower bound (not the model).

    python benchmarks/bench_rel_pos_attention.py [--repeats 5] [--threads 2]

Prints the largest differences of the augmented form's output and gradients from the dense
form's, and the median milliseconds of each variant's forward + backward.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from napari_sam.modeling.image_encoder import rel_pos_terms

BATCH, GRID, HEAD_DIM = 4 * 6, 32, 32  # vit_small: 4 images x 6 heads, 256 px / patch 8
TOKENS, SCALE = GRID * GRID, HEAD_DIM ** -0.5


def dense_bias(q, k, v, rel_h, rel_w):
    rows, cols = rel_pos_terms(q, rel_h, rel_w, (GRID, GRID))
    bias = (rows.unsqueeze(-1) + cols.unsqueeze(-2)).reshape(BATCH, TOKENS, TOKENS)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=SCALE)


_INDICATORS = torch.cat([F.one_hot(torch.arange(TOKENS) // GRID, GRID),
                         F.one_hot(torch.arange(TOKENS) % GRID, GRID)], 1).float()  # N x 2G: key row, key column


def augmented(q, k, v, rel_h, rel_w):
    rows, cols = rel_pos_terms(q, rel_h, rel_w, (GRID, GRID))
    q_aug = torch.cat([q * SCALE, rows.reshape(BATCH, TOKENS, GRID), cols.reshape(BATCH, TOKENS, GRID)], -1)
    k_aug = torch.cat([k, _INDICATORS.expand(BATCH, TOKENS, 2 * GRID)], -1)
    v_pad = torch.cat([v, v.new_zeros(BATCH, TOKENS, 2 * GRID)], -1)
    return F.scaled_dot_product_attention(q_aug, k_aug, v_pad, scale=1.0)[..., :HEAD_DIM]


def no_relative_position(q, k, v, rel_h, rel_w):
    return F.scaled_dot_product_attention(q, k, v, scale=SCALE) + 0.0 * (rel_h.sum() + rel_w.sum())


def forward_backward(function, inputs):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = function(*leaves)
    out.backward(torch.ones_like(out) / out.numel())
    return out.detach(), [leaf.grad for leaf in leaves]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
