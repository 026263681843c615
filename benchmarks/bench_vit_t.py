"""Time vit_t (MobileSAM's TinyViT encoder) in one process (issue 25).

Random weights (timing does not depend on them), the same image (truck.jpg), the same thread
count. After a warm-up the ``set_image`` calls alternate between our vit_t, our vit_b and
MobileSAM's own TinyViT (from ``segment-anything-hq``, the tests' oracle) assembled into a
reference ``segment_anything`` Sam with the same weights as ours; medians are compared.
Prints vit_t's set_image as a ratio of vit_b's (goal <= 0.15) and of the oracle's (goal
<= 0.8), vit_t's predict latency, and one automatic-mask run with default settings.

    python benchmarks/bench_vit_t.py [--image truck.jpg] [--repeats 3] [--no-amg]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch

from _common import ROOT, load_rgb, make_random_checkpoint, median, timed, write_json_atomically
from bench_predictor import parity_prompts


def oracle_model(checkpoint: Path):
    """MobileSAM as its build_sam_vit_t assembles it: segment-anything-hq's TinyViT (returning only
    the embedding) with the reference's prompt encoder and mask decoder, loaded from ``checkpoint``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's deprecation warnings on import
        from segment_anything_hq.modeling.tiny_vit_sam import TinyViT
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    class EmbeddingOnly(TinyViT):
        def forward(self, x):
            return super().forward(x)[0]

    encoder = EmbeddingOnly(
        img_size=1024, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0,
    )
    decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
        depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3,
        iou_head_hidden_dim=256)
    model = Sam(encoder, PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                                       mask_in_chans=16), decoder, [123.675, 116.28, 103.53], [58.395, 57.12, 57.375])
    model.load_state_dict(torch.load(checkpoint, weights_only=True), strict=True)
    return model.eval()  # after loading: the oracle caches its attention biases in eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="truck.jpg")
    parser.add_argument("--repeats", type=int, default=3, help="timed set_image calls per model")
    parser.add_argument("--predict-repeats", type=int, default=10)
    parser.add_argument("--no-amg", action="store_true", help="skip the automatic-mask run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vit_t.json")
    args = parser.parse_args(argv)

    import segment_anything

    from napari_sam import SamPredictor, sam_model_registry
    from napari_sam.automatic_mask_generator import SamAutomaticMaskGenerator

    image = load_rgb(args.image)
    with tempfile.TemporaryDirectory() as folder:
        vit_t = make_random_checkpoint("vit_t", Path(folder) / "vit_t.pth")
        vit_b = make_random_checkpoint("vit_b", Path(folder) / "vit_b.pth")
        models = {
            "ours_vit_t": sam_model_registry["vit_t"](checkpoint=vit_t),
            "oracle_vit_t": oracle_model(vit_t),
            "ours_vit_b": sam_model_registry["vit_b"](checkpoint=vit_b),
        }
    for model in models.values():
        model.to(args.device)
    predictors = {
        name: (segment_anything.SamPredictor if name.startswith("oracle") else SamPredictor)(model)
        for name, model in models.items()
    }
    print(f"image {args.image} {image.shape}, device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def set_image(predictor) -> None:
        predictor.set_image(image)
        sync()

    for predictor in predictors.values():  # warm-up
        set_image(predictor)
    times = {name: [] for name in predictors}
    for _ in range(args.repeats):
        for name, predictor in predictors.items():
            times[name].append(timed(lambda: set_image(predictor)))
    embedding_diff = (predictors["ours_vit_t"].features - predictors["oracle_vit_t"].features).abs().max().item()

    prompts = parity_prompts(*image.shape[:2])
    predict = {"ours_vit_t": [], "oracle_vit_t": []}
    for _ in range(args.predict_repeats):
        for name in predict:
            predict[name].append(sum(timed(lambda: predictors[name].predict(**p)) for p in prompts) / len(prompts))

    set_s = {name: median(v) for name, v in times.items()}
    results = {
        "image": args.image,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "set_image_s": set_s,
        "predict_s": {name: median(v) for name, v in predict.items()},
        "vit_t_over_vit_b": set_s["ours_vit_t"] / set_s["ours_vit_b"],
        "vit_t_over_oracle": set_s["ours_vit_t"] / set_s["oracle_vit_t"],
        "embedding_max_abs_diff": embedding_diff,
    }
    print(f"{'set_image':<28}{'seconds':>10}")
    for name, value in set_s.items():
        print(f"{name:<28}{value:>9.3f}s")
    print(f"vit_t / vit_b set_image:    {results['vit_t_over_vit_b']:.3f}  (goal <= 0.15)")
    print(f"vit_t / oracle set_image:   {results['vit_t_over_oracle']:.3f}  (goal <= 0.8)")
    print(f"predict (mean over {len(prompts)} prompts): ours {results['predict_s']['ours_vit_t'] * 1000:.1f} ms, "
          f"oracle {results['predict_s']['oracle_vit_t'] * 1000:.1f} ms")
    print(f"embedding max |diff| ours vs oracle: {embedding_diff:.2e}")
    if not args.no_amg:
        generator = SamAutomaticMaskGenerator(models["ours_vit_t"])
        masks: list = []
        results["amg_s"] = timed(lambda: masks.extend(generator.generate(image)))
        results["amg_masks"] = len(masks)
        print(f"AMG vit_t, default settings: {results['amg_s']:.2f}s ({len(masks)} masks, random weights)")
    write_json_atomically(args.out, results)
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
