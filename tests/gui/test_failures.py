"""Every failure of a background job leaves both widgets usable and says why (project issue 29).

superqt's GeneratorWorker swallows a RuntimeError raised in a generator (no ``errored``, no
``finished``), and a failed download and torch's out-of-memory error are RuntimeErrors: the
widgets stayed busy for good. These tests inject each kind of failure into both widgets, and
run a real offline download, then check the widget's state, its status area and napari's
notification, and that the next job (another model) works.
"""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from napari_sam.interactive.automatic import AutomaticProgress

pytestmark = pytest.mark.gui

# A job that never ends would wait forever; the failures are immediate.
WAIT_MS = 30_000
OFFLINE_TYPE = "vit_offline_test"


class CustomRuntimeError(RuntimeError):
    """A RuntimeError subclass, like DownloadError."""


def make_error(kind: str) -> BaseException:
    import torch

    from napari_sam.models.weights import DownloadError

    return {
        "RuntimeError subclass": CustomRuntimeError("something broke in the worker"),
        "out of memory": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        "ValueError": ValueError("a plain bug"),
        "download": DownloadError("Could not download sam_vit_b_01ec64.pth from http://127.0.0.1:9/: refused"),
        "StopIteration": StopIteration(),  # a RuntimeError once it leaves a generator (PEP 479)
    }[kind]


KINDS = ["RuntimeError subclass", "out of memory", "ValueError", "download", "StopIteration"]
EXPECTED_TEXT = {
    "RuntimeError subclass": "something broke in the worker",
    "out of memory": "Out of memory",
    "ValueError": "a plain bug",
    "download": "could not be downloaded",
    "StopIteration": "StopIteration",
}


@pytest.fixture
def notifications():
    """The napari notifications emitted during the test."""
    from napari.utils.notifications import notification_manager

    seen: list = []
    notification_manager.notification_ready.connect(seen.append)
    yield seen
    notification_manager.notification_ready.disconnect(seen.append)


def error_notifications(seen: list) -> list[str]:
    from napari.utils.notifications import NotificationSeverity

    return [str(n.message) for n in seen if n.severity == NotificationSeverity.ERROR]


@pytest.fixture
def offline_type(monkeypatch, tmp_path):
    """A user-facing model type whose weights URL cannot be reached (an empty cache, no mirror)."""
    from napari_sam.models import ModelEntry, SamConfig, register_model, unregister_model
    from napari_sam.models.weights import KnownWeights

    monkeypatch.setenv("NAPARI_SAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NAPARI_SAM_MIRROR", raising=False)
    config = SamConfig(32, 2, 2, (1,), img_size=128, window_size=4, prompt_embed_dim=32, decoder_mlp_dim=64,
                       decoder_num_heads=2, iou_head_hidden_dim=32, mask_in_chans=4)
    weights = KnownWeights(OFFLINE_TYPE, OFFLINE_TYPE, "offline.pth", "http://127.0.0.1:9/offline.pth",
                           "xxh128:00000000000000000000000000000000", "unreachable test weights")
    register_model(ModelEntry(OFFLINE_TYPE, config, "Unreachable test model", weights=weights))
    yield OFFLINE_TYPE
    unregister_model(OFFLINE_TYPE)


def click(layer, position):
    from napari.utils._test_utils import read_only_mouse_event
    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

    mouse_press_callbacks(layer, read_only_mouse_event(type="mouse_press", position=tuple(position)))
    mouse_release_callbacks(layer, read_only_mouse_event(type="mouse_release", position=tuple(position)))


def open_interactive(make_napari_viewer):
    from napari_sam._napari._widget import SamWidget

    viewer = make_napari_viewer()
    viewer.add_image(data.coins()[:96, :96], name="coins")
    widget = SamWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment Anything")
    return viewer, widget


