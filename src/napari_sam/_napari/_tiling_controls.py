"""The large-image controls of both widgets: tiling (auto / on / off, tile size, halo) and the
embeddings store (a ``.zarr`` folder that embeddings are read from and written to).

The controls only describe the choice (:class:`~napari_sam.interactive.engine.TilingChoice`, a
store path and what to do when the store does not fit); the work is the engine's
(:meth:`~napari_sam.interactive.engine.SamEngine.tiled_prediction_steps`,
:meth:`~napari_sam.interactive.engine.SamEngine.embedding_store`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from magicgui.widgets import CheckBox, ComboBox, FileEdit, SpinBox

from ..interactive.engine import TILING_MODES, TilingChoice

TILING_HELP = (
    "auto: tile slices whose long side exceeds 1.5x the model's input size (objects would shrink "
    "in one embedding); on: always tile; off: embed each slice whole. Tiles are embedded only when a "
    "prompt needs them."
)
TILE_HELP = "Side of each embedded tile in pixels, halo included; 0 uses the model's input size (the default)."
HALO_HELP = "Context around each tile's core in pixels; -1 uses an eighth of the tile size (the default)."
STORE_HELP = (
    "A .zarr folder for image embeddings: read from it when present, written to it when computed "
    "(created if missing). Empty: no store."
)
RECOMPUTE_HELP = (
    "When the store holds embeddings of another model, tiling or image, replace them instead of refusing the store."
)
MAX_TILE = 16384


class TilingControls:
    """Tiling mode, tile size, halo, embeddings store and the recompute option.

    Args:
        on_change: called (no arguments) whenever one of the controls changes.

    Attributes:
        widgets: the controls, in display order, for the host widget to add.
    """

    def __init__(self, on_change: Optional[Callable[[], None]] = None) -> None:
        self.mode = ComboBox(label="Tiling", choices=list(TILING_MODES), value="auto", tooltip=TILING_HELP)
        self.tile_size = SpinBox(label="Tile size (0: model input)", value=0, min=0, max=MAX_TILE, step=32,
                                 tooltip=TILE_HELP)
        self.halo = SpinBox(label="Halo (-1: tile / 8)", value=-1, min=-1, max=MAX_TILE // 2, step=8,
                            tooltip=HALO_HELP)
        self.store = FileEdit(label="Embeddings store", mode="d", tooltip=STORE_HELP)
        self.recompute = CheckBox(text="Recompute mismatched embeddings", value=False, tooltip=RECOMPUTE_HELP)
        self.widgets = [self.mode, self.tile_size, self.halo, self.store, self.recompute]
        if on_change is not None:
            for control in self.widgets:
                control.changed.connect(lambda *_: on_change())

    def choice(self) -> TilingChoice:
        """The tiling the controls describe (None sizes: the model's defaults)."""
        tile = int(self.tile_size.value) or None
        halo = int(self.halo.value)
        return TilingChoice(self.mode.value, tile, None if halo < 0 else halo)

    @property
    def store_path(self) -> Optional[str]:
        """The embeddings store's path, or None when the field is empty."""
        value = self.store.value
        path = os.fspath(value) if value else ""
        return path if path and path != "." else None

    @property
    def on_mismatch(self) -> str:
        """"recompute" when the recompute option is ticked, else "error" (the store's ``on_mismatch``)."""
        return "recompute" if self.recompute.value else "error"

    def set(self, mode: Optional[str] = None, store: Any = None) -> None:
        """Set the mode and / or the store path (scripts, tests); ``store=""`` clears the field."""
        if mode is not None:
            self.mode.value = mode
        if store is not None:
            self.store.value = os.fspath(store) if store else ""
