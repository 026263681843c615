"""The status area of both widgets: a whole message, however long, readable and selectable.

A read-only text box across the widget's full width (not in the label column of the
controls): text wraps at word boundaries (and inside long words such as URLs and paths), the
box grows with the text up to :data:`MAX_LINES` lines and scrolls beyond, the text can be
selected and copied, and its tooltip holds the whole message too. Errors are shown in red.
"""

from __future__ import annotations

import html
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtGui import QTextOption
from qtpy.QtWidgets import QFrame, QSizePolicy, QTextEdit

MIN_LINES = 2
MAX_LINES = 12
ERROR_COLOR = "#ff5c5c"


class _FittingTextBox(QTextEdit):
    """Read-only, word-wrapped text box whose height follows its text (between two bounds)."""

    def __init__(self, min_lines: int, max_lines: int) -> None:
        super().__init__()
        self._min_lines, self._max_lines = min_lines, max_lines
        self.setReadOnly(True)
        self.setTextInteractionFlags(
            Qt.TextInteractionFlag.TextSelectableByMouse | Qt.TextInteractionFlag.TextSelectableByKeyboard
        )
        self.setLineWrapMode(QTextEdit.LineWrapMode.WidgetWidth)
        self.setWordWrapMode(QTextOption.WrapMode.WrapAtWordBoundaryOrAnywhere)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.viewport().setAutoFillBackground(False)
        self.document().contentsChanged.connect(self.fit)
        self.fit()

    def fit(self) -> None:
        """Set the height to the text's (at the current width), within the line bounds."""
        line = self.fontMetrics().lineSpacing()
        text_height = self.document().size().height()
        low = self._min_lines * line + 2 * self.document().documentMargin()
        high = self._max_lines * line + 2 * self.document().documentMargin()
        margins = self.contentsMargins()
        height = int(min(max(text_height, low), high)) + margins.top() + margins.bottom() + 2 * self.frameWidth()
        if height != self.height():
            self.setFixedHeight(height)

    def resizeEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        super().resizeEvent(event)
        self.fit()


class StatusArea:
    """The status of a widget: ``value`` is the whole message, ``native`` the Qt widget.

    Args:
        value: the first message.
        min_lines: height when the message is short.
        max_lines: the box grows up to this many lines, then scrolls.
    """

    def __init__(self, value: str = "", min_lines: int = MIN_LINES, max_lines: int = MAX_LINES) -> None:
        self.native = _FittingTextBox(min_lines, max_lines)
        self.native.setObjectName("napari_sam_status")
        self.is_error = False
        self.value = value

    @property
    def value(self) -> str:
        """The message shown (plain text)."""
        return self.native.toPlainText()

    @value.setter
    def value(self, message: str) -> None:
        self._show(message, error=False)

    def show_error(self, message: str) -> None:
        """Show ``message`` as an error (in red)."""
        self._show(message, error=True)

    def _show(self, message: str, error: bool) -> None:
        self.is_error = error
        self.native.setStyleSheet(f"QTextEdit#napari_sam_status {{ color: {ERROR_COLOR}; }}" if error else "")
        self.native.setPlainText(str(message))
        # Rich text, so that a long tooltip wraps instead of running off the screen.
        self.native.setToolTip(f"<p style='white-space: pre-wrap'>{html.escape(str(message))}</p>" if message else "")

    @property
    def tooltip(self) -> str:
        """The tooltip's plain text (the whole message)."""
        return html.unescape(self.native.toolTip().removeprefix("<p style='white-space: pre-wrap'>").removesuffix("</p>"))


def add_full_width(container: Any, status: StatusArea) -> None:
    """Append ``status`` below a magicgui ``container``'s controls, across its full width."""
    container.native.layout().addWidget(status.native)
