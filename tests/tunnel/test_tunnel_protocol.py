"""The sans-I/O protocol core: no sockets, no trio, just bytes and events."""

from __future__ import annotations

import contextlib
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aldaas.tunnel import (
    CloseCode,
    Connection,
    Data,
    Error,
    GoAway,
    Hello,
    LocalProtocolError,
    OpenStream,
    Ping,
    Pong,
    Progress,
    RemoteProtocolError,
    Request,
    ResetCode,
    ResetStream,
    Response,
    Role,
    Welcome,
    WindowUpdate,
)
from aldaas.tunnel._protocol import Acknowledged, Event, State

WINDOW = 64 * 1024
JUNK = b"\xff" * 12  # frame type 0xff does not exist


def drain(conn: Connection, data: bytes) -> list[Event]:
    conn.receive_data(data)
    return list(conn.events())


def handshake() -> tuple[Connection, Connection]:
    client = Connection(Role.CLIENT, window=WINDOW)
    server = Connection(Role.SERVER, window=WINDOW)
    drain(server, client.send(Hello(mode="new", params={"ttl": 60}, window=WINDOW)))
    drain(client, server.send(Welcome(session_id="s1", secret="x", window=WINDOW)))
    return client, server


def session_fixture() -> tuple[bytes, bytes, list[Event]]:
    """A client's HELLO, the frames it sends once welcomed, and the events a server must see."""
    client = Connection(Role.CLIENT, window=WINDOW)
    server = Connection(Role.SERVER, window=WINDOW)
    hello = client.send(Hello(mode="new", params={"name": "ci", "labels": ["a"]}, window=WINDOW))
    server.receive_data(hello)
    list(server.events())
    client.receive_data(server.send(Welcome(session_id="s1", secret="x", window=WINDOW)))
    list(client.events())
    parts = [
        client.send(OpenStream(stream_id=1)),
        client.send(Data(stream_id=1, data=b"select 1;")),
        client.send(Ping(payload=b"12345678")),
        client.send(OpenStream(stream_id=2)),
        client.send(Data(stream_id=2, data=b"", fin=True)),
        client.send(Request(request_id=client.next_request_id(), name="status", args={})),
        client.send(ResetStream(stream_id=1, code=ResetCode.CANCELLED, reason="bye")),
    ]
    return (
        hello,
        b"".join(parts),
        [
            Hello(mode="new", params={"name": "ci", "labels": ["a"]}, window=WINDOW),
            OpenStream(stream_id=1),
            Data(stream_id=1, data=b"select 1;"),
            Ping(payload=b"12345678"),
            OpenStream(stream_id=2),
            Data(stream_id=2, data=b"", fin=True),
            Request(request_id=1, name="status", args={}),
            ResetStream(stream_id=1, code=1, reason="bye"),
        ],
    )


def feed(hello: bytes, rest: bytes, step: int) -> tuple[Connection, list[Event]]:
    """Feed a fresh server ``step`` bytes at a time, welcoming the client after its HELLO."""
    server = Connection(Role.SERVER, window=WINDOW)
    events: list[Event] = []
    for data in (hello, rest):
        for i in range(0, len(data), step):
            events += drain(server, data[i : i + step])
        if server.state is State.HELLO:
            server.send(Welcome(session_id="s1", secret="x", window=WINDOW))
    return server, events


def test_if_a_session_is_fed_whole_then_every_event_comes_out_in_order() -> None:
    """If a session's bytes arrive in one piece, then the server sees each event in order."""
    hello, rest, expected = session_fixture()
    assert feed(hello, rest, len(hello) + len(rest))[1] == expected


def test_if_a_session_is_fed_one_byte_at_a_time_then_the_events_are_the_same() -> None:
    """If bytes trickle in one at a time, then the decoder yields the same events."""
    hello, rest, expected = session_fixture()
    assert feed(hello, rest, 1)[1] == expected


