"""Read image files as 2-D planes for the command line, never mistaking a stack for colour.

* TIFF (by suffix or by its magic bytes; also OME-TIFF, ImageJ hyperstacks, LSM, STK) is
  read with ``tifffile`` and the axes of its first series (``series[0].axes``). Only the
  ``S`` axis (samples per pixel: photometric RGB/RGBA) is colour; every other axis besides
  ``Y`` and ``X`` (``Z``, ``T``, ``C``, unlabelled pages ``I``/``Q``, ...) is iterated, one
  2-D plane per index. So a 3- or 4-page grayscale TIFF is 3 or 4 slices, never RGB/RGBA.
  A file of several series of one shape (pages appended one by one) is one stack of them.
* Any other format goes through ``imageio.v3`` (the reader behind ``skimage.io.imread``,
  without scikit-image's guess that a leading dimension of 3 or 4 is channels): HxW is
  grayscale, HxWxC colour as the format says (PIL modes: L, LA, RGB, RGBA), and animated
  files (GIF, APNG, ...) are stacks of frames.

Planes are named for outputs by :meth:`ImageLayout.suffix`: ``""`` for a single 2-D image,
else ``_<axis><index>`` per iterated axis, lower case, zero-padded to at least 3 digits:
``cells_z003``, ``movie_t012_z000``, ``channels_c001``. Unlabelled pages (``I``, ``Q``) and
animation frames are called ``z``.

Colour samples: 1 or 3 are kept, 2 (gray + alpha) keeps the gray, 4 (RGBA) is passed on to
:func:`~napari_sam.utils.image.to_rgb_uint8`, which drops the alpha.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

import numpy as np

PathLike = Union[str, Path]

TIFF_SUFFIXES = (".tif", ".tiff", ".lsm", ".stk", ".btf", ".tf2", ".tf8")
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Axis letters used in output names; unlabelled pages and frames are z.
_AXIS_NAMES = {"I": "z", "Q": "z"}


class ImageReadError(ValueError):
    """An image file that cannot be read; the message is ``could not read <file>: <reason>``."""

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"could not read {self.path.name}: {reason}")


@dataclass(frozen=True)
class ImageLayout:
    """What a file holds, from its header: the 2-D planes to segment.

    Attributes:
        path: the file.
        stack_axes: the iterated axes, e.g. ``"Z"``, ``"TZ"``; ``""`` for one 2-D image.
        stack_shape: their sizes.
        height: rows of a plane.
        width: columns of a plane.
        samples: colour samples per pixel (1: grayscale).
        notes: remarks for the user (e.g. ignored TIFF series).
    """

    path: Path
    stack_axes: str
    stack_shape: tuple[int, ...]
    height: int
    width: int
    samples: int = 1
    notes: tuple[str, ...] = field(default=())

    @property
    def indices(self) -> list[tuple[int, ...]]:
        """Every plane's index into the stack axes, in C order (``[()]`` for one image)."""
        return list(itertools.product(*(range(n) for n in self.stack_shape)))

    def suffix(self, index: tuple[int, ...]) -> str:
        """The output name suffix of a plane: ``""`` or e.g. ``"_z003"`` (see the module docstring)."""
        names = []
        letters = [_AXIS_NAMES.get(a, a.lower()) for a in self.stack_axes]
        for position, (axis, size, i) in enumerate(zip(self.stack_axes, self.stack_shape, index)):
            letter = letters[position]
            if letters.count(letter) > 1:  # e.g. unlabelled pages beside a Z axis
                letter = axis.lower()
            names.append(f"_{letter}{i:0{max(3, len(str(size - 1)))}d}")
        return "".join(names)

    def describe(self) -> str:
        """E.g. ``"5 planes (Z=5) of 64 x 80"`` or ``"one 64 x 80 RGB image"``."""
        kind = {1: "", 2: " grayscale + alpha", 3: " RGB", 4: " RGBA"}[self.samples]
        if not self.stack_axes:
            return f"one {self.height} x {self.width}{kind} image"
        axes = ", ".join(f"{a}={n}" for a, n in zip(self.stack_axes, self.stack_shape))
        return f"{len(self.indices)} planes ({axes}) of {self.height} x {self.width}{kind}"


def is_tiff(path: PathLike) -> bool:
    """Whether ``path`` has a TIFF suffix or starts with TIFF magic bytes."""
    path = Path(path)
    if path.name.lower().endswith(TIFF_SUFFIXES):
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(4) in TIFF_MAGIC
    except OSError:
        return False


