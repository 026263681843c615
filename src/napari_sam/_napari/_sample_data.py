"""Sample images (File > Open Sample > napari-sam): real images bundled with scikit-image."""

from __future__ import annotations

from typing import Any


def _sample(name: str, loader: str, **kwargs: Any) -> list[tuple[Any, dict[str, Any], str]]:
    from skimage import data

    return [(getattr(data, loader)(), {"name": name, **kwargs}, "image")]


def coins() -> list[tuple[Any, dict[str, Any], str]]:
    """Greek coins (grayscale uint8, 303x384): well separated objects to click on."""
    return _sample("coins", "coins")


def cell() -> list[tuple[Any, dict[str, Any], str]]:
    """A cell in phase contrast (grayscale uint8, 660x550)."""
    return _sample("cell", "cell")


def ihc() -> list[tuple[Any, dict[str, Any], str]]:
    """Immunohistochemistry stain (RGB uint8, 512x512): many touching nuclei for automatic masks."""
    return _sample("ihc", "immunohistochemistry", rgb=True)
