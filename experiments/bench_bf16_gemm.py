"""Does this CPU's torch multiply faster in bf16 than in fp32? (for ``precision="bf16"``)

Times ``torch.nn.functional.linear`` of 4096x768 tokens by a 768 -> 2304 weight (the
``qkv`` projection of a vit_b block over the 64x64 token grid of one image) in fp32 and
in bf16, after one warm-up call each, and prints the medians and their ratio. On the
project's 2-core machine with torch 2.14.1 bf16 takes 1.4 to 1.8 times as long as fp32 even
though the CPU has AVX-512 bf16, which is why ``SamPredictor(..., precision="bf16")``
no longer speeds up ``set_image`` there (README, "Tests and benchmarks").

    python experiments/bench_bf16_gemm.py [--threads 2] [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def median_seconds(dtype: torch.dtype, repeats: int) -> float:
    tokens, weight = torch.randn(4096, 768).to(dtype), torch.randn(2304, 768).to(dtype)
    torch.nn.functional.linear(tokens, weight)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.nn.functional.linear(tokens, weight)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fp32, bf16 = (median_seconds(dtype, args.repeats) for dtype in (torch.float32, torch.bfloat16))
    print(f"torch {torch.__version__}, {args.threads} threads: fp32 {fp32 * 1e3:.1f} ms, bf16 {bf16 * 1e3:.1f} ms, "
          f"bf16 / fp32 = {bf16 / fp32:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