def _check_nonempty(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ImageReadError(path, error.strerror or str(error)) from error
    if size == 0:
        raise ImageReadError(path, "the file is empty (0 bytes)")


def _reason(error: Exception) -> str:
    text = str(error)
    if "Could not find a backend" in text or "pip install" in text:
        return "not an image in a format the installed readers know (imageio found no reader for its contents)"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _tiff_layout(path: Path, tif) -> tuple[str, tuple[int, ...], tuple[str, ...], int]:
    """(axes, shape, notes, number of stacked series) of a TIFF's first series (or of equal series)."""
    series = tif.series
    if not series:
        raise ImageReadError(path, "the TIFF file has no image data")
    first = series[0]
    axes, shape, notes, count = first.axes, tuple(first.shape), [], 1
    same = [s for s in series if tuple(s.shape) == shape and s.axes == axes and s.dtype == first.dtype]
    if len(series) > 1 and len(same) == len(series):
        axes, shape, count = "I" + axes, (len(series), *shape), len(series)
    elif len(series) > 1:
        notes.append(f"{path.name}: the TIFF has {len(series)} series; only the first ({axes} {shape}) is segmented.")
    return axes, shape, tuple(notes), count


def _normalised_axes(path: Path, axes: str, shape: tuple[int, ...]) -> tuple[list[int], str, tuple[int, ...], int]:
    """Axis order (stack axes, Y, X[, S]), the stack axes, their sizes and the samples per pixel."""
    axes = axes.upper()
    if "Y" not in axes or "X" not in axes or len(axes) != len(shape):
        raise ImageReadError(path, f"expected an image with Y and X axes, got axes {axes!r} of shape {shape}")
    stack = [i for i, a in enumerate(axes) if a not in "YXS" and shape[i] != 1]
    order = stack + [axes.index("Y"), axes.index("X")]
    samples = 1
    if "S" in axes:
        samples = shape[axes.index("S")]
        order.append(axes.index("S"))
    ones = [i for i, a in enumerate(axes) if a not in "YXS" and shape[i] == 1]
    return ones + order, "".join(axes[i] for i in stack), tuple(shape[i] for i in stack), samples


def probe_image(path: PathLike) -> ImageLayout:
    """Read a file's header and describe its planes (TIFF: no pixel data is read).

    Args:
        path: an image file.

    Returns:
        The :class:`ImageLayout`.

    Raises:
        ImageReadError: empty, not an image, or an unreadable or unsupported layout.
    """
    path = Path(path)
    _check_nonempty(path)
    if is_tiff(path):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                axes, shape, notes, _ = _tiff_layout(path, tif)
                photometric = tif.series[0].pages[0].photometric if tif.series[0].pages else None
                planar = tif.series[0].pages[0].planarconfig if tif.series[0].pages else None
                dtype = tif.series[0].dtype
        except ImageReadError:
            raise
        except Exception as error:
            raise ImageReadError(path, _reason(error)) from error
        _, stack_axes, stack_shape, samples = _normalised_axes(path, axes, shape)
        if samples in (3, 4) and planar is not None and int(planar) == 2 and dtype != np.uint8:
            notes += (
                f"{path.name}: read as one {'RGB' if samples == 3 else 'RGBA'} image because the file says so "
                f"(photometric {getattr(photometric, 'name', photometric)}, planar {dtype}); tifffile writes a "
                f"({samples}, H, W) array this way unless told otherwise. If it is a stack, save it with "
                "photometric='minisblack'.",
            )
        return _layout(path, stack_axes, stack_shape, shape, axes, samples, notes)
    import imageio.v3 as iio

    try:
        with warnings.catch_warnings():  # imageio's deprecated legacy plugins, tried on non-images
            warnings.simplefilter("ignore", DeprecationWarning)
            props = iio.improps(path)
    except Exception as error:
        raise ImageReadError(path, _reason(error)) from error
    shape = tuple(props.shape)
    axes = _plain_axes(path, shape, bool(props.is_batch))
    _, stack_axes, stack_shape, samples = _normalised_axes(path, axes, shape)
    return _layout(path, stack_axes, stack_shape, shape, axes, samples, ())


def _plain_axes(path: Path, shape: tuple[int, ...], batch: bool) -> str:
    """Axes of a non-TIFF image as imageio returns it: [I]YX[S]."""
    core = len(shape) - int(batch)
    if core == 2:
        return "I" * batch + "YX"
    if core == 3:
        return "I" * batch + "YXS"
    raise ImageReadError(path, f"expected a 2-D grayscale or colour image, got an array of shape {shape}")


def _layout(path, stack_axes, stack_shape, shape, axes, samples, notes) -> ImageLayout:
    if samples not in (1, 2, 3, 4):
        raise ImageReadError(
            path, f"{samples} samples per pixel (axes {axes!r}, shape {shape}); expected 1 (grayscale), "
            "2 (grayscale + alpha), 3 (RGB) or 4 (RGBA)",
        )
    height, width = shape[axes.upper().index("Y")], shape[axes.upper().index("X")]
    return ImageLayout(path, stack_axes, stack_shape, int(height), int(width), int(samples), tuple(notes))


def read_planes(layout: ImageLayout) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """Read a file's pixels and yield (index, plane) per plane of ``layout``, in C order.

    Each plane is HxW (grayscale) or HxWx3 / HxWx4 (colour, channels last), ready for
    :func:`~napari_sam.utils.image.to_rgb_uint8`.

    Raises:
        ImageReadError: the pixels cannot be read, or do not match the header.
    """
    path = layout.path
    _check_nonempty(path)
    try:
        if is_tiff(path):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                axes, shape, _, count = _tiff_layout(path, tif)
                data = np.stack([s.asarray() for s in tif.series]) if count > 1 else tif.series[0].asarray()
        else:
            import imageio.v3 as iio

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                props = iio.improps(path)
                data = np.asarray(iio.imread(path))
            axes = _plain_axes(path, data.shape, bool(props.is_batch))
    except ImageReadError:
        raise
    except Exception as error:
        raise ImageReadError(path, _reason(error)) from error
    if data.ndim != len(axes):
        raise ImageReadError(path, f"the pixel data of shape {data.shape} does not match the axes {axes!r}")
    order, stack_axes, stack_shape, samples = _normalised_axes(path, axes, data.shape)
    upper = axes.upper()
    plane_shape = (data.shape[upper.index("Y")], data.shape[upper.index("X")]) + (
        (samples,) if "S" in upper else ())
    data = np.transpose(data, order).reshape(stack_shape + plane_shape)  # drops the size-1 axes
    if (stack_axes, stack_shape) != (layout.stack_axes, layout.stack_shape):
        raise ImageReadError(path, f"the file changed since it was listed (now {stack_axes} {stack_shape})")
    for index in layout.indices:
        plane = data[index]
        if samples == 2:
            plane = plane[..., 0]  # gray + alpha: the gray
        elif samples == 1 and plane.ndim == 3:
            plane = plane[..., 0]
        yield index, plane