def test_if_junk_trails_a_session_then_its_events_come_first_and_then_an_error() -> None:
    """If junk follows valid frames, then the valid events come out before the remote error."""
    hello, rest, expected = session_fixture()
    server, events = feed(hello, rest, len(hello) + len(rest))
    server.receive_data(rest[:0] + JUNK)
    with pytest.raises(RemoteProtocolError, match="unknown frame type 0xff") as info:
        list(server.events())
    assert events == expected
    assert info.value.close_code == CloseCode.PROTOCOL_ERROR


def test_if_junk_trails_a_session_in_the_same_read_then_events_precede_the_error() -> None:
    """If junk arrives in the same read as valid frames, then those events still come first."""
    hello, rest, expected = session_fixture()
    server, _ = feed(hello, b"", len(hello))
    server.receive_data(rest + JUNK)
    events: list[Event] = []
    with pytest.raises(RemoteProtocolError, match="unknown frame type 0xff"):
        events.extend(server.events())
    assert events == expected[1:]


def test_if_junk_trails_a_session_fed_byte_by_byte_then_the_error_comes_at_the_junk() -> None:
    """If the session and junk arrive one byte at a time, then the error comes at the junk."""
    hello, rest, expected = session_fixture()
    server, events = feed(hello, rest, 1)
    for i in range(len(JUNK) - 1):
        events += drain(server, JUNK[i : i + 1])
    with pytest.raises(RemoteProtocolError, match="unknown frame type 0xff"):
        drain(server, JUNK[-1:])
    assert events == expected


def test_if_the_server_side_of_a_handshake_trickles_in_then_the_client_sees_it_whole() -> None:
    """If PROGRESS and WELCOME arrive one byte at a time, then the client decodes both."""
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    drain(server, client.send(Hello(mode="new")))
    wire = server.send(Progress(params={"queue_position": 1, "eta_seconds": 3.5}))
    wire += server.send(Welcome(session_id="s9", secret="k", info={"user": "u"}))
    events: list[Event] = []
    for i in range(len(wire)):
        events += drain(client, wire[i : i + 1])
    assert events == [
        Progress(params={"queue_position": 1, "eta_seconds": 3.5}),
        Welcome(session_id="s9", secret="k", info={"user": "u"}, window=256 * 1024),
    ]
    assert client.state is State.OPEN


def test_if_the_decoder_failed_once_then_it_keeps_failing() -> None:
    """If a remote error was raised, then later calls raise it again instead of decoding on."""
    server = Connection(Role.SERVER)
    server.receive_data(JUNK)
    with pytest.raises(RemoteProtocolError):
        list(server.events())
    with pytest.raises(RemoteProtocolError):
        list(server.events())
    assert server.state is State.CLOSED


def test_if_a_frame_announces_a_payload_over_the_limit_then_1009_before_the_payload() -> None:
    """If a header announces too big a payload, then the error comes with the header alone."""
    server = Connection(Role.SERVER, max_frame_size=65536)
    header = struct.pack("!BBHII", 0x12, 0, 0, 1, 65537)
    with pytest.raises(RemoteProtocolError, match="65537 bytes exceeds the limit") as info:
        drain(server, header)
    assert info.value.close_code == CloseCode.FRAME_TOO_BIG


def test_if_a_stream_id_is_reused_then_the_server_rejects_it() -> None:
    """If the client opens a stream id that was used before, then a remote error follows."""
    client, server = handshake()
    drain(server, client.send(OpenStream(stream_id=5)))
    reused = struct.pack("!BBHII", 0x11, 0, 0, 5, 0)
    with pytest.raises(RemoteProtocolError, match="stream id 5 reused"):
        drain(server, reused)


def test_if_data_names_a_stream_never_opened_then_it_is_a_remote_error() -> None:
    """If DATA arrives for an id above every opened one, then the peer is wrong."""
    _client, server = handshake()
    frame = struct.pack("!BBHII", 0x12, 0, 0, 9, 1) + b"x"
    with pytest.raises(RemoteProtocolError, match="stream 9, never opened"):
        drain(server, frame)


