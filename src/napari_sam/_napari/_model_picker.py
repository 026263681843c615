"""The model choice controls (model, checkpoint file, device, precision), bound to a session.

Both widgets show these controls; they set the model of their viewer's session, and follow
it when another widget or ``napari_sam.segment`` changes it. The model menu lists the
registry's user-facing types grouped (general SAM, light and electron microscopy,
histopathology, medical imaging, offline), each with its download size and whether its
weights are already downloaded (:func:`napari_sam.models.model_choices`).

A weights download (started by whichever job loads the model) shows napari progress and a
"Cancel download" button under the menu; cancelling stops it at the next chunk and leaves no
partial file (:func:`napari_sam.models.weights.cancel_downloads`); the job that needed the
model then fails with "cancelled" in the status area.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

from magicgui.widgets import ComboBox, FileEdit, PushButton
from napari.utils.notifications import show_error
from qtpy.QtCore import QObject, Signal

from ..models import AUTO, DEVICES, ModelSpec, default_model_type, model_choices
from ..models import weights
from ..predictor import PRECISIONS
from ._errors import describe_error
from ._session import SegmentationSession

_logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "file"
PRECISION_HELP = "fp32 gives the reference's results; bf16 can be faster on recent CPUs and GPUs; fp16 needs a GPU."


class _DownloadMonitor(QObject):
    """Relays download events (from any thread) to the GUI thread, and shows one napari
    progress bar per download. One per process (:func:`download_monitor`); pickers listen to
    ``shown``, emitted on the GUI thread after each event is shown."""

    event = Signal(object)
    shown = Signal(object)

    def __init__(self) -> None:
        super().__init__()
        self._bars: dict[str, Any] = {}
        self.event.connect(self._show)
        self.disconnect = weights.on_download(self.event.emit)

    def _show(self, event: "weights.DownloadEvent") -> None:
        try:
            self._update_bar(event)
        finally:
            self.shown.emit(event)

    def _update_bar(self, event: "weights.DownloadEvent") -> None:
        from napari.utils import progress

        bar = self._bars.get(event.filename)
        if event.ended:
            if bar is not None:
                self._bars.pop(event.filename).close()
            return
        if bar is None:
            bar = self._bars[event.filename] = progress(total=0, desc=f"Downloading {event.name} weights")
        if event.total and bar.total != event.total:
            bar.total = event.total
        bar.n = event.done
        bar.set_description(f"Downloading {event.name} weights: {event.done / 2**20:.0f} MiB")
        bar.refresh()


_MONITOR: Optional[_DownloadMonitor] = None


def download_monitor() -> _DownloadMonitor:
    """The process's download monitor, created on first use (on the GUI thread)."""
    global _MONITOR
    if _MONITOR is None:
        _MONITOR = _DownloadMonitor()
    return _MONITOR