def assert_usable_after_error(widget, notifications, text):
    assert not widget.busy and widget.worker is None
    assert widget._status.is_error and text in widget._status.value, widget._status.value
    assert text in widget._status.tooltip  # the whole message, also on hover
    errors = error_notifications(notifications)
    assert errors and text in errors[-1], errors


# -- the interactive widget ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_interactive_widget_survives_a_failing_job(make_napari_viewer, qtbot, notifications, kind):
    viewer, widget = open_interactive(make_napari_viewer)
    widget._picker._model.value = "vit_small"  # the bundled model
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)  # the first embedding (no prompts yet)
    engine = widget.engine
    engine.cache.clear()
    computed = engine.embeddings_computed
    real_steps = engine.embedding_steps
    error = make_error(kind)

    def failing_steps(rgb):
        yield (1, 2)  # fails after a first step, as running out of memory in the encoder does
        raise error

    engine.embedding_steps = failing_steps
    click(widget.points_layer, (40, 40))
    click(widget.points_layer, (50, 50))  # queued behind the failing job: dropped, it would fail the same way
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    assert_usable_after_error(widget, notifications, EXPECTED_TEXT[kind])
    assert engine.embeddings_computed == computed

    # The next prompt runs again and works.
    engine.embedding_steps = real_steps
    click(widget.points_layer, (60, 60))
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    assert not widget._status.is_error and "object(s)" in widget._status.value, widget._status.value
    assert widget.current_layer.data.any()


def test_a_failing_load_then_another_model(make_napari_viewer, qtbot, notifications, monkeypatch):
    """The model cannot load (any exception in ModelSpec.load): choosing another model goes on."""
    from napari_sam.models import ModelSpec

    viewer, widget = open_interactive(make_napari_viewer)
    real_load = ModelSpec.load

    def load(spec, progress_callback=None):
        if spec.model_type == "vit_b":
            raise make_error("download")
        return real_load(spec, progress_callback)

    monkeypatch.setattr(ModelSpec, "load", load)
    widget._picker._model.value = "vit_b"
    click(widget.points_layer, (40, 40))
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    assert_usable_after_error(widget, notifications, "could not be downloaded")
    assert widget._commit_when_ready is False
    widget._picker._model.value = "vit_small"
    qtbot.waitUntil(lambda: not widget.busy and widget.current_layer.data.any(), timeout=WAIT_MS)
    assert not widget._status.is_error


def test_offline_download_then_the_bundled_model(make_napari_viewer, qtbot, notifications, offline_type, tmp_path):
    """The tester's case for real: weights at an unreachable address, then back to the bundled model."""
    viewer, widget = open_interactive(make_napari_viewer)
    widget._picker._model.value = offline_type
    click(widget.points_layer, (40, 40))
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    assert_usable_after_error(widget, notifications, "could not be downloaded")
    message = widget._status.value
    assert "http://127.0.0.1:9/offline.pth" in message and str(tmp_path / "cache") in message  # where to put a copy
    assert not (tmp_path / "cache" / "offline.pth").exists()

    widget._picker._model.value = "vit_small"
    qtbot.waitUntil(lambda: not widget.busy and widget.current_layer.data.any(), timeout=WAIT_MS)
    assert "object(s)" in widget._status.value and not widget._status.is_error
    assert widget.commit() == [1] and widget.output_layer.data.max() == 1


def test_a_failing_model_choice_is_reported(make_napari_viewer, notifications, monkeypatch):
    """The model picker: a choice that fails is shown in the status area and as a notification."""
    viewer, widget = open_interactive(make_napari_viewer)

    def choose(spec):
        raise RuntimeError("no such device")

    monkeypatch.setattr(widget.session, "choose", choose)
    widget._picker._model.value = "vit_b"
    assert widget._status.is_error and "no such device" in widget._status.value
    assert any("no such device" in m for m in error_notifications(notifications))


