"""Pilots of other ``vit_small`` sizes (not shipped): does a variant learn more per step?

Each variant keeps SAM's modules and changes only their sizes (so the reference's classes,
built with the same sizes, load its weights). It is trained with
``experiments/train_small_model.py`` (any of its options) and scored with
``experiments/eval_small_model.py``, both run with the variant in place of the shipped size
(the registry's ``vit_small`` for training; an extra model type ``vit_small_<variant>``
for the evaluation, so that the checkpoint's type is detected from its tensor shapes):

    python experiments/size_pilot.py VARIANT train --scale 0.25 --until phase3 --no-install --out runs/VARIANT
    python experiments/size_pilot.py VARIANT eval --validation --amg-images 0 --checkpoint runs/VARIANT/phase3/model.pth

Variants (seconds per eager bf16 step of the recipe on 2 CPU cores, torch 2.14.1, against
about 2.2 to 2.5 s for the shipped size in the same measurement):

- ``wide``: a 256-wide, 8-block encoder (8 heads, global attention in blocks 3 and 7)
  instead of 192 wide and 6 blocks; the decoder as shipped. About 2.8 s.
- ``decoder256``: the official mask decoder's sizes (256 wide, 8 heads, MLP 2048, IoU
  head 256) instead of 128 wide (4 heads, MLP 1024, IoU head 128), so the image
  embedding and the per-pixel features the hypernetwork reads (width / 8) are twice as
  wide; the encoder as shipped. 7.62M parameters instead of 4.11M (30 MB in float32,
  over the 25 MB the package may hold, so it would ship in float16). About 4.3 s a step
  (2.46 s for the shipped size in the same timing: 1.7 times), 4.6 s in a run. At ×0.25 of
  the steps it scores as the shipped size does there.
- ``patch4``: 4 px patches instead of 8, so a 64x64 embedding grid and 256x256 low-res
  masks, one logit per input pixel (with 8 px patches each 4x4 block of the 128x128
  low-res mask comes from one token, because the decoder's upscaling convolutions have
  kernel 2 and stride 2 and never mix tokens). To keep the step affordable with four times
  the tokens: a 96-wide encoder (3 heads, 6 blocks) with 16x16-token windows and no global
  attention, and a 64-wide decoder (2 heads, MLP 512, IoU head 64), 1.38M parameters.
  About 3.6 s a step in a run (3.79 s against 2.49 s for the shipped size in one timing:
  1.5 times). Trained on the whole budget with ``--scale 0.75`` (all four phases, 119 min,
  within the 2-hour budget), it scores well below the shipped model.

docs/small-model-experiments.md ("Where the limit is" and after) gives the scores of the three pilots.
"""

from __future__ import annotations

import dataclasses
import runpy
import sys
from pathlib import Path

from napari_sam.models import ModelEntry, model_entry, register_model

SHIPPED = model_entry("vit_small").architecture
VARIANTS = {
    "wide": dataclasses.replace(SHIPPED, embed_dim=256, depth=8, num_heads=8, global_attn_indexes=(3, 7)),
    "decoder256": dataclasses.replace(
        SHIPPED, prompt_embed_dim=256, decoder_mlp_dim=2048, decoder_num_heads=8, iou_head_hidden_dim=256,
    ),
    "patch4": dataclasses.replace(
        SHIPPED, embed_dim=96, depth=6, num_heads=3, global_attn_indexes=(), patch_size=4, window_size=16,
        prompt_embed_dim=64, decoder_mlp_dim=512, decoder_num_heads=2, iou_head_hidden_dim=64,
    ),
}
HERE = Path(__file__).resolve().parent
USAGE = f"usage: size_pilot.py {{{','.join(VARIANTS)}}} train|eval [options of train_small_model.py / eval_small_model.py]"


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] not in VARIANTS or argv[1] not in ("train", "eval"):
        raise SystemExit(USAGE)
    variant, action, options = argv[0], argv[1], argv[2:]
    if action == "train":
        if "--no-install" not in options:
            raise SystemExit("a pilot never replaces the shipped weights: add --no-install")
        register_model(dataclasses.replace(model_entry("vit_small"), architecture=VARIANTS[variant]), replace=True)
        script = HERE / "train_small_model.py"
    else:
        register_model(ModelEntry(f"vit_small_{variant}", VARIANTS[variant], f"size pilot {variant}",
                                  user_facing=False))
        script = HERE / "eval_small_model.py"
    sys.argv = [str(script), *options]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
