"""The tunnel's own websocket frame parser against frames wsproto produces."""

from __future__ import annotations

import contextlib

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from tunnel_fakes import ws_pair
from wsproto import ConnectionType, WSConnection
from wsproto.frame_protocol import FrameProtocol

from aldaas.tunnel._ws import (
    FrameError,
    FrameReader,
    WebSocket,
    _mask,
    _mask_python,
    _MaskKeys,
    wsproto_buffered,
)


def client_frames() -> tuple[bytes, bytes]:
    """Masked frames as a client sends them: a fragmented binary message, a ping in the
    middle, a large message, a close. Returns the wire bytes and the payload they carry."""
    proto = FrameProtocol(client=True, extensions=[])
    big = bytes(range(256)) * 300
    wire = (
        proto.send_data(b"hello ", fin=False)
        + proto.ping(b"are you there")
        + proto.send_data(b"world", fin=True)
        + proto.send_data(big)
        + proto.send_data(b"")
        + proto.close(1000, "bye")
    )
    return bytes(wire), b"hello world" + big


def collect(reader: FrameReader, wire: bytes, step: int) -> tuple[bytes, list[tuple[int, bytes]]]:
    data = b""
    controls: list[tuple[int, bytes]] = []
    for i in range(0, len(wire), step):
        chunks, found = reader.feed(wire[i : i + step])
        data += b"".join(chunks)
        controls += found
    return data, controls


@pytest.mark.parametrize("step", [pytest.param(1, marks=pytest.mark.slow), 7, 100_000])
def test_if_masked_frames_arrive_in_any_split_then_payload_and_controls_come_out(
    step: int,
) -> None:
    """If client frames arrive whole or a byte at a time, then the same bytes come out."""
    wire, payload = client_frames()
    data, controls = collect(FrameReader(expect_masked=True), wire, step)
    assert data == payload
    assert controls == [(9, b"are you there"), (8, b"\x03\xe8bye")]


def test_if_a_server_frame_is_parsed_then_no_mask_is_expected() -> None:
    """If a server sends unmasked frames, then a client-side reader takes them as they are."""
    wire = bytes(FrameProtocol(client=False, extensions=[]).send_data(b"x" * 70_000))
    assert collect(FrameReader(expect_masked=False), wire, 4096)[0] == b"x" * 70_000


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (bytes(FrameProtocol(client=False, extensions=[]).send_data(b"x")), "masking"),
        (bytes(FrameProtocol(client=True, extensions=[]).send_data("text")), "text messages"),
        (b"\xc2\x80abcd", "reserved bits"),
        (b"\x89\xfe\x00\x80abcd", "malformed control frame"),
        (b"\x83\x80abcd", "unexpected opcode 3"),
    ],
    # Named by the refusal: a client frame's random mask must not reach the test's id, or
    # pytest-xdist's workers collect different ids and refuse to run.
    ids=lambda value: value if isinstance(value, str) else "frame",
)
def test_if_a_frame_breaks_the_rfc_then_the_reader_says_how(wire: bytes, message: str) -> None:
    """If a frame is unmasked, textual, has reserved bits or a bad opcode, it is refused."""
    with pytest.raises(FrameError, match=message):
        FrameReader(expect_masked=True).feed(wire)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_if_arbitrary_bytes_arrive_then_only_frame_errors_escape(junk: bytes) -> None:
    """If any bytes at all arrive, then the frame reader raises nothing but FrameError."""
    with contextlib.suppress(FrameError):
        FrameReader(expect_masked=True).feed(junk)


@given(data=st.binary(max_size=300), key=st.binary(min_size=4, max_size=4))
def test_if_data_is_masked_then_the_fast_and_the_python_mask_agree_and_undo_themselves(
    data: bytes, key: bytes
) -> None:
    """The compiled mask gives the same bytes as the pure-Python one, and masking twice is a no-op."""
    masked = bytes(_mask(data, key))
    assert masked == bytes(_mask_python(data, key))
    assert bytes(_mask(masked, key)) == data


def test_if_many_masking_keys_are_drawn_then_each_is_four_bytes_and_they_vary() -> None:
    """Keys come from a batched random pool: 4 bytes each, refilled past its end."""
    keys = _MaskKeys()
    drawn = [keys.next() for _ in range(3000)]
    assert all(len(key) == 4 for key in drawn)
    assert len(set(drawn)) > 2900


def test_if_wsproto_moves_its_private_frame_buffer_then_this_test_fails_loudly() -> None:
    """If the upgrade is over, then the tunnel reads how many bytes wsproto holds unparsed
    (0, then the start of a frame that arrived): a wsproto release that moves that private
    buffer fails here, instead of quietly costing every websocket the fast parser."""
    client, server = ws_pair()
    assert (wsproto_buffered(client), wsproto_buffered(server)) == (0, 0)
    server.receive_data(b"\x82\x85")  # the first two bytes of a masked 5-byte frame
    assert list(server.events()) == []
    assert wsproto_buffered(server) == 2


def test_if_wsproto_cannot_say_what_it_holds_then_the_websocket_keeps_its_parser() -> None:
    """If the upgrade is not over (or wsproto keeps its bytes elsewhere), then nothing is
    known and the websocket stays with wsproto's parser, which owns those bytes."""
    client = WSConnection(ConnectionType.CLIENT)
    assert wsproto_buffered(client) is None
    a, _b = trio.testing.memory_stream_pair()
    ws = WebSocket(a, client, 65536)
    ws._choose_parser()
    assert (ws._parse_ourselves, ws._frames) == (False, None)
