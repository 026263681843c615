"""``import napari_sam`` is light; the core never imports napari, Qt or the reference."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True, timeout=300
    )
    return result.stdout.strip()


def test_import_napari_sam_imports_neither_torch_nor_qt():
    out = run(
        """
        import sys, napari_sam
        heavy = [m for m in ("torch", "napari", "qtpy", "PyQt5", "PyQt6", "PySide6", "magicgui") if m in sys.modules]
        print(heavy)
        """
    )
    assert out == "[]"


def test_core_api_does_not_import_napari_qt_or_reference():
    out = run(
        """
        import sys
        from napari_sam import sam_model_registry, SamPredictor
        from napari_sam.utils.transforms import ResizeLongestSide
        import napari_sam.build, napari_sam.predictor
        print([m for m in ("napari", "qtpy", "PyQt5", "magicgui", "segment_anything", "cv2") if m in sys.modules])
        """
    )
    assert out == "[]"


def test_unknown_attribute_raises_attribute_error():
    import napari_sam

    try:
        napari_sam.not_a_thing  # noqa: B018
    except AttributeError as error:
        assert "not_a_thing" in str(error)
    else:
        raise AssertionError("expected AttributeError")


def test_import_guard_is_installed_once_and_finds_nothing():
    """The triton guard (napari_sam._triton) is one meta-path finder that only watches napari_sam."""
    out = run(
        """
        import sys, importlib, napari_sam
        from napari_sam import _triton
        importlib.reload(napari_sam)
        guards = [f for f in sys.meta_path if isinstance(f, _triton._GuardFinder)]
        print(len(guards), guards[0].find_spec("napari_sam.predictor", None), guards[0].find_spec("json", None))
        """
    )
    assert out == "1 None None"
