"""The zarr embedding store: bit-exact round trips, refusal of what does not fit, display mappings, modes."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("zarr", minversion="3")

import torch  # noqa: E402

from napari_sam import EmbeddingStore, SamPredictor, StoreMismatchError, TileGrid  # noqa: E402
from napari_sam.embedding_store import content_hash, group_name, weights_hash  # noqa: E402
from napari_sam.models import build_model  # noqa: E402
from napari_sam.tiling import TileEmbeddings  # noqa: E402
from napari_sam.utils.progress import drain  # noqa: E402

TILE, HALO = 64, 8


@pytest.fixture(scope="module")
def photo(truck):
    """A 100 x 120 RGB uint8 crop of a real photo (9 tiles of 64 px with an 8 px halo)."""
    return np.ascontiguousarray(truck[400:500, 600:720])


@pytest.fixture(scope="module")
def gray16(photo):
    """The crop as a 16-bit grayscale image, like a microscope camera's (values 0..65535)."""
    return (photo.mean(axis=2) * 257).astype(np.uint16)


def fresh(sam, tiles: TileEmbeddings, tile):
    """The embedding of a tile's crop computed by a plain SamPredictor (no store, no cache)."""
    return drain(SamPredictor(sam).embedding_steps(tiles.crop_rgb(tile)))


def test_round_trip_is_bit_exact(tmp_path, sam, photo):
    grid = TileGrid(photo.shape[:2], TILE, HALO)
    store = EmbeddingStore(tmp_path / "s.zarr", sam, tile_shape=TILE, halo=HALO)
    writer = TileEmbeddings(SamPredictor(sam), photo, grid, store=store)
    written = {i: writer.get(grid[i]) for i in (0, 4, 8)}
    assert writer.computed == [0, 4, 8]

    reopened = EmbeddingStore(tmp_path / "s.zarr", sam)  # tiling from the store's attributes
    assert reopened.tile_shape == (TILE, TILE) and reopened.halo == (HALO, HALO)
    reader = TileEmbeddings(SamPredictor(sam), photo, grid, store=reopened)
    for index, embedding in written.items():
        loaded = reader.get(grid[index])
        assert torch.equal(loaded.features, embedding.features.cpu())
        assert loaded.features.dtype == torch.float32 and loaded.features.shape == (1, 128, 32, 32)
        assert loaded.original_size == embedding.original_size == grid[index].crop_shape
        assert loaded.input_size == embedding.input_size
    assert reader.loaded == [0, 4, 8] and reader.computed == []
    assert reopened.load(0, grid[1], None, reader.pixels(grid[1])) is None  # never stored
    assert reopened.completed(None).tolist() == [[True, False, False, False, True, False, False, False, True]]
    # what was stored is the encoder's answer for the crop, not something else that round-trips
    assert torch.equal(written[4].features.cpu(), fresh(sam, reader, grid[4]).features.cpu())
    info = reopened.info()
    assert info["model_type"] == "vit_small" and info["plane_shape"] == [100, 120] and info["dtype"] == "uint8"
    assert info["mappings"] == [{"group": group_name(None), "mapping": {"identity": True}, "planes": 1, "tiles_stored": 3}]
    assert "3 tile embedding(s)" in repr(reopened)


