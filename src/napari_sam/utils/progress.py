"""Progress generators: the one way long work reports progress and can be stopped.

Long computations (an image embedding, automatic mask generation, a volume) are generators
that yield progress and *return* their result. A napari thread worker runs them on a
background thread (each yield reaches the GUI; ``quit()`` stops at the next yield); scripts,
the command lines and tests run them to the end with :func:`drain`.
"""

from __future__ import annotations

from typing import Any, Callable, Generator, Optional, TypeVar

T = TypeVar("T")


def drain(generator: Generator[Any, Any, T], on_progress: Optional[Callable[[Any], None]] = None) -> T:
    """Run a progress generator to the end and return its return value.

    Args:
        generator: yields progress values and returns the result.
        on_progress: called with every yielded value (e.g. to advance a terminal bar).

    Returns:
        The generator's return value (``StopIteration.value``).
    """
    while True:
        try:
            progress = next(generator)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(progress)


def relabel(generator: Generator[Any, Any, T], convert: Callable[[Any], Any]) -> Generator[Any, None, T]:
    """A progress generator whose progress values are ``convert(value)`` and whose return value is
    ``generator``'s: ``result = yield from relabel(inner, lambda p: OuterProgress(...))``.

    Closing it (a cancelled worker, a dropped generator) closes ``generator`` at once, so the
    inner work stops at its next yield and releases what it holds.
    """
    try:
        while True:
            try:
                value = next(generator)
            except StopIteration as stop:
                return stop.value
            yield convert(value)
    finally:
        generator.close()
