"""``AmgSettings``: the one declaration of the AMG settings, and the views built from it."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys

import numpy as np
import pytest

from napari_sam.amg_settings import AmgSettings, setting
from napari_sam.cli import build_parser

REFERENCE_ORDER = [
    "points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh", "stability_score_offset",
    "box_nms_thresh", "crop_n_layers", "crop_nms_thresh", "crop_overlap_ratio", "crop_n_points_downscale_factor",
    "point_grids", "min_mask_region_area", "output_mode",
]


@dataclasses.dataclass(frozen=True)
class ExtendedSettings(AmgSettings):
    """AmgSettings plus one setting, declared in one place."""

    extra_knob: int = setting(7, "A new setting declared once.", (0, 99))


def reference_parameters() -> dict[str, inspect.Parameter]:
    from segment_anything import SamAutomaticMaskGenerator as Reference

    parameters = dict(inspect.signature(Reference).parameters)
    parameters.pop("model")
    return parameters


def test_fields_and_defaults_are_the_references():
    reference = reference_parameters()
    assert list(reference) == REFERENCE_ORDER
    assert list(AmgSettings.field_names()) == REFERENCE_ORDER
    defaults = AmgSettings()
    for name, parameter in reference.items():
        assert getattr(defaults, name) == parameter.default, name


def test_tunable_fields_have_type_bounds_and_help():
    fields = AmgSettings.tunable_fields()
    assert [f.name for f in fields] == [n for n in REFERENCE_ORDER if n not in ("point_grids", "output_mode")]
    kinds = {f.name: f.type for f in fields}
    assert kinds["points_per_side"] is int and kinds["pred_iou_thresh"] is float
    for f in fields:
        assert f.help and "\n" not in f.help
        assert f.min <= f.default <= f.max
        assert f.flag == "--" + f.name.replace("_", "-")


def test_the_module_imports_neither_torch_nor_numpy():
    code = "import sys, napari_sam.amg_settings; print('torch' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize(("changes", "words"), [
    (dict(pred_iou_thresh=1.5), ["pred_iou_thresh", "<= 1.0", "1.5"]),
    (dict(stability_score_thresh=-0.1), ["stability_score_thresh", ">= 0.0", "-0.1"]),
    (dict(crop_overlap_ratio=1.0), ["crop_overlap_ratio", "< 1.0", "1.0"]),
    (dict(points_per_batch=0), ["points_per_batch", ">= 1", "0"]),
    (dict(crop_n_points_downscale_factor=0), ["crop_n_points_downscale_factor", ">= 1"]),
    (dict(min_mask_region_area=-5), ["min_mask_region_area", ">= 0", "-5"]),
    (dict(points_per_side=None), ["Exactly one of points_per_side or point_grids"]),
    (dict(point_grids=[np.zeros((4, 2))]), ["Exactly one of points_per_side or point_grids"]),
    (dict(points_per_side=None, point_grids=[np.zeros((4, 2))], crop_n_layers=1), ["point_grids has 1 grids"]),
    (dict(output_mode="png"), ["output_mode", "png"]),
])
def test_out_of_bounds_values_are_refused_with_a_clear_message(changes, words):
    with pytest.raises(ValueError) as info:
        AmgSettings(**changes)
    for word in words:
        assert word in str(info.value)


def test_wrong_types_are_refused():
    with pytest.raises(TypeError, match="points_per_side must be an int"):
        AmgSettings(points_per_side=3.5)
    with pytest.raises(TypeError, match="pred_iou_thresh must be a number"):
        AmgSettings(pred_iou_thresh="0.5")


def test_values_the_reference_accepts_in_normal_use_are_accepted():
    AmgSettings(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0, crop_nms_thresh=1.0)
    AmgSettings(pred_iou_thresh=1.0, stability_score_thresh=1.0, crop_overlap_ratio=0.0, crop_n_layers=3)
    AmgSettings(points_per_side=None, point_grids=[np.zeros((4, 2)), np.zeros((9, 2))], crop_n_layers=1)
    AmgSettings(np.int64(16), min_mask_region_area=np.int64(100), pred_iou_thresh=np.float32(0.5))
    for mode in ("binary_mask", "uncompressed_rle", "coco_rle"):
        AmgSettings(output_mode=mode)


def test_replace_and_as_kwargs():
    settings = AmgSettings().replace(points_per_side=16, pred_iou_thresh=0.5)
    assert settings.points_per_side == 16 and settings.pred_iou_thresh == 0.5
    assert list(settings.as_kwargs()) == REFERENCE_ORDER
    assert AmgSettings(**settings.as_kwargs()) == settings
    with pytest.raises(ValueError, match="pred_iou_thresh"):
        settings.replace(pred_iou_thresh=2.0)


def test_per_model_overrides_come_from_the_registry():
    from napari_sam.models import amg_thresholds

    small = amg_thresholds("vit_small")
    assert small and small["pred_iou_thresh"] < AmgSettings().pred_iou_thresh
    assert AmgSettings.model_overrides("vit_small") == small
    settings = AmgSettings.for_model("vit_small")
    for name, value in small.items():
        assert getattr(settings, name) == value
    # Explicit values win over the model's; the official models keep the reference's defaults.
    assert AmgSettings.for_model("vit_small", pred_iou_thresh=0.9).pred_iou_thresh == 0.9
    assert AmgSettings.for_model("vit_b") == AmgSettings()
    assert AmgSettings.model_overrides("vit_b") == {}


# -- the generator ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    from napari_sam.build import sam_model_registry

    return sam_model_registry["vit_test"]()


def generator_attributes(generator) -> dict:
    names = [n for n in REFERENCE_ORDER if n != "point_grids"]
    attributes = {name: getattr(generator, name) for name in names}
    attributes["point_grids"] = [grid.tolist() for grid in generator.point_grids]
    attributes["precision"] = generator.precision
    return attributes


def test_positional_keyword_and_settings_calls_agree(tiny_model):
    from napari_sam import SamAutomaticMaskGenerator

    values = dict(points_per_side=8, points_per_batch=16, pred_iou_thresh=0.5, stability_score_thresh=0.6,
                  stability_score_offset=2.0, box_nms_thresh=0.4, crop_n_layers=1, crop_nms_thresh=0.5,
                  crop_overlap_ratio=0.25, crop_n_points_downscale_factor=2, point_grids=None,
                  min_mask_region_area=10, output_mode="uncompressed_rle")
    assert list(values) == REFERENCE_ORDER
    positional = SamAutomaticMaskGenerator(tiny_model, *values.values())
    keyword = SamAutomaticMaskGenerator(tiny_model, **values)
    settings = AmgSettings(**values)
    with_settings = SamAutomaticMaskGenerator(tiny_model, settings=settings)
    mixed = SamAutomaticMaskGenerator(tiny_model, 8, settings=settings.replace(points_per_side=4), points_per_batch=16)
    expected = generator_attributes(keyword)
    assert expected["crop_n_layers"] == 1 and len(expected["point_grids"]) == 2
    for generator in (positional, with_settings, mixed):
        assert generator_attributes(generator) == expected
    assert with_settings.settings == settings and keyword.settings == settings
    # Keywords beside settings= override it.
    overridden = SamAutomaticMaskGenerator(tiny_model, settings=settings, pred_iou_thresh=0.1)
    assert overridden.pred_iou_thresh == 0.1 and overridden.settings.points_per_batch == 16
    # The defaults: the reference's, point grids built from points_per_side=32.
    default = SamAutomaticMaskGenerator(tiny_model)
    assert default.settings == AmgSettings() and default.point_grids[0].shape == (32 * 32, 2)
    assert default.precision == "fp32"


def test_explicit_point_grids(tiny_model):
    from napari_sam import SamAutomaticMaskGenerator

    grid = np.array([[0.5, 0.5], [0.25, 0.75]])
    generator = SamAutomaticMaskGenerator(tiny_model, points_per_side=None, point_grids=[grid])
    np.testing.assert_array_equal(generator.point_grids[0], grid)


def test_bad_calls_fail_like_python_calls(tiny_model):
    from napari_sam import SamAutomaticMaskGenerator

    with pytest.raises(TypeError, match="positional arguments"):
        SamAutomaticMaskGenerator(tiny_model, *range(14))
    with pytest.raises(TypeError, match="unexpected keyword argument 'points_per_sides'"):
        SamAutomaticMaskGenerator(tiny_model, points_per_sides=4)
    with pytest.raises(TypeError, match="multiple values for argument 'points_per_side'"):
        SamAutomaticMaskGenerator(tiny_model, 4, points_per_side=4)
    with pytest.raises(ValueError, match="pred_iou_thresh"):
        SamAutomaticMaskGenerator(tiny_model, pred_iou_thresh=3.0)
    with pytest.raises(ValueError, match="precision"):
        SamAutomaticMaskGenerator(tiny_model, precision="int8")


def test_signature_lists_the_reference_parameters():
    from napari_sam import SamAutomaticMaskGenerator

    ours = inspect.signature(SamAutomaticMaskGenerator).parameters
    reference = reference_parameters()
    assert list(ours)[0] == "model"
    assert list(ours)[1:14] == list(reference)
    for name, parameter in reference.items():
        assert ours[name].default == parameter.default, name
        assert ours[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert ours["settings"].kind is ours["precision"].kind is inspect.Parameter.KEYWORD_ONLY
    assert ours["settings"].default is None and ours["precision"].default == "fp32"


# -- one new setting, declared once, appears everywhere ------------------------------------


def test_an_extra_setting_appears_in_cli_help():
    help_text = build_parser(ExtendedSettings).format_help()
    assert "--extra-knob" in help_text and "A new setting declared once." in help_text
    assert "--points-per-side" in help_text
    args = build_parser(ExtendedSettings).parse_args(["--input", "a", "--output", "b", "--extra-knob", "3"])
    assert args.extra_knob == 3
    with pytest.raises(SystemExit):
        build_parser(ExtendedSettings).parse_args(["--input", "a", "--output", "b", "--extra-knob", "100"])
    assert "--extra-knob" not in build_parser().format_help()


def test_an_extra_setting_reaches_the_generator(tiny_model):
    from napari_sam import SamAutomaticMaskGenerator

    generator = SamAutomaticMaskGenerator(tiny_model, settings=ExtendedSettings(), extra_knob=5)
    assert generator.extra_knob == 5 and generator.settings.extra_knob == 5
    assert ExtendedSettings.for_model("vit_small").extra_knob == 7
