"""What the screenshot scripts of docs/ share (run them as ``python docs/make_*.py`` under Xvfb)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

IMAGES = Path(__file__).resolve().parent / "images"


def wait_until_idle(app: Any, busy: Callable[[], bool], start: int = 50, limit: int = 6000) -> None:
    """Process Qt events until ``busy()`` is False (at most ``limit`` x 10 ms), after ``start`` x 10 ms
    for debounced requests to begin, then 0.2 s more so that the last results are drawn."""
    import time

    for _ in range(start):
        app.processEvents()
        time.sleep(0.01)
    for _ in range(limit):
        app.processEvents()
        if not busy():
            break
        time.sleep(0.01)
    for _ in range(20):
        app.processEvents()
        time.sleep(0.01)


def save_screenshot(viewer: Any, settle: Callable[[], None], name: str) -> Path:
    """Close napari's notification toasts, let the GUI settle, save the whole window as
    ``docs/images/<name>`` and close the viewer; returns the file written."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    settle()
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):  # start-up warnings and the like
        toast.close()
    settle()
    out = IMAGES / name
    viewer.screenshot(str(out), canvas_only=False)
    print(f"wrote {out}")
    viewer.close()
    return out