def test_if_data_exceeds_the_window_then_the_receiver_rejects_it() -> None:
    """If a peer sends beyond the credit it was granted, then it is a flow-control error."""
    client, server = handshake()
    drain(server, client.send(OpenStream(stream_id=1)))
    frame = struct.pack("!BBHII", 0x12, 0, 0, 1, WINDOW) + bytes(WINDOW)
    drain(server, frame)
    extra = struct.pack("!BBHII", 0x12, 0, 0, 1, 1) + b"x"
    with pytest.raises(RemoteProtocolError, match="exceed its window"):
        drain(server, extra)


def test_if_we_try_to_send_beyond_the_window_then_it_is_a_local_error() -> None:
    """If the application sends more than its credit, then a local error protects the peer."""
    client, _server = handshake()
    client.send(OpenStream(stream_id=1))
    with pytest.raises(LocalProtocolError, match="exceed the send window"):
        client.send(Data(stream_id=1, data=bytes(WINDOW + 1)))


def test_if_the_application_consumes_half_the_window_then_credit_goes_back() -> None:
    """If consumption reaches half the window, then a WINDOW frame restores credit."""
    client, server = handshake()
    drain(server, client.send(OpenStream(stream_id=1)))
    drain(server, client.send(Data(stream_id=1, data=bytes(WINDOW))))
    assert client.send_window(1) == 0
    assert server.acknowledge_data(1, WINDOW // 2 - 1) == b""
    update = server.acknowledge_data(1, 1)
    assert drain(client, update) == [WindowUpdate(stream_id=1, increment=WINDOW // 2)]
    assert client.send_window(1) == WINDOW // 2


def test_if_a_big_write_is_sent_then_it_is_split_into_64k_frames() -> None:
    """If one write exceeds 64 KiB, then it travels as several DATA frames."""
    client = Connection(Role.CLIENT, window=WINDOW)
    server = Connection(Role.SERVER, window=256 * 1024)
    drain(server, client.send(Hello(mode="new", window=WINDOW)))
    drain(client, server.send(Welcome(session_id="s", secret="x")))
    drain(server, client.send(OpenStream(stream_id=1)))
    events = drain(server, client.send(Data(stream_id=1, data=bytes(150_000), fin=True)))
    assert [(len(e.data), e.fin) for e in events if isinstance(e, Data)] == [
        (65536, False),
        (65536, False),
        (18928, True),
    ]


def test_if_the_server_tries_to_open_a_stream_then_it_is_a_local_error() -> None:
    """If the server sends OPEN, then the protocol refuses (only clients open streams)."""
    _client, server = handshake()
    with pytest.raises(LocalProtocolError, match="only the client opens streams"):
        server.send(OpenStream(stream_id=1))


def test_if_a_frame_comes_before_the_hello_then_it_is_a_remote_error() -> None:
    """If a session frame precedes HELLO, then the server raises a remote error."""
    client, _server = handshake()
    client.send(OpenStream(stream_id=1))
    with pytest.raises(RemoteProtocolError, match="handshake state idle"):
        drain(Connection(Role.SERVER), client.replay())


def test_if_frames_arrive_for_a_reset_stream_then_they_are_ignored() -> None:
    """If DATA was in flight when we reset a stream, then it is dropped without error."""
    client, server = handshake()
    drain(server, client.send(OpenStream(stream_id=1)))
    late = client.send(Data(stream_id=1, data=b"late"))
    server.send(ResetStream(stream_id=1, code=ResetCode.CANCELLED))
    assert drain(server, late) == []


def test_if_an_ack_arrives_then_the_replay_buffer_shrinks_to_what_is_unacknowledged() -> None:
    """If the peer acknowledges everything, then nothing is left to replay."""
    client, server = handshake()
    drain(server, client.send(OpenStream(stream_id=1)))
    drain(server, client.send(Data(stream_id=1, data=b"abc")))
    assert client.replay_size == 12 + 15
    assert drain(client, server.ack()) == [Acknowledged(offset=27)]
    assert client.replay_size == 0
    assert client.replay() == b""


def test_if_the_websocket_drops_mid_frame_then_resumption_replays_the_missing_bytes() -> None:
    """If a connection is cut mid-transfer, then after attach each side replays what is missing."""
    client, server = handshake()
    drain(server, client.send(OpenStream(stream_id=1)))
    drain(client, server.ack())
    first = client.send(Data(stream_id=1, data=b"one"))
    second = client.send(Data(stream_id=1, data=b"two"))
    drain(server, first + second[:5])  # the cut happens inside the second frame
    down = server.send(Data(stream_id=1, data=b"pong"))  # never reaches the client
    client.connection_lost()
    server.connection_lost()
    assert drain(server, client.send(Hello(mode="attach", received=client.received_offset))) == [
        Hello(mode="attach", received=0, window=WINDOW)
    ]
    welcome = server.send(Welcome(session_id="s1", resumed=True))
    replay_down = server.replay()
    assert replay_down == down
    events = drain(client, welcome + replay_down)
    assert events[1:] == [Data(stream_id=1, data=b"pong")]
    assert drain(server, client.replay()) == [Data(stream_id=1, data=b"two")]


def test_if_the_server_starts_afresh_then_the_client_forgets_its_streams() -> None:
    """If WELCOME says not resumed, then the client's streams and offsets start over."""
    client, _server = handshake()
    client.send(OpenStream(stream_id=1))
    client.connection_lost()
    client.send(Hello(mode="attach", received=client.received_offset))
    fresh = Connection(Role.SERVER)
    fresh.receive_data(Connection(Role.CLIENT).send(Hello(mode="attach", received=99)))
    list(fresh.events())
    assert drain(client, fresh.send(Welcome(session_id="s1", resumed=False)))[0] == Welcome(
        session_id="s1", resumed=False, received=0, window=256 * 1024
    )
    assert client.stream_ids == frozenset()
    assert client.sent_offset == 0
    assert client.next_stream_id() == 1


def test_if_an_ack_claims_more_than_was_sent_then_it_is_a_remote_error() -> None:
    """If the peer acknowledges bytes we never sent, then it is lying or broken."""
    client, _server = handshake()
    ack = struct.pack("!BBHIIQ", 0x07, 0, 0, 0, 8, 1000)
    with pytest.raises(RemoteProtocolError, match="acknowledges offset 1000"):
        drain(client, ack)


def test_if_a_request_is_answered_then_the_client_gets_result_or_error() -> None:
    """If the server answers two requests, then the client sees a result and an error."""
    client, server = handshake()
    drain(server, client.send(Request(request_id=1, name="status")))
    drain(server, client.send(Request(request_id=2, name="extend", args={"ttl": 5})))
    events = drain(
        client,
        server.send(Response(request_id=1, result={"state": "active"}))
        + server.send(Response(request_id=2, error="the ttl 5 is below the minimum 60")),
    )
    assert events == [
        Response(request_id=1, result={"state": "active"}),
        Response(request_id=2, error="the ttl 5 is below the minimum 60"),
    ]


def test_if_a_response_answers_no_pending_request_then_it_is_a_remote_error() -> None:
    """If a RESPONSE names an unknown request id, then the client rejects it."""
    client, _server = handshake()
    frame = struct.pack("!BBHII", 0x21, 0, 0, 7, 11) + b'{"ok":true}'
    with pytest.raises(RemoteProtocolError, match="request 7, which is not pending"):
        drain(client, frame)


def test_if_progress_and_error_arrive_during_the_handshake_then_the_session_closes() -> None:
    """If the server reports progress then refuses, then the client ends in CLOSED."""
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    drain(server, client.send(Hello(mode="new")))
    wire = server.send(Progress(params={"queue_position": 2})) + server.send(
        Error(code=CloseCode.SESSION_REFUSED, message="no clone is ready")
    )
    assert drain(client, wire) == [
        Progress(params={"queue_position": 2}),
        Error(code=4001, message="no clone is ready"),
    ]
    assert client.state is State.CLOSED
    with pytest.raises(LocalProtocolError, match="closed session"):
        client.send(Ping(payload=b"12345678"))


def test_if_goaway_arrives_then_the_client_may_not_open_streams() -> None:
    """If the server said GOAWAY, then opening a stream is a local error."""
    client, server = handshake()
    assert drain(client, server.send(GoAway(reason="draining"))) == [GoAway(reason="draining")]
    with pytest.raises(LocalProtocolError, match="GOAWAY"):
        client.send(OpenStream(stream_id=1))


def test_if_a_ping_arrives_then_a_pong_can_answer_it() -> None:
    """If the client pings, then the server's pong carries the same bytes."""
    client, server = handshake()
    (ping,) = drain(server, client.send(Ping(payload=b"abcdefgh")))
    assert isinstance(ping, Ping)
    assert drain(client, server.send(Pong(payload=ping.payload))) == [Pong(payload=b"abcdefgh")]


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (struct.pack("!BBHII", 0x12, 0x02, 0, 1, 0), "unknown flags"),
        (struct.pack("!BBHII", 0x05, 0, 1, 0, 8) + bytes(8), "reserved bits"),
        (struct.pack("!BBHII", 0x13, 0, 0, 1, 3) + b"abc", "WINDOW payload must be 4 bytes"),
        (struct.pack("!BBHII", 0x10, 0, 0, 0, 2) + b"[]", "must carry a JSON object"),
        (struct.pack("!BBHII", 0x10, 0, 0, 0, 1) + b"{", "valid JSON"),
        (struct.pack("!BBHII", 0x02, 0, 0, 0, 2) + b"{}", "client must not send WELCOME"),
    ],
)
def test_if_a_frame_is_malformed_then_the_error_names_what_is_wrong(
    frame: bytes, message: str
) -> None:
    """If a frame is malformed, then the remote error says how."""
    _client, server = handshake()
    with pytest.raises(RemoteProtocolError, match=message):
        drain(server, frame)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([Role.SERVER, Role.CLIENT]), st.booleans())
