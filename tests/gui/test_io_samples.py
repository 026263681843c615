"""Sample data and the COCO RLE writer/reader, through napari as a person uses them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage import data, measure

MANIFEST = Path(__file__).resolve().parents[2] / "napari.yaml"

pytestmark = pytest.mark.gui


@pytest.fixture
def viewer(make_napari_viewer, npe2pm):
    with npe2pm.tmp_plugin(manifest=str(MANIFEST)):
        yield make_napari_viewer()


@pytest.mark.parametrize("key, shape, rgb", [("coins", (303, 384), False), ("cell", (660, 550), False), ("ihc", (512, 512, 3), True)])
def test_open_sample(viewer, key, shape, rgb):
    layers = viewer.open_sample("napari-sam", key)
    assert len(layers) == 1 and layers[0].data.shape == shape and layers[0].rgb == rgb
    assert layers[0].name == key


def test_labels_layer_save_and_open_round_trip(viewer, tmp_path):
    labels = measure.label(data.coins() > 110).astype(np.uint16)
    stack = np.stack([labels, np.flipud(labels)])  # nD: one COCO image per slice
    layer = viewer.add_labels(stack, name="coins labels", scale=(2.0, 0.5, 0.5), translate=(0, 10, 20))
    path = tmp_path / "coins.json"
    written = layer.save(str(path), plugin="napari-sam")
    assert written and Path(written[0]).exists()
    opened = viewer.open(str(path), plugin="napari-sam")
    assert len(opened) == 1
    restored = opened[0]
    assert restored.__class__.__name__ == "Labels"
    np.testing.assert_array_equal(restored.data, stack)
    np.testing.assert_allclose(restored.scale, layer.scale)
    np.testing.assert_allclose(restored.translate, layer.translate)


def test_reader_ignores_other_json(tmp_path):
    from napari_sam._napari._io import get_reader

    other = tmp_path / "settings.json"
    other.write_text('{"theme": "dark"}')
    assert get_reader(str(other)) is None
    assert get_reader(str(tmp_path / "image.png")) is None
