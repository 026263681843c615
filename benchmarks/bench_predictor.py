"""Time SamPredictor against the reference in one process (issue: foundation, speed).

Same random vit_b weights in both, same image (truck.jpg), same thread count; the calls
alternate (reference, ours fp32, ours bf16) after a warm-up, and the medians are compared.
Prints ``set_image`` and ``predict`` ratios (ours / reference) and the bf16 path's mask IoU
against fp32 on the parity prompts.

    python benchmarks/bench_predictor.py [--model vit_b] [--image truck.jpg] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from _common import ROOT, load_rgb, make_random_checkpoint, median, reference_model, timed, write_json_atomically


def parity_prompts(height: int, width: int) -> list[dict]:
    """The prompt kinds of the parity tests, in original-image (x, y) pixels."""
    return [
        dict(point_coords=np.array([[width * 0.45, height * 0.55]]), point_labels=np.array([1])),
        dict(
            point_coords=np.array([[width * 0.3, height * 0.4], [width * 0.6, height * 0.5], [width * 0.2, height * 0.8]]),
            point_labels=np.array([1, 1, 0]),
        ),
        dict(box=np.array([width * 0.1, height * 0.2, width * 0.7, height * 0.9]), multimask_output=False),
        dict(
            box=np.array([width * 0.2, height * 0.1, width * 0.9, height * 0.7]),
            point_coords=np.array([[width * 0.5, height * 0.4]]),
            point_labels=np.array([0]),
        ),
    ]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "vit_test"],
                        help="vit_test: the small encoder, for a quick predict ratio (same decoder)")
    parser.add_argument("--image", default="truck.jpg")
    parser.add_argument("--repeats", type=int, default=3, help="timed set_image calls per implementation")
    parser.add_argument("--predict-repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "predictor.json")
    args = parser.parse_args(argv)

    import segment_anything

    from napari_sam import SamPredictor, sam_model_registry

    image = load_rgb(args.image)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = make_random_checkpoint(args.model, Path(folder) / "random.pth")
        reference = reference_model(args.model, checkpoint)
        ours = sam_model_registry[args.model](checkpoint=checkpoint)
    predictors = {
        "reference": segment_anything.SamPredictor(reference),
        "ours_fp32": SamPredictor(ours),
        "ours_bf16": SamPredictor(ours, precision="bf16"),
    }
    print(f"model {args.model}, image {args.image} {image.shape}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    for predictor in predictors.values():  # warm-up
        predictor.set_image(image)
    set_image = {name: [] for name in predictors}
    for _ in range(args.repeats):
        for name, predictor in predictors.items():
            set_image[name].append(timed(lambda: predictor.set_image(image)))
    embedding_diff = (predictors["ours_fp32"].features - predictors["reference"].features).abs().max().item()

    prompts = parity_prompts(*image.shape[:2])
    predict = {name: [] for name in predictors}
    for _ in range(args.predict_repeats):
        for name, predictor in predictors.items():
            predict[name].append(sum(timed(lambda: predictor.predict(**p)) for p in prompts) / len(prompts))

    ious = []
    for prompt in prompts:
        masks32, _, _ = predictors["ours_fp32"].predict(**prompt)
        masks16, _, _ = predictors["ours_bf16"].predict(**prompt)
        ious.extend(mask_iou(a, b) for a, b in zip(masks32, masks16))

    ref_set, ref_predict = median(set_image["reference"]), median(predict["reference"])
    results = {
        "model": args.model,
        "image": args.image,
        "threads": torch.get_num_threads(),
        "set_image_s": {k: median(v) for k, v in set_image.items()},
        "predict_s": {k: median(v) for k, v in predict.items()},
        "set_image_ratio_fp32": median(set_image["ours_fp32"]) / ref_set,
        "set_image_ratio_bf16": median(set_image["ours_bf16"]) / ref_set,
        "predict_ratio_fp32": median(predict["ours_fp32"]) / ref_predict,
        "predict_ratio_bf16": median(predict["ours_bf16"]) / ref_predict,
        "embedding_max_abs_diff_fp32": embedding_diff,
        "bf16_vs_fp32_min_mask_iou": min(ious),
    }
    print(f"{'step':<12}{'reference':>12}{'ours fp32':>12}{'ours bf16':>12}{'fp32 ratio':>12}{'bf16 ratio':>12}")
    for step, table in (("set_image", results["set_image_s"]), ("predict", results["predict_s"])):
        print(f"{step:<12}{table['reference']:>11.3f}s{table['ours_fp32']:>11.3f}s{table['ours_bf16']:>11.3f}s"
              f"{table['ours_fp32'] / table['reference']:>12.2f}{table['ours_bf16'] / table['reference']:>12.2f}")
    print(f"embedding max |diff| fp32 vs reference: {embedding_diff:.2e}")
    print(f"bf16 vs fp32 mask IoU on the parity prompts: min {min(ious):.4f} over {len(ious)} masks")
    write_json_atomically(args.out, results)
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
