"""The model types napari-sam knows: one entry each. Adding a type is one entry here plus its
architecture module (see ``docs/architecture.md``)."""

from __future__ import annotations

from pathlib import Path

from .registry import ModelEntry, SameAs, register_model
from .sam_vit import SamConfig
from .tiny_vit_sam import TinyViTSamConfig
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
    size_mb = float(size.split()[0]) * (1000 if size.endswith("GB") else 1)
    return KnownWeights(name, name, filename, _OFFICIAL + filename, "xxh128:" + xxh128,
                        f"SAM ViT-{name[4:].upper()}, official ({size}, Apache-2.0)", size_mb=size_mb)


register_model(ModelEntry(
    "vit_small", VIT_SMALL, "napari-sam small model (bundled, offline)",
    weights=KnownWeights(
        "vit_small", "vit_small", SMALL_MODEL_FILE.name, "", SMALL_MODEL_HASH,
        "napari-sam small model, bundled (16 MB, trained on synthetic microscopy images)", bundled=SMALL_MODEL_FILE,
        size_mb=16,
    ),
    amg_thresholds=SMALL_MODEL_AMG_THRESHOLDS, auto_rank=9, group="Offline",
))
register_model(ModelEntry(
    "vit_b", VIT_B, "SAM ViT-B (official weights, 358 MB, downloaded once)",
    weights=_official("vit_b", "sam_vit_b_01ec64.pth", "6923c33df3637b6a922d7682bfc9a86b", "358 MB"), auto_rank=0,
    group="General SAM",
))
register_model(ModelEntry(
    "vit_l", VIT_L, "SAM ViT-L (official weights, 1.2 GB)",
    weights=_official("vit_l", "sam_vit_l_0b3195.pth", "a82beb3c660661e3dd38d999cc860e9a", "1.2 GB"), auto_rank=1,
    group="General SAM",
))
register_model(ModelEntry(
    "vit_h", VIT_H, "SAM ViT-H (official weights, 2.4 GB)",
    weights=_official("vit_h", "sam_vit_h_4b8939.pth", "97698fac30bd929c2e6d8d8cc15933c2", "2.4 GB"), auto_rank=2,
    aliases=("default",), group="General SAM",
))
# MobileSAM (Zhang et al. 2023): a TinyViT image encoder distilled from SAM's, SAM's prompt
# encoder and mask decoder; Apache-2.0. The file is the one micro-sam downloads for vit_t.
register_model(ModelEntry(
    "vit_t", TinyViTSamConfig(), "MobileSAM ViT-T (TinyViT encoder, 40 MB, fast on CPU)",
    weights=KnownWeights(
        "vit_t", "vit_t", "mobile_sam.pt", "https://owncloud.gwdg.de/index.php/s/TuDzuwVDHd1ZDnQ/download",
        "xxh128:8eadbc88aeb9d8c7e0b4b60c3db48bd0", "MobileSAM ViT-T, TinyViT encoder (40 MB, Apache-2.0)",
        size_mb=40,
    ),
    auto_rank=3, group="General SAM",
))
register_model(ModelEntry("vit_test", VIT_TEST, "tiny random-weight SAM for tests", user_facing=False))