class ModelPicker:
    """Model, checkpoint, device and precision controls for a session.

    Args:
        session: the viewer's session, whose model choice the controls set and show.
        on_error: called with a message when the controls do not describe a usable model
            (e.g. "Checkpoint file" chosen without a file) or the choice failed. A model that
            cannot be loaded (no network, bad file) fails later, in the job that loads it
            (:meth:`SegmentationSession.run`'s error path).
        precision: show the precision control.

    Attributes:
        widgets: the controls, in display order, for the host widget to add.
    """

    def __init__(
        self, session: SegmentationSession, on_error: Callable[[str], None], precision: bool = True
    ) -> None:
        self.session = session
        self._on_error = on_error
        self._model = ComboBox(label="Model", choices=self._choices())
        self._checkpoint = FileEdit(label="Checkpoint", mode="r", filter="*.pth *.pt")
        self._cancel_download = PushButton(text="Cancel download", visible=False,
                                           tooltip="Stop the weights download; no partial file is kept.")
        self._cancel_download.changed.connect(self.cancel_download)
        self._device = ComboBox(label="Device", choices=list(DEVICES), value=AUTO)
        self._precision = ComboBox(label="Precision", choices=list(PRECISIONS), value="fp32", tooltip=PRECISION_HELP)
        self._precision.visible = precision
        self._checkpoint.visible = False
        self.widgets = [self._model, self._checkpoint, self._cancel_download, self._device, self._precision]
        self._updating = False
        if session.spec is not None:
            self._show()
        else:
            self._model.value = default_model_type()
        for control in (self._model, self._checkpoint, self._device, self._precision):
            control.changed.connect(self._apply)
        disconnect_model = session.on_model_changed(self._show)
        monitor = download_monitor()
        monitor.shown.connect(self._on_download)

        def disconnect() -> None:
            disconnect_model()
            try:
                monitor.shown.disconnect(self._on_download)
            except (TypeError, RuntimeError):
                pass

        self.disconnect = disconnect
        self._model.native.destroyed.connect(lambda *_: self.disconnect())  # the host widget is gone
        if not session.has_model:
            self._apply()

    @staticmethod
    def _choices() -> list[tuple[str, str]]:
        return model_choices() + [("Checkpoint file (type detected)", CHECKPOINT_FILE)]

    def refresh(self) -> None:
        """Rebuild the menu's labels (which weights are downloaded), keeping the choice."""
        self._updating = True
        try:
            value = self._model.value
            choices = self._choices()
            self._model.choices = choices
            if value in [v for _, v in choices]:  # a type unregistered since (tests) is not kept
                self._model.value = value
        finally:
            self._updating = False

    def cancel_download(self, _: Any = None) -> None:
        """Cancel the weights downloads running now (see :func:`napari_sam.models.weights.cancel_downloads`)."""
        if weights.cancel_downloads():
            self._cancel_download.enabled = False
            self._cancel_download.text = "Cancelling download..."

    def _on_download(self, event: "weights.DownloadEvent") -> None:
        if event.ended:
            self._cancel_download.visible = weights.downloads_running() > 0
            if event.state == "finished":
                self.refresh()  # "[downloaded]"
        elif event.state == "started":
            self._cancel_download.text, self._cancel_download.enabled = "Cancel download", True
            self._cancel_download.visible = True

    @property
    def model_type(self) -> str:
        """The type chosen in the menu, or "auto" for a checkpoint file."""
        return AUTO if self._model.value == CHECKPOINT_FILE else self._model.value

    def spec(self) -> ModelSpec:
        """The model the controls describe.

        Raises:
            ValueError: "Checkpoint file" is chosen but no existing file is.
        """
        checkpoint = None
        if self._model.value == CHECKPOINT_FILE:
            path = os.fspath(self._checkpoint.value) if self._checkpoint.value else ""
            checkpoint = path if path and path != "." else None
            if checkpoint is None or not os.path.isfile(checkpoint):
                raise ValueError(f"Choose a SAM checkpoint file (.pth); {path!r} is not a file.")
        return ModelSpec(self.model_type, checkpoint, self._device.value, self._precision.value)

    def _apply(self, _: Any = None) -> None:
        if self._updating:
            return
        self._checkpoint.visible = self._model.value == CHECKPOINT_FILE
        try:
            spec = self.spec()
        except ValueError as error:
            self._on_error(str(error))
            return
        try:
            self.session.choose(spec)
        except Exception as error:  # e.g. a widget following the session failed: say so, stay usable
            _logger.error("Choosing %s failed", spec.label, exc_info=True)
            self._on_error(describe_error(error))
            show_error(f"Segment Anything: choosing {spec.label} failed: {describe_error(error)}")

    def _show(self) -> None:
        """Show the session's model choice (set elsewhere) without choosing again."""
        spec: Optional[ModelSpec] = self.session.spec
        if spec is None:
            return
        self._updating = True
        try:
            if spec.checkpoint:
                self._model.value = CHECKPOINT_FILE
                self._checkpoint.value = spec.checkpoint
            elif spec.model_type in [value for _, value in model_choices()]:
                if spec.model_type not in self._model.choices:  # registered after this menu was built
                    self._model.choices = self._choices()
                self._model.value = spec.model_type
            self._checkpoint.visible = self._model.value == CHECKPOINT_FILE
            if spec.device in DEVICES:
                self._device.value = spec.device
            self._precision.value = spec.precision
        finally:
            self._updating = False