def test_write_behind_saves_in_the_background_and_reads_wait_for_it(tmp_path, sam, photo, monkeypatch):
    import threading

    grid = TileGrid(photo.shape[:2], TILE, HALO)
    store = EmbeddingStore(tmp_path / "s.zarr", sam, tile_shape=TILE, halo=HALO, write_behind=True)
    release = threading.Event()
    write = EmbeddingStore._write

    def slow_write(self, *args):  # a slow disk: the write waits until the test lets it go
        assert threading.current_thread() is not threading.main_thread()
        release.wait(30)
        write(self, *args)

    monkeypatch.setattr(EmbeddingStore, "_write", slow_write)
    writer = TileEmbeddings(SamPredictor(sam), photo, grid, store=store)
    embedding = writer.get(grid[4])  # returns while its write waits
    assert writer.computed == [4] and store._writes and not store._writes[0].done()
    other = EmbeddingStore(tmp_path / "s.zarr", sam)
    assert not other.completed(None).any()  # nothing on disk yet
    release.set()
    assert store.completed(None)[0].tolist() == [i == 4 for i in range(len(grid))]  # a read waits for the write
    loaded = EmbeddingStore(tmp_path / "s.zarr", sam).load(0, grid[4], None, writer.pixels(grid[4]))
    assert torch.equal(loaded.features, embedding.features.cpu())

    def failing_write(self, *args):
        raise OSError("No space left on device")

    monkeypatch.setattr(EmbeddingStore, "_write", failing_write)
    writer.get(grid[5])  # the prediction goes on; the write fails in the background
    with pytest.raises(OSError, match="No space left"):
        store.flush()
    store.close()
    assert EmbeddingStore(tmp_path / "s.zarr", sam).completed(None)[0].tolist() == [i == 4 for i in range(len(grid))]


def test_refuses_another_model_type_naming_both(tmp_path, sam):
    EmbeddingStore(tmp_path / "s.zarr", sam, tile_shape=TILE, halo=HALO)
    other = build_model("vit_test")
    with pytest.raises(StoreMismatchError) as caught:
        EmbeddingStore(tmp_path / "s.zarr", other, tile_shape=TILE, halo=HALO)
    message = str(caught.value)
    assert "model vit_small (weights" in message and "this is vit_test (weights" in message
    assert set(caught.value.differences) == {"weights_hash", "embedding_shape", "input_size"}
    assert caught.value.differences["embedding_shape"] == ((128, 32, 32), (256, 64, 64))
    assert caught.value.differences["input_size"] == (256, 1024)


def test_refuses_same_type_with_other_weights(tmp_path):
    first = build_model("vit_test")
    second = copy.deepcopy(first)
    assert weights_hash(first) == weights_hash(second)  # same weights, another object: same fingerprint
    with torch.no_grad():
        second.mask_decoder.iou_token.weight.add_(0.5)  # in place: the cached hash must notice
    assert weights_hash(first) != weights_hash(second)
    EmbeddingStore(tmp_path / "s.zarr", first, tile_shape=TILE, halo=HALO)
    with pytest.raises(StoreMismatchError) as caught:
        EmbeddingStore(tmp_path / "s.zarr", second, tile_shape=TILE, halo=HALO)
    assert set(caught.value.differences) == {"weights_hash"}
    stored, current = caught.value.differences["weights_hash"]
    assert stored == weights_hash(first) and current == weights_hash(second)
    assert f"model vit_test (weights {stored[:8]}...), this is vit_test (weights {current[:8]}...)" in str(caught.value)


def test_the_weights_decide_not_the_type_name_and_precision_is_checked(tmp_path, sam, photo):
    # The same weights chosen by a registry name in the widget and as a checkpoint file elsewhere fit.
    EmbeddingStore(tmp_path / "s.zarr", sam, model_type="vit_small", tile_shape=TILE, halo=HALO)
    EmbeddingStore(tmp_path / "s.zarr", sam, model_type="my_fine_tuned_name", tile_shape=TILE, halo=HALO)
    # bf16 embeddings differ from fp32 ones: a store of one precision is refused for the other.
    with pytest.raises(StoreMismatchError, match="precision fp32 vs bf16") as caught:
        EmbeddingStore(tmp_path / "s.zarr", sam, tile_shape=TILE, halo=HALO, precision="bf16")
    assert caught.value.differences == {"precision": ("fp32", "bf16")}
    store = EmbeddingStore(tmp_path / "s.zarr", sam, tile_shape=TILE, halo=HALO)
    grid = TileGrid(photo.shape[:2], TILE, HALO)
    with pytest.raises(ValueError, match="holds fp32 embeddings; this predictor runs in bf16"):
        TileEmbeddings(SamPredictor(sam, precision="bf16"), photo, grid, store=store)