# -- micro-sam's domain-tuned SAM weights ---------------------------------------------------------
# Archit, Freckmann et al., "Segment Anything for Microscopy", Nature Methods 2025
# (https://github.com/computational-cell-analytics/micro-sam), and their histopathology and
# medical-imaging follow-ups. Third-party weights under CC-BY 4.0 (the bioimage.io model zoo).
# URLs and xxh128 hashes from micro_sam/util.py's model registry; sizes are approximate
# (the architecture's size; micro-sam does not publish them); layout: "state_dict" for the
# files exported to bioimage.io, "torch_em" (a training checkpoint) for the others; the
# reader accepts either. Each type is its architecture (SameAs) with other weights, so
# build_sam("vit_b_lm"), --model-type vit_b_lm, the menus and sam_model_registry["vit_b_lm"]
# (the vit_b architecture; random weights without a checkpoint, as the reference's) work.
# The vit_t_* weights load into the vit_t (MobileSAM TinyViT) architecture: they are offered
# only when an entry named "vit_t" is registered (SameAs looks it up on use).
_BIOIMAGE_IO = "https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io/"
_OWNCLOUD = "https://owncloud.gwdg.de/index.php/s/"
_APPROX_MB = {"vit_t": 40, "vit_b": 375, "vit_l": 1250, "vit_h": 2500}
_DOMAINS = {
    "lm": ("Light microscopy", "light microscopy: cells, nuclei"),
    "em_organelles": ("Electron microscopy", "electron microscopy: organelles"),
    "histopathology": ("Histopathology", "histopathology: nuclei in stained tissue"),
    "medical_imaging": ("Medical imaging", "medical images: CT, MRI, ultrasound, X-ray"),
}


def _micro_sam(name: str, url: str, xxh128: str, layout: str) -> ModelEntry:
    base, domain = name[:5], name[6:]
    group, what = _DOMAINS[domain]
    size_mb = _APPROX_MB[base]
    size = f"~{size_mb / 1000:.1f} GB" if size_mb >= 1000 else f"~{size_mb} MB"
    weights = KnownWeights(
        name, name, f"{name}.pt", url, "xxh128:" + xxh128,
        f"micro-sam {name}: SAM {base} fine-tuned for {what} ({size}, CC-BY 4.0, third-party)",
        size_mb=size_mb, layout=layout,
    )
    return ModelEntry(
        name, SameAs(base), f"SAM ViT-{base[4:].upper()} tuned for {what} (micro-sam, {size}, CC-BY 4.0)",
        weights=weights, group=group,
    )


MICRO_SAM_MODELS = (
    _micro_sam("vit_b_lm", _BIOIMAGE_IO + "diplomatic-bug/1.2/files/vit_b.pt",
               "fe9252a29f3f4ea53c15a06de471e186", "state_dict"),
    _micro_sam("vit_l_lm", _BIOIMAGE_IO + "idealistic-rat/1.2/files/vit_l.pt",
               "017f20677997d628426dec80a8018f9d", "state_dict"),
    _micro_sam("vit_t_lm", _BIOIMAGE_IO + "faithful-chicken/1.1/files/vit_t.pt",
               "72ec5074774761a6e5c05a08942f981e", "state_dict"),
    _micro_sam("vit_b_em_organelles", _BIOIMAGE_IO + "noisy-ox/1.2/files/vit_b.pt",
               "f3bf2ed83d691456bae2c3f9a05fb438", "state_dict"),
    _micro_sam("vit_l_em_organelles", _BIOIMAGE_IO + "humorous-crab/1.2/files/vit_l.pt",
               "810b084b6e51acdbf760a993d8619f2d", "state_dict"),
    _micro_sam("vit_t_em_organelles", _BIOIMAGE_IO + "greedy-whale/1/files/vit_t.pt",
               "253474720c497cce605e57c9b1d18fd9", "state_dict"),
    _micro_sam("vit_b_histopathology", _OWNCLOUD + "sBB4H8CTmIoBZsQ/download",
               "ffd1a2cd84570458b257bd95fdd8f974", "torch_em"),
    _micro_sam("vit_l_histopathology", _OWNCLOUD + "IZgnn1cpBq2PHod/download",
               "b591833c89754271023e901281dee3f2", "torch_em"),
    _micro_sam("vit_h_histopathology", _OWNCLOUD + "L7AcvVz7DoWJ2RZ/download",
               "bd1856dafc156a43fb3aa705f1a6e92e", "torch_em"),
    _micro_sam("vit_b_medical_imaging", _OWNCLOUD + "f5Ol4FrjPQWfjUF/download",
               "40169f1e3c03a4b67bff58249c176d92", "torch_em"),
)
for _entry in MICRO_SAM_MODELS:
    register_model(_entry)
