"""Interactive (prompt-driven) segmentation, free of napari and Qt.

* :mod:`.prompts`: slices of nD layers, the (row, col) -> (x, y) flip, prompt building;
* :mod:`.engine`: model loading, the bounded embedding cache, embeddings and predictions;
* :mod:`.history`: committing objects into a label volume, with undo and redo.

The napari adapters in :mod:`napari_sam._napari` are thin wrappers around these.
"""