def test_refuses_other_tiling_plane_shape_and_dtype(tmp_path, sam, photo, gray16):
    store = EmbeddingStore(tmp_path / "s.zarr", sam, tile_shape=TILE, halo=HALO)
    store.check_image(TileGrid(photo.shape[:2], TILE, HALO), photo.dtype)
    with pytest.raises(StoreMismatchError) as caught:
        EmbeddingStore(tmp_path / "s.zarr", sam, tile_shape=(96, 80), halo=12)
    assert caught.value.differences == {"tile_shape": ((64, 64), (96, 80)), "halo": ((8, 8), (12, 12))}
    assert "tile shape (64, 64) vs (96, 80); halo (8, 8) vs (12, 12)" in str(caught.value)

    reopened = EmbeddingStore(tmp_path / "s.zarr", sam)
    larger = np.zeros((110, 120), dtype=np.uint16)
    with pytest.raises(StoreMismatchError) as caught:
        TileEmbeddings(SamPredictor(sam), larger, TileGrid(larger.shape, TILE, HALO), store=reopened)
    assert caught.value.differences == {"plane_shape": ((100, 120), (110, 120)), "dtype": ("uint8", "uint16")}
    assert "plane shape (100, 120) vs (110, 120); dtype uint8 vs uint16" in str(caught.value)
    # the grid's own halo is checked too, even when the store object was opened with the right one
    with pytest.raises(StoreMismatchError, match="halo"):
        reopened.check_image(TileGrid(photo.shape[:2], TILE, 4), photo.dtype)
    with pytest.raises(StoreMismatchError, match="dtype uint8 vs uint16"):
        reopened.check_image(TileGrid(gray16.shape, TILE, HALO), gray16.dtype)


def test_changed_pixels_are_refused_or_recomputed(tmp_path, sam, photo):
    grid = TileGrid(photo.shape[:2], TILE, HALO)
    store = EmbeddingStore(tmp_path / "s.zarr", sam, tile_shape=TILE, halo=HALO)
    TileEmbeddings(SamPredictor(sam), photo, grid, store=store).get(grid[3])
    edited = photo.copy()
    edited[grid[3].crop[0] + 5, grid[3].crop[1] + 5] ^= 0xFF  # one pixel inside tile 3's crop
    strict = TileEmbeddings(SamPredictor(sam), edited, grid, store=EmbeddingStore(tmp_path / "s.zarr", sam))
    with pytest.raises(StoreMismatchError, match="Tile 3 of plane 0 .* other pixels: the image changed"):
        strict.get(grid[3])

    lenient_store = EmbeddingStore(tmp_path / "s.zarr", sam, on_mismatch="recompute")
    lenient = TileEmbeddings(SamPredictor(sam), edited, grid, store=lenient_store)
    recomputed = lenient.get(grid[3])
    assert lenient.computed == [3] and lenient.loaded == []
    assert torch.equal(recomputed.features.cpu(), fresh(sam, lenient, grid[3]).features.cpu())
    # the store now holds the edited image's tile, and the original image is the changed one
    again = TileEmbeddings(SamPredictor(sam), edited, grid, store=EmbeddingStore(tmp_path / "s.zarr", sam))
    assert torch.equal(again.get(grid[3]).features, recomputed.features.cpu()) and again.loaded == [3]
    with pytest.raises(StoreMismatchError, match="other pixels"):
        TileEmbeddings(SamPredictor(sam), photo, grid, store=EmbeddingStore(tmp_path / "s.zarr", sam)).get(grid[3])


