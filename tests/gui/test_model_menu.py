"""The model picker's grouped menu, downloaded marks, and download progress with Cancel."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gui


def test_grouped_menu_download_progress_and_cancel(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from napari_sam._napari._widget import SamWidget
    from napari_sam.models import weights
    from napari_sam.models.registry import GROUPS

    monkeypatch.setenv(weights.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(weights.MIRROR_ENV, "http://127.0.0.1:9")  # nothing is downloaded for real
    widget = SamWidget(make_napari_viewer())
    picker = widget._picker

    def cancel_shown() -> bool:  # shown in its widget (explicitly hidden otherwise)
        return not picker._cancel_download.native.isHidden()

    labels = [picker._model.native.itemText(i) for i in range(picker._model.native.count())]
    groups = [label.split(" | ")[0] for label in labels[:-1]]  # the last item: "Checkpoint file"
    assert groups == sorted(groups, key=GROUPS.index) and "Light microscopy" in groups
    assert any(label.startswith("Light microscopy | vit_b_lm:") and label.endswith("[not downloaded]")
               for label in labels)
    assert picker._model.value == "vit_small" and not cancel_shown()

    # A download (events as fetch_weights sends them, from a worker thread) shows Cancel.
    cancelled = []
    monkeypatch.setattr(weights, "cancel_downloads", lambda: cancelled.append(1) or 1)
    entry = weights.known_weights("vit_b_lm")
    weights._emit(weights.DownloadEvent("vit_b_lm", entry.filename, 0, 0, "started"))
    weights._emit(weights.DownloadEvent("vit_b_lm", entry.filename, 2**20, 10 * 2**20, "progress"))
    qtbot.waitUntil(cancel_shown, timeout=5000)
    picker._cancel_download.native.click()
    assert cancelled and not picker._cancel_download.enabled
    # The download ends (here: finished, the file is in the cache): Cancel goes, the menu says downloaded.
    (tmp_path / entry.filename).write_bytes(b"x")
    weights._emit(weights.DownloadEvent("vit_b_lm", entry.filename, 10 * 2**20, 10 * 2**20, "finished"))
    qtbot.waitUntil(lambda: not cancel_shown(), timeout=5000)
    texts = [picker._model.native.itemText(i) for i in range(picker._model.native.count())]
    assert any(t.startswith("Light microscopy | vit_b_lm:") and t.endswith("[downloaded]") for t in texts)
    assert picker._model.value == "vit_small"  # the choice is kept