# -- the automatic widget ------------------------------------------------------------------------
def open_automatic(make_napari_viewer):
    from napari_sam._napari._automatic_widget import AutomaticSegmentationWidget

    viewer = make_napari_viewer()
    viewer.add_image(data.coins()[:96, :96], name="coins")
    widget = AutomaticSegmentationWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Automatic segmentation")
    widget._picker._model.value = "vit_small"
    widget._settings["points_per_side"].value = 4
    return viewer, widget


def assert_automatic_usable_after_error(widget, notifications, text):
    assert widget.worker is None and widget._run.enabled and not widget._cancel.enabled
    assert widget._status.is_error and text in widget._status.value, widget._status.value
    errors = error_notifications(notifications)
    assert errors and text in errors[-1], errors


@pytest.mark.parametrize("kind", KINDS)
def test_automatic_widget_survives_a_failing_job(make_napari_viewer, qtbot, notifications, monkeypatch, kind):
    from napari_sam._napari import _automatic_widget

    viewer, widget = open_automatic(make_napari_viewer)
    real_steps = _automatic_widget.automatic_steps
    error = make_error(kind)

    def failing_steps(generator, planes):
        yield AutomaticProgress(done=1, total=4, slice_index=0, slices=1, masks=0)
        raise error

    monkeypatch.setattr(_automatic_widget, "automatic_steps", failing_steps)
    worker = widget.run()
    assert worker is not None and not widget._run.enabled
    qtbot.waitUntil(lambda: widget.worker is None, timeout=WAIT_MS)
    assert_automatic_usable_after_error(widget, notifications, EXPECTED_TEXT[kind])
    assert "coins automatic" not in viewer.layers
    widget.cancel()  # nothing to cancel: harmless

    monkeypatch.setattr(_automatic_widget, "automatic_steps", real_steps)
    worker = widget.run()
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        pass
    assert "coins automatic" in viewer.layers and not widget._status.is_error


def test_automatic_widget_offline_download_then_the_bundled_model(
    make_napari_viewer, qtbot, notifications, offline_type
):
    viewer, widget = open_automatic(make_napari_viewer)
    widget._picker._model.value = offline_type
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=WAIT_MS)
    assert_automatic_usable_after_error(widget, notifications, "could not be downloaded")
    assert "http://127.0.0.1:9/offline.pth" in widget._status.value

    widget._picker._model.value = "vit_small"
    worker = widget.run()
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        pass
    assert "coins automatic" in viewer.layers and "masks in 1 slice(s)" in widget._status.value


# -- the session's error path, without a widget ----------------------------------------------------
@pytest.mark.parametrize("generator", [True, False])
def test_session_run_ends_every_failing_job(make_napari_viewer, qtbot, notifications, generator):
    from napari_sam._napari._session import session_for

    session = session_for(make_napari_viewer())
    events: list = []

    def work_generator():
        yield 1
        raise CustomRuntimeError("boom")

    def work_function():
        raise CustomRuntimeError("boom")

    worker = session.run(work_generator if generator else work_function, task="Test job",
                         errored=lambda error: events.append(("errored", error)),
                         finished=lambda: events.append(("finished",)))
    qtbot.waitUntil(lambda: len(events) == 2, timeout=WAIT_MS)
    assert events[0][0] == "errored" and isinstance(events[0][1], CustomRuntimeError)  # the original exception
    assert events[1] == ("finished",)
    assert worker not in session._workers
    assert error_notifications(notifications)[-1] == "Test job failed: CustomRuntimeError: boom"


def test_describe_error_messages():
    from napari_sam._napari._errors import describe_error, is_out_of_memory
    from napari_sam.models.state_dict import CheckpointError

    assert describe_error(make_error("out of memory")).startswith("Out of memory: CUDA out of memory.")
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(ValueError("out of memory"))
    assert describe_error(CheckpointError("bad.pth is not a SAM checkpoint")) == "bad.pth is not a SAM checkpoint"
    assert describe_error(KeyError("x")) == "KeyError: 'x'"
    assert describe_error(np.linalg.LinAlgError()) == "LinAlgError"
