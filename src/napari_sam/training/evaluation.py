"""Ground truth for evaluating segmentation on a real image without annotations.

scikit-image's ``coins`` photograph segmented by a classical pipeline (scikit-image's
gallery example "Comparing edge-based and region-based segmentation"): Sobel elevation
map, watershed from markers below 30 (background) and above 150 (coins), hole filling,
connected components; components under 100 pixels are dropped. Used by
``experiments/eval_small_model.py`` and the tests of the bundled model.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

COINS_BACKGROUND_BELOW = 30
COINS_FOREGROUND_ABOVE = 150
COINS_MIN_AREA = 100


def coins_ground_truth() -> tuple[np.ndarray, np.ndarray]:
    """The coins image and its instance labels from the pipeline above.

    Returns:
        (image HxW uint8, labels HxW int32 with 0 = background and coins numbered 1..N
        in raster order; N = 24).
    """
    from skimage import data
    from skimage.filters import sobel
    from skimage.segmentation import watershed

    coins = data.coins()
    markers = np.zeros(coins.shape, dtype=np.int32)
    markers[coins < COINS_BACKGROUND_BELOW] = 1
    markers[coins > COINS_FOREGROUND_ABOVE] = 2
    foreground = ndimage.binary_fill_holes(watershed(sobel(coins), markers) == 2)
    labels, _ = ndimage.label(foreground)
    areas = np.bincount(labels.ravel())
    labels[np.isin(labels, np.flatnonzero(areas < COINS_MIN_AREA))] = 0
    relabelled, _ = ndimage.label(labels > 0)
    return coins, relabelled.astype(np.int32)
