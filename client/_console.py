"""What the client shows while it works: a spinner and a live status line on a terminal,
plain lines otherwise (CI logs, pipes), never both.
"""

from __future__ import annotations

import sys
from typing import TextIO

import trio

_FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
_CLEAR = "\r\x1b[K"


class Console:
    """Messages go to ``stream`` (stderr); only the DSN and command output go to stdout."""

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self._line = ""
        self._last_plain = ""
        self._frame = 0

    def note(self, text: str) -> None:
        """A permanent line (the live line, if any, is redrawn below it)."""
        if self.live:
            self.stream.write(f"{_CLEAR}{text}\n{self._line}")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def show(self, text: str) -> None:
        """The current state: redrawn in place on a terminal, printed when it changes otherwise."""
        self._line = text
        if self.live:
            self.stream.write(_CLEAR + text)
            self.stream.flush()
        elif text != self._last_plain:
            self._last_plain = text
            self.stream.write(text + "\n")
            self.stream.flush()

    def spin(self, text: str) -> None:
        """Like :meth:`show`, with a spinner frame in front on a terminal."""
        if self.live:
            self._frame = (self._frame + 1) % len(_FRAMES)
            self.show(f"{_FRAMES[self._frame]} {text}")
        else:
            self.show(text)

    def clear(self) -> None:
        """Remove the live line (before exiting or printing a final message)."""
        if self.live and self._line:
            self.stream.write(_CLEAR)
            self.stream.flush()
        self._line = ""

    async def spin_while(self, text: list[str], interval: float = 0.1) -> None:
        """Spin with ``text[0]`` (updated by others) until cancelled; off a terminal, print changes."""
        while True:
            self.spin(text[0])
            await trio.sleep(interval)