def test_if_arbitrary_bytes_arrive_then_only_remote_protocol_errors_escape(
    junk: bytes, role: Role, after_handshake: bool
) -> None:
    """If any bytes at all arrive, then the decoder raises nothing but RemoteProtocolError."""
    if after_handshake:
        client, server = handshake()
        conn = server if role is Role.SERVER else client
    else:
        conn = Connection(role)
    with contextlib.suppress(RemoteProtocolError):
        drain(conn, junk)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(list(range(0x00, 0x08)) + list(range(0x10, 0x15)) + [0x20, 0x21]),
            st.integers(0, 3),
            st.integers(0, 4),
            st.binary(max_size=24),
        ),
        max_size=8,
    )
)
def test_if_well_framed_nonsense_arrives_then_only_remote_protocol_errors_escape(
    frames: list[tuple[int, int, int, bytes]],
) -> None:
    """If frames have valid headers but arbitrary contents, then only remote errors escape."""
    client, server = handshake()
    drain(server, client.send(OpenStream(stream_id=1)))
    wire = b"".join(
        struct.pack("!BBHII", t, flags & 1, 0, sid, len(p)) + p for t, flags, sid, p in frames
    )
    for conn in (server, client):
        with contextlib.suppress(RemoteProtocolError):
            drain(conn, wire)


