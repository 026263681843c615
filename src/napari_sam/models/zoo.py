"""The model types napari-sam knows: one entry each. Adding a type is one entry here plus its
architecture module (see ``docs/architecture.md``)."""

from __future__ import annotations

from pathlib import Path

from .registry import ModelEntry, register_model
from .sam_vit import SamConfig
from .weights import KnownWeights

_OFFICIAL = "https://dl.fbaipublicfiles.com/segment_anything/"
_PACKAGE = Path(__file__).resolve().parent.parent

# The official SAM models (Kirillov et al. 2023; the reference's build_sam.py), Apache-2.0.
# Hashes: xxh128 of the official files.
VIT_H = SamConfig(1280, 32, 16, (7, 15, 23, 31))
VIT_L = SamConfig(1024, 24, 16, (5, 11, 17, 23))
VIT_B = SamConfig(768, 12, 12, (2, 5, 8, 11))

# The project's own small model: 256 px input, 8 px patches (a 32x32 embedding grid, so
# 128x128 low-res masks at half the input resolution), a 128-wide decoder.
VIT_SMALL = SamConfig(
    embed_dim=192, depth=6, num_heads=6, global_attn_indexes=(2, 5), img_size=256, patch_size=8,
    window_size=8, prompt_embed_dim=128, decoder_mlp_dim=1024, decoder_num_heads=4,
    iou_head_hidden_dim=128, mask_in_chans=16,
)
SMALL_MODEL_FILE = _PACKAGE / "weights" / "sam_vit_small.pth"
SMALL_MODEL_HASH = "xxh128:984871f71ac299c1d5d132109a17bd49"
# Automatic-mask thresholds of the small model: its predicted IoUs and stability scores run
# lower than the official models', so the reference's defaults (0.88, 0.95) keep almost no
# mask. The best F1 of recall and one-to-one precision over a grid on held-out synthetic
# images (docs/small-model-experiments.md) ...
SMALL_MODEL_AMG_THRESHOLDS = {"pred_iou_thresh": 0.55, "stability_score_thresh": 0.8, "box_nms_thresh": 0.3}
# ... and the most precise setting that still finds 80 % of the objects there.
SMALL_MODEL_AMG_HIGH_RECALL = {"pred_iou_thresh": 0.4, "stability_score_thresh": 0.5, "box_nms_thresh": 0.5}

# A tiny configuration (2-block 64-wide encoder, full decoder) for tests and demos: seeded
# random weights, never offered to users.
VIT_TEST = SamConfig(64, 2, 2, (1,))


def _official(name: str, filename: str, xxh128: str, size: str) -> KnownWeights:
    return KnownWeights(name, name, filename, _OFFICIAL + filename, "xxh128:" + xxh128,
                        f"SAM ViT-{name[4:].upper()}, official ({size}, Apache-2.0)")


register_model(ModelEntry(
    "vit_small", VIT_SMALL, "napari-sam small model (bundled, offline)",
    weights=KnownWeights(
        "vit_small", "vit_small", SMALL_MODEL_FILE.name, "", SMALL_MODEL_HASH,
        "napari-sam small model, bundled (16 MB, trained on synthetic microscopy images)", bundled=SMALL_MODEL_FILE,
    ),
    amg_thresholds=SMALL_MODEL_AMG_THRESHOLDS, auto_rank=9,
))
register_model(ModelEntry(
    "vit_b", VIT_B, "SAM ViT-B (official weights, 358 MB, downloaded once)",
    weights=_official("vit_b", "sam_vit_b_01ec64.pth", "6923c33df3637b6a922d7682bfc9a86b", "358 MB"), auto_rank=0,
))
register_model(ModelEntry(
    "vit_l", VIT_L, "SAM ViT-L (official weights, 1.2 GB)",
    weights=_official("vit_l", "sam_vit_l_0b3195.pth", "a82beb3c660661e3dd38d999cc860e9a", "1.2 GB"), auto_rank=1,
))
register_model(ModelEntry(
    "vit_h", VIT_H, "SAM ViT-H (official weights, 2.4 GB)",
    weights=_official("vit_h", "sam_vit_h_4b8939.pth", "97698fac30bd929c2e6d8d8cc15933c2", "2.4 GB"), auto_rank=2,
    aliases=("default",),
))
register_model(ModelEntry("vit_test", VIT_TEST, "tiny random-weight SAM for tests", user_facing=False))
