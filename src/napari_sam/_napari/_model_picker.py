"""The model choice controls (model, checkpoint file, device, precision), bound to a session.

Both widgets show these controls; they set the model of their viewer's session, and follow
it when another widget or ``napari_sam.segment`` changes it. The model menu lists the
registry's user-facing types (:func:`napari_sam.models.model_choices`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

from magicgui.widgets import ComboBox, FileEdit
from napari.utils.notifications import show_error

from ..models import AUTO, DEVICES, ModelSpec, default_model_type, model_choices
from ..predictor import PRECISIONS
from ._errors import describe_error
from ._session import SegmentationSession

_logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "file"
PRECISION_HELP = "fp32 gives the reference's results; bf16 can be faster on recent CPUs and GPUs; fp16 needs a GPU."


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
        self._model = ComboBox(label="Model", choices=model_choices() + [("Checkpoint file (type detected)",
                                                                        CHECKPOINT_FILE)])
        self._checkpoint = FileEdit(label="Checkpoint", mode="r", filter="*.pth *.pt")
        self._device = ComboBox(label="Device", choices=list(DEVICES), value=AUTO)
        self._precision = ComboBox(label="Precision", choices=list(PRECISIONS), value="fp32", tooltip=PRECISION_HELP)
        self._precision.visible = precision
        self._checkpoint.visible = False
        self.widgets = [self._model, self._checkpoint, self._device, self._precision]
        self._updating = False
        if session.spec is not None:
            self._show()
        else:
            self._model.value = default_model_type()
        for control in self.widgets:
            control.changed.connect(self._apply)
        self.disconnect = session.on_model_changed(self._show)
        self._model.native.destroyed.connect(lambda *_: self.disconnect())  # the host widget is gone
        if not session.has_model:
            self._apply()

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
                self._model.value = spec.model_type
            self._checkpoint.visible = self._model.value == CHECKPOINT_FILE
            if spec.device in DEVICES:
                self._device.value = spec.device
            self._precision.value = spec.precision
        finally:
            self._updating = False