def test_if_data_is_sent_while_detached_then_it_waits_in_the_replay_buffer() -> None:
    """If the application writes while no websocket is attached, then the frames are kept
    and replayed after the next welcome, and the handshake itself is not disturbed."""
    client, server = handshake()
    drain(server, client.send(OpenStream(stream_id=1)))
    drain(client, server.ack())
    client.connection_lost()
    server.connection_lost()
    offline = client.send(Data(stream_id=1, data=b"typed offline"))
    assert client.replay() == offline
    drain(server, client.send(Hello(mode="attach")))
    welcome = server.send(Welcome(session_id="s1", resumed=True))
    assert drain(client, welcome)[0] == Welcome(
        session_id="s1", resumed=True, window=WINDOW, received=12
    )
    assert drain(server, client.replay()) == [Data(stream_id=1, data=b"typed offline")]


def test_if_a_resuming_client_claims_unsent_bytes_then_the_welcome_is_refused() -> None:
    """If a client's hello acknowledges more than the server ever sent, then the server
    refuses to resume with a remote error (it would otherwise replay garbage)."""
    _client, server = handshake()
    server.connection_lost()
    liar = Connection(Role.CLIENT)
    liar._established = True  # it claims to resume, so its HELLO is not fresh
    liar._received = 5000  # a broken or malicious client
    drain(server, liar.send(Hello(mode="attach")))
    with pytest.raises(RemoteProtocolError, match="acknowledges offset 5000"):
        server.send(Welcome(session_id="s1", resumed=True))