def test_recompute_empties_a_store_of_another_model_or_image(tmp_path, sam, photo, caplog):
    grid = TileGrid(photo.shape[:2], TILE, HALO)
    store = EmbeddingStore(tmp_path / "s.zarr", sam, tile_shape=TILE, halo=HALO)
    TileEmbeddings(SamPredictor(sam), photo, grid, store=store).get(grid[0])
    other = build_model("vit_test")
    with caplog.at_level("WARNING", logger="napari_sam.embedding_store"):
        rebound = EmbeddingStore(tmp_path / "s.zarr", other, tile_shape=TILE, halo=HALO, on_mismatch="recompute")
    assert "model vit_small" in caplog.text and "recomputed" in caplog.text
    assert rebound.info()["model_type"] == "vit_test" and rebound.info()["mappings"] == []
    assert EmbeddingStore(tmp_path / "s.zarr", other).info()["weights_hash"] == weights_hash(other)

    # an image of another shape: emptied and bound to the new one
    store = EmbeddingStore(tmp_path / "t.zarr", sam, tile_shape=TILE, halo=HALO)
    TileEmbeddings(SamPredictor(sam), photo, grid, store=store).get(grid[0])
    smaller = np.ascontiguousarray(photo[:80, :90])
    small_grid = TileGrid(smaller.shape[:2], TILE, HALO)
    lenient = EmbeddingStore(tmp_path / "t.zarr", sam, on_mismatch="recompute")
    tiles = TileEmbeddings(SamPredictor(sam), smaller, small_grid, store=lenient)
    assert lenient.info()["plane_shape"] == [80, 90] and lenient.completed(None).sum() == 0
    tiles.get(small_grid[1])
    assert EmbeddingStore(tmp_path / "t.zarr", sam).completed(None).tolist() == [[False, True, False, False]]


def test_display_mappings_live_side_by_side(tmp_path, sam, gray16):
    grid = TileGrid(gray16.shape, TILE, HALO)
    store = EmbeddingStore(tmp_path / "s.zarr", sam, tile_shape=TILE, halo=HALO)
    narrow, wide = (10000.0, 40000.0), (0.0, 65535.0)
    first = TileEmbeddings(SamPredictor(sam), gray16, grid, contrast_limits=narrow, store=store).get(grid[2])
    second = TileEmbeddings(SamPredictor(sam), gray16, grid, contrast_limits=wide, store=store).get(grid[2])
    assert not torch.equal(first.features, second.features)  # the mapping changes the encoder's input
    assert group_name(narrow) != group_name(wide)

    reopened = EmbeddingStore(tmp_path / "s.zarr", sam)
    pixels = gray16[grid[2].crop_slices]
    assert torch.equal(reopened.load(0, grid[2], narrow, pixels).features, first.features.cpu())
    assert torch.equal(reopened.load(0, grid[2], wide, pixels).features, second.features.cpu())
    assert reopened.load(0, grid[2], (0.0, 30000.0), pixels) is None  # a third mapping: nothing stored
    assert sorted(m["contrast_limits"] for m in reopened.mappings()) == [list(wide), list(narrow)]
    # a view of the same pixels hashes like a copy (the hash is of shape, dtype and values)
    assert content_hash(pixels) == content_hash(pixels.copy()) != content_hash(pixels.astype(np.int32))


def test_planes_grow_on_demand(tmp_path, sam, photo):
    grid = TileGrid(photo.shape[:2], TILE, HALO)
    store = EmbeddingStore(tmp_path / "s.zarr", sam, tile_shape=TILE, halo=HALO)
    flipped = np.ascontiguousarray(photo[::-1])
    TileEmbeddings(SamPredictor(sam), photo, grid, store=store, plane_index=0).get(grid[5])
    later = TileEmbeddings(SamPredictor(sam), flipped, grid, store=store, plane_index=3).get(grid[5])
    done = EmbeddingStore(tmp_path / "s.zarr", sam).completed(None)
    assert done.shape == (4, 9) and np.argwhere(done).tolist() == [[0, 5], [3, 5]]
    reader = EmbeddingStore(tmp_path / "s.zarr", sam)
    reader.check_image(grid, photo.dtype)
    assert torch.equal(reader.load(3, grid[5], None, flipped[grid[5].crop_slices]).features, later.features.cpu())
    assert reader.load(2, grid[5], None, flipped[grid[5].crop_slices]) is None


