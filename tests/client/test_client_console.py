"""The client's console: live redraws on a terminal, plain changed lines otherwise."""

from __future__ import annotations

import io

import trio

from aldaas.client._console import Console


def test_if_not_on_a_terminal_then_only_changes_are_printed_as_lines() -> None:
    """If stderr is not a terminal, then show() prints a line only when the text changes."""
    out = io.StringIO()
    console = Console(out)
    assert console.live is False
    console.show("waiting")
    console.spin("waiting")
    console.show("queued 1 of 2")
    console.note("done")
    console.clear()
    assert out.getvalue() == "waiting\nqueued 1 of 2\ndone\n"


def test_if_on_a_terminal_then_the_status_line_is_redrawn_in_place() -> None:
    """If live, then show() rewrites one line and note() prints above it, keeping the line."""
    out = io.StringIO()
    console = Console(out, live=True)
    console.show("a")
    console.note("n")
    console.clear()
    assert out.getvalue() == "\r\x1b[Ka\r\x1b[Kn\na\r\x1b[K"


async def test_if_spinning_then_the_shared_text_is_followed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """If the text list changes while spinning, then the next frame shows the new text."""
    out = io.StringIO()
    console = Console(out)
    text = ["one"]
    with trio.move_on_after(0.35):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(console.spin_while, text)
            await trio.sleep(0.15)
            text[0] = "two"
    assert out.getvalue() == "one\ntwo\n"