def test_if_a_never_welcomed_client_attaches_then_its_hello_says_fresh() -> None:
    """If a client process attaches with a cached id before any welcome, then its HELLO
    says it has no replay state, and the server may only answer resumed=false."""
    old, server = handshake()
    drain(server, old.send(OpenStream(stream_id=1)))
    server.send(Data(stream_id=1, data=b"rows"))  # never acknowledged: still in the replay
    server.connection_lost()
    newcomer = Connection(Role.CLIENT, window=WINDOW)
    assert drain(server, newcomer.send(Hello(mode="attach"))) == [
        Hello(mode="attach", received=0, window=WINDOW, fresh=True)
    ]
    with pytest.raises(LocalProtocolError, match="without replay state"):
        server.send(Welcome(session_id="s1", resumed=True))
    welcome = drain(newcomer, server.send(Welcome(session_id="s1", resumed=False)))
    assert welcome == [Welcome(session_id="s1", resumed=False, received=0, window=WINDOW)]
    assert server.sent_offset == 0
    assert server.received_offset == 0
    assert server.stream_ids == frozenset()


def test_if_a_welcomed_client_reattaches_then_its_hello_is_not_fresh() -> None:
    """If the same client process reconnects after a welcome, then its HELLO asks to resume."""
    client, server = handshake()
    drain(server, client.send(OpenStream(stream_id=1)))
    client.connection_lost()
    server.connection_lost()
    assert drain(server, client.send(Hello(mode="attach"))) == [
        Hello(mode="attach", received=0, window=WINDOW, fresh=False)
    ]
    server.send(Welcome(session_id="s1", resumed=True))
    assert server.received_offset == 12


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"fresh": "yes"}, "'fresh' must be a boolean"),
        ({"fresh": True, "received": 7}, "a fresh HELLO claims 7 bytes received"),
    ],
)
def test_if_a_hello_misuses_fresh_then_it_is_a_remote_error(
    fields: dict[str, object], message: str
) -> None:
    """If the HELLO's fresh flag is not a boolean or contradicts its offset, then it is refused."""
    body = {"version": 1, "mode": "attach", "params": {}, "received": 0, "window": WINDOW}
    payload = json.dumps(body | fields).encode()
    server = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError, match=message):
        drain(server, struct.pack("!BBHII", 0x01, 0, 0, 0, len(payload)) + payload)


def test_if_an_older_client_omits_fresh_then_its_hello_asks_to_resume() -> None:
    """If a HELLO has no fresh field (an older aldaas.v1 client), then it means not fresh."""
    body = {"version": 1, "mode": "attach", "params": {}, "received": 0, "window": WINDOW}
    payload = json.dumps(body).encode()
    server = Connection(Role.SERVER)
    hello = drain(server, struct.pack("!BBHII", 0x01, 0, 0, 0, len(payload)) + payload)
    assert hello == [Hello(mode="attach", window=WINDOW, fresh=False)]