def test_read_only_and_write_modes(tmp_path, sam, photo):
    grid = TileGrid(photo.shape[:2], TILE, HALO)
    with pytest.raises(FileNotFoundError):
        EmbeddingStore(tmp_path / "missing.zarr", sam, mode="r")
    store = EmbeddingStore(tmp_path / "s.zarr", sam, tile_shape=TILE, halo=HALO)
    embedding = TileEmbeddings(SamPredictor(sam), photo, grid, store=store).get(grid[0])

    read_only = EmbeddingStore(tmp_path / "s.zarr", sam, mode="r")
    reader = TileEmbeddings(SamPredictor(sam), photo, grid, store=read_only)
    assert torch.equal(reader.get(grid[0]).features, embedding.features.cpu())
    with pytest.raises(PermissionError, match="read-only"):
        read_only.save(0, grid[1], None, reader.pixels(grid[1]), embedding)
    inspect = EmbeddingStore(tmp_path / "s.zarr", mode="r")  # no model: inspection
    assert inspect.completed(None).sum() == 1 and inspect.info()["model_type"] == "vit_small"

    emptied = EmbeddingStore(tmp_path / "s.zarr", sam, tile_shape=TILE, halo=HALO, mode="w")
    assert emptied.info()["mappings"] == [] and emptied.info()["plane_shape"] is None
    with pytest.raises(ValueError, match="needs the model"):
        EmbeddingStore(tmp_path / "s.zarr", mode="a")
    with pytest.raises(ValueError, match="mode must be one of"):
        EmbeddingStore(tmp_path / "s.zarr", sam, mode="x")


def test_refuses_a_folder_that_is_not_a_store(tmp_path, sam):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    for mode in ("a", "w"):
        with pytest.raises(ValueError, match="not a zarr store"):
            EmbeddingStore(folder, sam, mode=mode)
    assert (folder / "notes.txt").read_text() == "keep me"
    import zarr

    zarr.open_group(tmp_path / "other.zarr", mode="w", attributes={"format": "something else"})
    with pytest.raises(ValueError, match="not a napari-sam embedding store"):
        EmbeddingStore(tmp_path / "other.zarr", sam, mode="w")


def test_features_without_hash_count_as_absent(tmp_path, sam, photo):
    """A process killed between the features chunk and the content hash leaves the tile absent."""
    grid = TileGrid(photo.shape[:2], TILE, HALO)
    store = EmbeddingStore(tmp_path / "s.zarr", sam, tile_shape=TILE, halo=HALO)
    tiles = TileEmbeddings(SamPredictor(sam), photo, grid, store=store)
    embedding = tiles.get(grid[0])
    group = store.root[group_name(None)]
    group["features"][0, 1] = embedding.features[0].cpu().numpy()  # features of tile 1 written, hash not
    (tmp_path / "s.zarr" / group_name(None) / "features" / "c" / "0" / "2.0123abcd.partial").write_bytes(b"half")
    reopened = EmbeddingStore(tmp_path / "s.zarr", sam)
    reader = TileEmbeddings(SamPredictor(sam), photo, grid, store=reopened)
    assert reopened.load(0, grid[1], None, reader.pixels(grid[1])) is None
    assert reopened.completed(None)[0].tolist() == [True] + [False] * 8
    assert torch.equal(reader.get(grid[0]).features, embedding.features.cpu())


def test_import_does_not_load_zarr():
    code = "import sys, napari_sam.embedding_store; print('zarr' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
