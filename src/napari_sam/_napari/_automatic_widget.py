"""The "Automatic segmentation" widget: SAM's automatic mask generator on napari image layers.

Thin Qt layer over :mod:`napari_sam.interactive.automatic`: the settings (one control per
tunable field of :class:`~napari_sam.amg_settings.AmgSettings`, generated from its type,
default, bounds and help; the chosen model's own thresholds, see
:meth:`~napari_sam.amg_settings.AmgSettings.for_model`), a Run and a Cancel button and a
progress bar. The model is the viewer's session's (shared with the "Segment Anything" widget
and ``napari_sam.segment``); the work runs on the session's worker thread and yields after
every point batch, so the GUI stays responsive and Cancel stops between batches. The result is one Labels layer
("<image> automatic", aligned with the image) with one id per mask and a features table.

Large slices are tiled (the "Tiling" setting, as in the "Segment Anything" widget):
:class:`napari_sam.TiledAutomaticMaskGenerator` segments them tile by tile at native
resolution, with the embeddings store when one is given.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional, Union

import numpy as np
import pandas as pd
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, ProgressBar, PushButton, SpinBox
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info

from ..amg_settings import AmgSettings
from ..interactive.automatic import (
    AutomaticResult, all_slices, automatic_steps, link_into_objects, tiled_automatic_steps,
)
from ..interactive.engine import SlicePlane, display_rgb, store_plane_index
from ..interactive.volume_object import propagation_axis
from ._errors import describe_error
from ._layers import current_slice, image_array, raise_prompt_layers, spatial_shape, transform_kwargs
from ._model_picker import ModelPicker
from ._session import session_for, unwrap_viewer
from ._status import StatusArea, add_full_width
from ._tiling_controls import TilingControls


# Step of the float controls; an open upper bound (e.g. crop_overlap_ratio < 1) stops one step short.
FLOAT_STEP = 0.01


def _limits(limits: tuple[float, ...]) -> tuple[float, float]:
    """A layer's contrast limits as a valid (low, high) mapping (a flat range gets one intensity step)."""
    low, high = float(limits[0]), float(limits[1])
    return (low, high) if high > low else (low, low + 1.0)


def setting_controls(settings_class: type[AmgSettings] = AmgSettings) -> dict[str, Union[SpinBox, FloatSpinBox]]:
    """One control per tunable setting of ``settings_class``, in field order.

    Args:
        settings_class: :class:`~napari_sam.amg_settings.AmgSettings` or a subclass.

    Returns:
        Field name -> a ``SpinBox`` (int fields) or ``FloatSpinBox`` (float fields) named after
        the field, at its default, limited to its bounds, with its help as tooltip.
    """
    controls: dict[str, Union[SpinBox, FloatSpinBox]] = {}
    for setting in settings_class.tunable_fields():
        if setting.type is int:
            high = setting.max - 1 if setting.open_max else setting.max
            control = SpinBox(name=setting.name, label=setting.label, value=setting.default, min=setting.min,
                              max=high, tooltip=setting.help)
        else:
            high = setting.max - FLOAT_STEP if setting.open_max else setting.max
            control = FloatSpinBox(name=setting.name, label=setting.label, value=setting.default, min=setting.min,
                                   max=high, step=FLOAT_STEP, tooltip=setting.help)
        controls[setting.name] = control
    return controls


