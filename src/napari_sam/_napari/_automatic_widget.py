"""The "Automatic segmentation" widget: SAM's automatic mask generator on napari image layers.

Thin Qt layer over :mod:`napari_sam.interactive.automatic`: the settings (every AMG option,
with the reference's defaults, except the thresholds of the bundled vit_small, and a
tooltip each), a Run and a Cancel button and a progress bar. The work runs in a napari
``thread_worker`` that yields after every point batch, so the GUI stays responsive and
Cancel stops between batches. The result is one Labels layer
("<image> automatic", aligned with the image) with one id per mask and a features table.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pandas as pd
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, Label, ProgressBar, PushButton, SpinBox
from napari.layers import Image, Labels
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info

from ..checkpoints import default_model_type, recommended_amg_thresholds
from ..interactive.automatic import AMG_SETTINGS, AutomaticResult, all_slices, automatic_steps, write_slice
from ..interactive.engine import ModelSpec, display_rgb, load_model
from ._layers import current_slice, image_array, spatial_shape, transform_kwargs

MODEL_CHOICES = [
    ("napari-sam small model (bundled, offline)", "vit_small"),
    ("vit_b (official weights, downloaded once)", "vit_b"),
    ("vit_l (official weights)", "vit_l"),
    ("vit_h (official weights)", "vit_h"),
    ("Small offline model (vit_test, random weights)", "vit_test"),
]


class AutomaticSegmentationWidget(Container):
    """Segment everything in the current slice (or every slice) of an image layer."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self._image = ComboBox(label="Image", choices=self._image_choices, tooltip="Image layer to segment.")
        self._model = ComboBox(label="Model", choices=MODEL_CHOICES, value=default_model_type())
        self._device = ComboBox(label="Device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self._precision = ComboBox(
            label="Precision", choices=["fp32", "bf16"], value="fp32",
            tooltip="fp32 gives the reference's results; bf16 is faster on recent CPUs and GPUs.",
        )
        self._settings: dict[str, Any] = {}
        for name, default, tooltip in AMG_SETTINGS:
            label = name.replace("_", " ")
            if isinstance(default, int):
                widget = SpinBox(label=label, value=default, min=0 if "crop" in name or "area" in name else 1,
                                 max=100_000, tooltip=tooltip)
            else:
                widget = FloatSpinBox(label=label, value=default, min=-100.0, max=100.0, step=0.01, tooltip=tooltip)
            self._settings[name] = widget
        self._all_slices = CheckBox(text="All slices (nD images)", value=False,
                                    tooltip="Segment every slice along the non-displayed axes, not only the current one.")
        self._run = PushButton(text="Run")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(value=0, max=1, label="Progress")
        self._status = Label(value="")
        self.extend([self._image, self._model, self._device, self._precision, *self._settings.values(),
                     self._all_slices, self._run, self._cancel, self._progress, self._status])
        self._run.changed.connect(self.run)
        self._cancel.changed.connect(self.cancel)
        self._model.changed.connect(self._apply_model_thresholds)
        self._apply_model_thresholds(self._model.value)
        self._viewer.layers.events.inserted.connect(self._image.reset_choices)
        self._viewer.layers.events.removed.connect(self._image.reset_choices)
        self._worker: Any = None
        self._model_cache: dict[ModelSpec, Any] = {}
        self.result_layer: Optional[Labels] = None

    def _apply_model_thresholds(self, model_type: str) -> None:
        """Set the predicted-IoU, stability and box-NMS thresholds for ``model_type``: the bundled
        vit_small's own (see ``recommended_amg_thresholds``), the reference's defaults otherwise."""
        thresholds = {name: default for name, default, _ in AMG_SETTINGS
                      if name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh")}
        thresholds.update(recommended_amg_thresholds(model_type))
        for name, value in thresholds.items():
            self._settings[name].value = value

    def _image_choices(self, *_: Any) -> list[Image]:
        return [layer for layer in self._viewer.layers if isinstance(layer, Image)]

    def settings(self) -> dict[str, Any]:
        """The AMG keyword arguments chosen in the widget."""
        return {name: widget.value for name, widget in self._settings.items()}

    @property
    def worker(self) -> Any:
        return self._worker

    def _model_for(self, spec: ModelSpec) -> Any:
        if spec not in self._model_cache:
            self._model_cache.clear()  # hold one model at a time
            self._model_cache[spec] = load_model(spec)
        return self._model_cache[spec]

    def run(self, _: Any = None) -> Any:
        """Start the automatic segmentation in a background worker; returns the worker."""
        image = self._image.value
        if image is None:
            show_error("Automatic segmentation: add or choose an image layer first.")
            return None
        if self._worker is not None:
            show_info("Automatic segmentation is already running; cancel it first.")
            return None
        try:
            spec = current_slice(self._viewer, image)
        except ValueError as error:
            show_error(str(error))
            return None
        slices = all_slices(spec) if self._all_slices.value else [spec]
        model_spec = ModelSpec(self._model.value, None, self._device.value, self._precision.value)
        settings = self.settings()
        data, rgb, limits = image_array(image), bool(image.rgb), tuple(image.contrast_limits)

        def work():
            from ..automatic_mask_generator import SamAutomaticMaskGenerator

            generator = SamAutomaticMaskGenerator(self._model_for(model_spec), precision=model_spec.precision,
                                                  **settings)
            planes = [(s, display_rgb(s.take(data, rgb=rgb), limits, rgb)) for s in slices]
            return (yield from automatic_steps(generator, planes))

        worker = thread_worker(work, start_thread=False)()
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(lambda result: self._on_returned(image, result))
        worker.errored.connect(lambda error: show_error(f"Automatic segmentation failed: {error}"))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._run.enabled, self._cancel.enabled = False, True
        self._status.value = f"Segmenting {len(slices)} slice(s) of {image.name}..."
        worker.start()
        return worker

    def cancel(self, _: Any = None) -> None:
        """Stop after the current point batch; nothing is written."""
        if self._worker is not None:
            self._worker.quit()
            self._status.value = "Cancelling..."

    def _on_progress(self, progress: Any) -> None:
        self._progress.max = max(1, progress.total)
        self._progress.value = progress.done
        self._status.value = f"Slice {progress.slice_index + 1}/{progress.slices}: {progress.masks} masks so far"

    def _on_finished(self) -> None:
        if self._worker is not None and self._worker.abort_requested:
            self._status.value = "Cancelled."
        self._worker = None
        self._run.enabled, self._cancel.enabled = True, False

    def _on_returned(self, image: Image, result: AutomaticResult) -> None:
        name = f"{image.name} automatic"
        layer = self.result_layer if self.result_layer in self._viewer.layers else None
        if layer is None or tuple(layer.data.shape) != spatial_shape(image):
            data = np.zeros(spatial_shape(image), dtype=np.uint32)
            layer = self._viewer.add_labels(data, name=name, **transform_kwargs(image))
            self.result_layer = layer
        data = layer.data
        for spec, labels in zip(result.slices, result.labels):
            write_slice(data, spec, labels)
        layer.features = pd.DataFrame(result.features)
        layer.refresh()
        count = len(result.features["label"])
        self._status.value = f"{count} masks in {len(result.slices)} slice(s)."