class AutomaticSegmentationWidget(Container):
    """Segment everything in the current slice (or every slice) of an image layer.

    Args:
        napari_viewer: the viewer.
        settings_class: the settings whose tunable fields become controls (default
            :class:`~napari_sam.amg_settings.AmgSettings`; a subclass adds settings).
    """

    def __init__(self, napari_viewer: Any, settings_class: type[AmgSettings] = AmgSettings) -> None:
        super().__init__(labels=True)
        self._viewer = unwrap_viewer(napari_viewer)
        self.session = session_for(self._viewer)
        self._image = ComboBox(label="Image", choices=self._image_choices, tooltip="Image layer to segment.")
        self._status = StatusArea("")
        self._picker = ModelPicker(self.session, self._status.show_error)
        self._settings_class = settings_class
        self._settings = setting_controls(settings_class)
        self._tiling = TilingControls()
        self._model_overrides: dict[str, Any] = {}  # the settings the current model changed
        self._all_slices = CheckBox(text="All slices (nD images)", value=False,
                                    tooltip="Segment every slice along the non-displayed axes, not only the current one.")
        self._objects_3d = CheckBox(
            text="3-D objects (link slices)", value=False,
            tooltip="Segment every slice along the last-moved (or last) slider axis and link the masks into "
                    "3-D objects by their overlap between neighbouring slices: one id per object through the "
                    "stack (or time-lapse).",
        )
        self._run = PushButton(text="Run")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(value=0, max=1, label="Progress")
        self.extend([self._image, *self._picker.widgets, *self._tiling.widgets, *self._settings.values(),
                     self._all_slices, self._objects_3d, self._run, self._cancel, self._progress])
        add_full_width(self, self._status)
        self._run.changed.connect(self.run)
        self._cancel.changed.connect(self.cancel)
        self._disconnect_model = self.session.on_model_changed(self._on_model_changed)
        self.native.destroyed.connect(lambda *_: self._disconnect_model())
        self._on_model_changed()
        self._viewer.layers.events.inserted.connect(self._image.reset_choices)
        self._viewer.layers.events.removed.connect(self._image.reset_choices)
        self._worker: Any = None
        self._failed = False
        self.result_layer: Optional[Labels] = None

    def _on_model_changed(self) -> None:
        spec = self.session.spec
        self._apply_model_thresholds(spec.model_type if spec is not None else "")

    def _apply_model_thresholds(self, model_type: str) -> None:
        """Set the controls that depend on the model from ``AmgSettings.for_model(model_type)``:
        the ones ``model_type`` overrides (e.g. vit_small's thresholds) and the ones the previous
        model overrode (back to the defaults). The user's other choices stay."""
        overrides = self._settings_class.model_overrides(model_type)
        chosen = self._settings_class.for_model(model_type)
        for name in {**self._model_overrides, **overrides}:
            if name in self._settings:
                self._settings[name].value = getattr(chosen, name)
        self._model_overrides = overrides

    def _image_choices(self, *_: Any) -> list[Image]:
        return [layer for layer in self._viewer.layers if isinstance(layer, Image)]

    def settings(self) -> AmgSettings:
        """The AMG settings chosen in the widget.

        Raises:
            ValueError: a combination the settings reject.
        """
        return self._settings_class(**{name: control.value for name, control in self._settings.items()})

    @property
    def worker(self) -> Any:
        return self._worker

    @property
    def tiling(self) -> TilingControls:
        """The tiling and embeddings-store controls (``tiling.set(mode=..., store=...)`` from scripts)."""
        return self._tiling

    def run(self, _: Any = None) -> Any:
        """Start the automatic segmentation in a background worker; returns the worker."""
        image = self._image.value
        if image is None:
            self._refuse("Add or choose an image layer first.")
            return None
        if self._worker is not None:
            show_info("Automatic segmentation is already running; cancel it first.")
            return None
        try:
            spec = current_slice(self._viewer, image)
        except ValueError as error:
            self._refuse(str(error))
            return None
        link = bool(self._objects_3d.value)
        if link:
            try:
                axis = propagation_axis(spec, self._viewer.dims.last_used)
            except ValueError as error:
                self._refuse(f"3-D objects: {error}")
                return None
            slices = [replace(spec, index=tuple(i if a == axis else v for a, v in enumerate(spec.index)))
                      for i in range(spec.shape[axis])]
        else:
            slices = all_slices(spec) if self._all_slices.value else [spec]
        if not self.session.has_model:
            self._refuse("Choose a model first.")
            return None
        try:
            settings = self.settings()
            tiling = self._tiling.choice()
        except ValueError as error:
            self._refuse(str(error))
            return None
        store_path, on_mismatch = self._tiling.store_path, self._tiling.on_mismatch
        data, rgb, limits = image_array(image), bool(image.rgb), tuple(image.contrast_limits)

        engine = self.session.engine

        def work():
            from ..automatic_mask_generator import SamAutomaticMaskGenerator
            from ..tiled_amg import TiledAutomaticMaskGenerator

            model = engine.ensure_model()  # loads outside the lock
            plan = tiling.resolve(spec.plane_shape, engine.input_size, store_path is not None)
            if plan is None:
                with engine.lock:
                    engine.adopt_thread_settings()
                    generator = SamAutomaticMaskGenerator(model, settings=settings, precision=engine.precision)
                planes = [(s, display_rgb(s.take(data, rgb=rgb), limits, rgb)) for s in slices]
                result = yield from engine.locked(automatic_steps(generator, planes))
            else:
                tile_shape, halo = plan
                store = engine.embedding_store(store_path, tile_shape, halo, on_mismatch) if store_path else None
                planes = [(s, SlicePlane(data, s, rgb), store_plane_index(s) if store_path else 0) for s in slices]
                with engine.lock:
                    engine.adopt_thread_settings()
                    generator = TiledAutomaticMaskGenerator(model, tile_shape, halo, settings=settings,
                                                            precision=engine.precision, store=store)
                result = yield from engine.locked(tiled_automatic_steps(generator, planes, _limits(limits)))
            return link_into_objects(result) if link else result

        self._run.enabled, self._cancel.enabled = False, True
        self._failed = False
        self._progress.value = 0
        self._status.value = f"Segmenting {len(slices)} slice(s) of {image.name}..."
        self._worker = self.session.run(
            work, task="Automatic segmentation", yielded=self._on_progress,
            returned=lambda result: self._on_returned(image, result), errored=self._on_errored,
            finished=self._on_finished,
        )
        return self._worker

    def _refuse(self, message: str) -> None:
        """A run that cannot start: say why in the status area and as a notification."""
        self._status.show_error(message)
        show_error(f"Automatic segmentation: {message}")

    def cancel(self, _: Any = None) -> None:
        """Stop after the current point batch; nothing is written."""
        if self._worker is not None:
            self._worker.quit()
            self._status.value = "Cancelling..."

    def _on_progress(self, progress: Any) -> None:
        self._progress.max = max(1, progress.total)
        self._progress.value = progress.done
        if progress.tiles > 1:
            self._status.value = (
                f"Slice {progress.slice_index + 1}/{progress.slices}, tile {progress.tile} of {progress.tiles}: "
                f"{progress.masks} masks so far"
            )
        else:
            self._status.value = f"Slice {progress.slice_index + 1}/{progress.slices}: {progress.masks} masks so far"

    def _on_errored(self, error: BaseException) -> None:
        """The job failed (the session logged it and showed a notification): nothing is written;
        say why here (``finished`` follows and enables Run again)."""
        self._failed = True
        self._status.show_error(f"Automatic segmentation failed: {describe_error(error)}")

    def _on_finished(self) -> None:
        if self._worker is not None and self._worker.abort_requested and not self._failed:
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
            raise_prompt_layers(self._viewer)  # points and boxes stay visible above the masks
        data = layer.data
        for spec, labels in zip(result.slices, result.labels):
            spec.put(data, labels)
        layer.features = pd.DataFrame(result.features)
        layer.refresh()
        count = len(result.features["label"])
        what = "3-D objects" if "first_slice" in result.features else "masks"
        self._status.value = f"{count} {what} in {len(result.slices)} slice(s)."
