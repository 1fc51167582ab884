"""Gateway and client over real loopback sockets."""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import structlog
import structlog.testing
import trio
import trio.testing
import trustme
from tunnel_fakes import (
    TOKEN,
    FakeHooks,
    Rig,
    echo_handler,
    start_cut_proxy,
    start_rig,
    start_tcp_server,
)

from aldaas.tunnel import (
    AttachSession,
    ClientEvent,
    CloseCode,
    Connected,
    ControlError,
    Disconnected,
    NewSession,
    SessionClosed,
    SessionRefused,
    TunnelClient,
    Waiting,
    open_control,
    serve_client,
)
from aldaas.tunnel._protocol import Connection, Data, Error, Hello, OpenStream, Role, Welcome
from aldaas.tunnel._ws import HandshakeRejected, WebSocket, connect

pytestmark = pytest.mark.slow

FRESH_REASON = (
    "a new client process attached the session without replay state; its old streams were reset"
)


async def start_client(
    rig: Rig,
    events: list[ClientEvent] | None = None,
    *,
    auth: NewSession | AttachSession | None = None,
    **changes: Any,
) -> TunnelClient:
    """Start serve_client in the rig's nursery and return its handle once welcomed."""
    settings = rig.client_settings(**changes)
    auth = auth or NewSession(token=TOKEN, params={"name": "ci"})
    on_event: Callable[[ClientEvent], None] | None = events.append if events is not None else None

    async def run(task_status: trio.TaskStatus[TunnelClient]) -> None:
        await serve_client(settings, auth, on_event=on_event, task_status=task_status)

    client: TunnelClient = await rig.nursery.start(run)
    return client


async def echo_roundtrip(address: tuple[str, int], payload: bytes) -> bytes:
    """Send ``payload`` through a local connection, half-close, and read the echo to EOF."""
    tcp = await trio.open_tcp_stream(*address)
    received = bytearray()
    async with tcp, trio.open_nursery() as nursery:

        async def send() -> None:
            await tcp.send_all(payload)
            await tcp.send_eof()

        nursery.start_soon(send)
        while True:
            data = await tcp.receive_some(65536)
            if not data:
                break
            received += data
    return bytes(received)


@pytest.mark.usefixtures("relay_mode")
async def test_if_a_local_connection_is_made_then_bytes_echo_through_the_tunnel(rig: Rig) -> None:
    """If an application connects to the local port, then the echo server's reply comes back."""
    events: list[ClientEvent] = []
    client = await start_client(rig, events)
    assert client.session.session_id == "s1"
    assert client.session.info == {"user": "u1"}
    assert client.local_address is not None
    assert await echo_roundtrip(client.local_address, b"hello tunnel") == b"hello tunnel"
    assert isinstance(events[-1], Connected)
    assert rig.hooks.log[:2] == [("open", "s1", "ci"), ("attached", "s1")]
    client.close()


@pytest.mark.usefixtures("relay_mode")
async def test_if_50_streams_move_data_at_once_then_every_checksum_matches(rig: Rig) -> None:
    """If 50 concurrent connections echo 96 KiB each, then each gets exactly its bytes back."""
    client = await start_client(rig)
    assert client.local_address is not None
    address = client.local_address
    results: dict[int, tuple[bytes, bytes]] = {}

    async def one(i: int) -> None:
        payload = os.urandom(96 * 1024 + i)
        echoed = await echo_roundtrip(address, payload)
        results[i] = (hashlib.sha256(payload).digest(), hashlib.sha256(echoed).digest())

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(one, i)
    assert len(results) == 50
    assert all(sent == got for sent, got in results.values())
    stats = rig.gateway.statistics()
    assert stats.streams_opened_total == 50
    assert stats.bytes_up_total == sum(96 * 1024 + i for i in range(50))
    client.close()


@pytest.mark.usefixtures("relay_mode")
@pytest.mark.parametrize("attached_from_cache", [False, True])
async def test_if_the_websocket_is_cut_mid_transfer_then_the_session_resumes_intact(
    nursery: trio.Nursery, attached_from_cache: bool
) -> None:
    """If the network drops the websocket during a transfer, then the client resumes and
    the stream's bytes arrive complete, in order, once (also for a client that began by
    attaching a cached session: only its first HELLO is fresh)."""
    rig = await start_rig(nursery)
    proxy = await start_cut_proxy(nursery, ("127.0.0.1", rig.gateway.port))
    auth: NewSession | AttachSession | None = None
    if attached_from_cache:
        ws, _conn = await raw_session(rig)
        await trio.aclose_forcefully(ws.stream)
        auth = AttachSession(session_id="s1", secret="secret-s1")
    events: list[ClientEvent] = []
    client = await start_client(
        rig,
        events,
        auth=auth,
        url=f"ws://127.0.0.1:{proxy.port}/tunnel",
        reconnect_initial_delay=0.01,
        reconnect_max_delay=0.05,
    )
    assert client.local_address is not None
    payload = os.urandom(4 * 1024 * 1024)
    tcp = await trio.open_tcp_stream(*client.local_address)
    received = bytearray()
    async with tcp, trio.open_nursery() as inner:

        async def send() -> None:
            await tcp.send_all(payload)
            await tcp.send_eof()

        inner.start_soon(send)
        cut_done = False
        while True:
            data = await tcp.receive_some(65536)
            if not data:
                break
            received += data
            if not cut_done and len(received) > 1024 * 1024:
                cut_done = True
                await proxy.cut()
    assert cut_done
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert any(isinstance(e, Disconnected) for e in events)
    assert any(isinstance(e, Connected) and e.resumed for e in events)
    assert ("detached", "s1") in rig.hooks.log
    assert client.reconnects >= 1
    client.close()


async def test_if_the_token_is_wrong_then_401_and_other_sessions_go_on(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    """If a client presents a wrong instance token, then it gets 401 and nothing else breaks."""
    good = await start_client(rig)
    assert good.local_address is not None
    bad = NewSession(token="wrong-token-abc")
    with pytest.raises(SessionRefused, match=r"HTTP 401.*instance token is wrong"):
        await serve_client(rig.client_settings(), bad)
    assert await echo_roundtrip(good.local_address, b"still here") == b"still here"
    assert rig.gateway.statistics().auth_failures_total == 1
    output = capsys.readouterr()
    assert "wrong-token-abc" not in output.out + output.err
    assert TOKEN not in output.out + output.err
    good.close()


async def test_if_the_secret_is_wrong_then_403_and_resumption_is_refused(rig: Rig) -> None:
    """If a client attaches with a wrong secret, then it gets 403 and cannot take the session."""
    good = await start_client(rig)
    wrong = AttachSession(session_id=good.session.session_id, secret="secret-s2")
    with pytest.raises(SessionRefused, match="HTTP 403"):
        await serve_client(rig.client_settings(), wrong)
    assert rig.gateway.statistics().sessions_attached == 1
    good.close()


async def test_if_a_cached_session_attaches_then_it_continues_with_the_same_id(rig: Rig) -> None:
    """If a client restarts with the cached id and secret, then it attaches the same session."""
    first = await start_client(rig)
    info = first.session
    first.close()
    second = await start_client(
        rig, auth=AttachSession(session_id=info.session_id, secret=info.secret)
    )
    assert second.session.session_id == info.session_id
    assert second.local_address is not None
    assert await echo_roundtrip(second.local_address, b"again") == b"again"
    second.close()


async def test_if_the_server_refuses_a_session_then_the_client_gets_the_sentence(
    nursery: trio.Nursery,
) -> None:
    """If the owner refuses after showing progress, then the client sees both and raises."""
    hooks = FakeHooks(
        refuse_with="no clone of snapshot app-1 is ready; try again in a minute",
        progress_steps=[{"queue_position": 3}],
    )
    rig = await start_rig(nursery, hooks)
    events: list[ClientEvent] = []
    with pytest.raises(SessionRefused, match="no clone of snapshot app-1 is ready") as info:
        await serve_client(rig.client_settings(), NewSession(token=TOKEN), on_event=events.append)
    assert info.value.close_code == CloseCode.SESSION_REFUSED
    assert Waiting(params={"queue_position": 3}) in events


async def test_if_the_server_closes_a_session_then_the_client_stops_with_the_reason(
    rig: Rig,
) -> None:
    """If the broker kills the lease, then the client's serve_client raises SessionClosed."""
    closed: list[SessionClosed] = []
    done = trio.Event()

    async def run(task_status: trio.TaskStatus[TunnelClient]) -> None:
        try:
            await serve_client(
                rig.client_settings(), NewSession(token=TOKEN), task_status=task_status
            )
        except SessionClosed as exc:
            closed.append(exc)
        done.set()

    client: TunnelClient = await rig.nursery.start(run)
    assert rig.gateway.close_session(client.session.session_id, "lease expired after 300 s idle")
    with trio.fail_after(5):
        await done.wait()
    assert str(closed[0]) == "lease expired after 300 s idle"
    assert ("ended", "s1", "lease expired after 300 s idle") in rig.hooks.log
    assert not rig.gateway.close_session("s1", "again")


async def test_if_control_requests_are_sent_then_results_and_errors_come_back(rig: Rig) -> None:
    """If the client asks status and an unknown request, then it gets a result and an error."""
    client = await start_client(rig)
    assert await client.request("status", {"verbose": True}) == {
        "session": "s1",
        "args": {"verbose": True},
    }
    with pytest.raises(ControlError, match="unknown request 'nope'"):
        await client.request("nope")
    async with open_control(rig.client_settings(), TOKEN) as control:
        assert await control.request("status") == {"session": None, "args": {}}
    client.close()


async def test_if_more_streams_than_allowed_open_then_only_the_extra_one_is_reset(
    nursery: trio.Nursery,
) -> None:
    """If a session exceeds its stream limit, then the extra stream is reset, others work."""
    rig = await start_rig(nursery, max_streams_per_session=2)
    client = await start_client(rig)
    first = await client.open_stream()
    second = await client.open_stream()
    third = await client.open_stream()
    with pytest.raises(trio.BrokenResourceError, match="limit"):
        await third.receive_some()
    await first.send_all(b"one")
    assert await first.receive_some() == b"one"
    await second.send_all(b"two")
    assert await second.receive_some() == b"two"
    client.close()


@pytest.mark.usefixtures("relay_mode")
async def test_if_the_address_cannot_be_reached_then_the_stream_is_reset(rig: Rig) -> None:
    """If the session's address refuses connections, then the stream is reset (code 2)."""
    client = await start_client(rig)
    rig.hooks.addresses["s1"] = ("127.0.0.1", 1)
    stream = await client.open_stream()
    with pytest.raises(trio.BrokenResourceError, match="code 2"):
        await stream.receive_some()
    client.close()


@pytest.mark.usefixtures("relay_mode")
async def test_if_the_session_resolves_to_a_host_name_then_streams_connect_through_a_task(
    rig: Rig,
) -> None:
    """If the resolver returns a name (not an IP literal), then the gateway resolves and
    connects it outside the relay and the stream works the same."""
    client = await start_client(rig)
    rig.hooks.addresses["s1"] = ("localhost", rig.hooks.address[1])
    assert client.local_address is not None
    assert await echo_roundtrip(client.local_address, b"by name") == b"by name"
    client.close()


async def test_if_the_resolver_fails_then_the_stream_is_reset_as_an_internal_error(
    rig: Rig,
) -> None:
    """If the resolver raises something unexpected, then only that stream is reset
    (code 5) and the session goes on."""
    client = await start_client(rig)
    del rig.hooks.addresses["s1"]
    stream = await client.open_stream()
    with pytest.raises(trio.BrokenResourceError, match="code 5"):
        await stream.receive_some()
    rig.hooks.addresses["s1"] = rig.hooks.address
    assert client.local_address is not None
    assert await echo_roundtrip(client.local_address, b"still here") == b"still here"
    client.close()


@pytest.mark.usefixtures("relay_mode")
async def test_if_the_client_stops_then_its_local_connections_close(rig: Rig) -> None:
    """If the client is closed while an application is connected, then that connection
    ends (EOF) instead of hanging."""
    client = await start_client(rig)
    assert client.local_address is not None
    tcp = await trio.open_tcp_stream(*client.local_address)
    async with tcp:
        await tcp.send_all(b"x")
        assert await tcp.receive_some(1) == b"x"
        client.close()
        with trio.fail_after(5):
            assert await tcp.receive_some(1) == b""


@pytest.mark.usefixtures("relay_mode")
async def test_if_the_process_runs_out_of_file_descriptors_then_accepting_pauses_and_resumes(
    rig: Rig,
) -> None:
    """If accepting a local connection fails for lack of file descriptors, then the client
    stops accepting for a moment (no busy loop on the still-readable listener) and serves
    the waiting connection once descriptors are free again."""
    client = await start_client(rig)
    assert client.local_address is not None
    app = socket.socket()
    app.setblocking(False)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(name) for name in os.listdir("/proc/self/fd"))
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
    try:
        with contextlib.suppress(OSError):
            while len(fillers) < highest:  # take every free descriptor number left
                fillers.append(os.dup(0))
        with structlog.testing.capture_logs() as logs:
            with contextlib.suppress(BlockingIOError):
                app.connect(client.local_address)  # the kernel completes the handshake
            await trio.sleep(0.05)  # the client tried, failed and paused (0.1 s)
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert [entry["event"] for entry in logs] == ["tunnel client cannot accept"]
    tcp = trio.SocketStream(trio.socket.from_stdlib_socket(app))
    async with tcp:
        with trio.fail_after(5):
            await tcp.send_all(b"after the pause")
            assert await tcp.receive_some(100) == b"after the pause"
    client.close()


# ------------------------------------------------------------------------ hostile peers


async def raw_session(rig: Rig) -> tuple[WebSocket, Connection]:
    """A hand-driven client: HELLO sent, WELCOME read."""
    ws = await connect(rig.url, authorization=f"Bearer {TOKEN}", receive_size=65536)
    conn = Connection(Role.CLIENT)
    await ws.send(conn.send(Hello(mode="new")))
    while True:
        conn.receive_data(await ws.receive())
        events = list(conn.events())
        if any(isinstance(e, Welcome) for e in events):
            assert ws._frames is not None  # frames parsed by the tunnel, not wsproto
            return ws, conn


async def read_to_close(ws: WebSocket, conn: Connection) -> list[Error]:
    """Read until the gateway closes; return the ERROR frames it sent."""
    errors: list[Error] = []
    while True:
        data = await ws.receive()
        if not data:
            await ws.aclose()
            return errors
        conn.receive_data(data)
        errors += [e for e in conn.events() if isinstance(e, Error)]


@pytest.mark.parametrize(
    ("frame", "code", "message"),
    [
        (struct.pack("!BBHII", 0x12, 0, 0, 1, 2_000_000), 1009, "exceeds the limit"),
        (struct.pack("!BBHII", 0x7E, 0, 0, 0, 0), 1002, "unknown frame type 0x7e"),
        (struct.pack("!BBHII", 0x12, 0, 0, 9, 1) + b"x", 1002, "stream 9, never opened"),
    ],
)
async def test_if_a_peer_sends_an_illegal_frame_then_only_its_websocket_closes(
    rig: Rig, frame: bytes, code: int, message: str
) -> None:
    """If a client sends an oversized, unknown or misaddressed frame, then it alone gets
    ERROR + the close code, and another session keeps working."""
    good = await start_client(rig)
    assert good.local_address is not None
    ws, conn = await raw_session(rig)
    await ws.send(frame)
    errors = await read_to_close(ws, conn)
    assert ws.close_code == code
    assert len(errors) == 1
    assert message in errors[0].message
    assert await echo_roundtrip(good.local_address, b"unaffected") == b"unaffected"
    assert rig.gateway.statistics().protocol_errors_total == 1
    good.close()


async def test_if_a_stream_id_is_reused_then_the_websocket_closes_1002(rig: Rig) -> None:
    """If a client opens a stream id twice, then the gateway closes it with 1002."""
    ws, conn = await raw_session(rig)
    await ws.send(conn.send(OpenStream(stream_id=1)))
    await ws.send(struct.pack("!BBHII", 0x11, 0, 0, 1, 0))
    errors = await read_to_close(ws, conn)
    assert ws.close_code == 1002
    assert "stream id 1 reused" in errors[0].message


async def test_if_garbage_arrives_instead_of_http_then_the_connection_is_dropped(
    rig: Rig,
) -> None:
    """If a peer sends random bytes, then the gateway hangs up and serves others as before."""
    good = await start_client(rig)
    assert good.local_address is not None
    tcp = await trio.open_tcp_stream("127.0.0.1", rig.gateway.port)
    await tcp.send_all(os.urandom(64) + b"\r\n\r\n")
    with trio.fail_after(5):
        while await tcp.receive_some(1000):
            pass
    await tcp.aclose()
    assert await echo_roundtrip(good.local_address, b"fine") == b"fine"
    good.close()


async def test_if_the_upgrade_lacks_credentials_then_401_with_a_hint(rig: Rig) -> None:
    """If no Authorization header is sent, then the 401 body says what to send."""
    with pytest.raises(HandshakeRejected, match="HTTP 401: no credentials") as info:
        await connect(rig.url, authorization="", receive_size=65536)
    assert info.value.status == 401


async def test_if_a_handshake_never_completes_then_the_gateway_drops_it(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    """If a peer connects and sends nothing, then after the handshake timeout it is dropped."""
    rig = await start_rig(nursery, handshake_timeout=10.0)
    tcp = await trio.open_tcp_stream("127.0.0.1", rig.gateway.port)
    await tcp.send_all(b"GET /tunnel HTTP/1.1\r\n")  # and never the rest
    await trio.testing.wait_all_tasks_blocked(0.05)
    mock_clock.jump(11)
    with trio.fail_after(5):
        assert await tcp.receive_some(1000) == b""
    await tcp.aclose()


async def test_if_the_legacy_endpoint_is_enabled_then_raw_bytes_relay(
    nursery: trio.Nursery,
) -> None:
    """If legacy mode is on, then /{name}/{secret}/{session} relays raw binary messages."""
    rig = await start_rig(nursery, legacy_endpoint=True)
    rig.hooks.secrets["abc"] = "secret-abc"
    url = f"ws://127.0.0.1:{rig.gateway.port}/app/secret-abc/abc"
    ws = await connect(url, authorization="", receive_size=65536)
    await ws.send(b"legacy bytes")
    got = b""
    while len(got) < 12:
        got += await ws.receive()
    assert got == b"legacy bytes"
    await ws.aclose()
    with pytest.raises(HandshakeRejected, match="HTTP 403"):
        await connect(
            f"ws://127.0.0.1:{rig.gateway.port}/app/nope/abc", authorization="", receive_size=65536
        )


async def test_if_the_legacy_endpoint_is_off_then_its_path_is_404(rig: Rig) -> None:
    """If legacy mode is off, then its path shape gets 404."""
    with pytest.raises(HandshakeRejected, match="HTTP 404"):
        await connect(
            f"ws://127.0.0.1:{rig.gateway.port}/app/{TOKEN}/abc",
            authorization="",
            receive_size=65536,
        )


async def test_if_a_second_client_attaches_then_it_takes_the_session_over(rig: Rig) -> None:
    """If another client attaches the same session, then it takes it over (fresh, as it has
    no replay state) and the first stops with close 4003."""
    closed: list[SessionClosed] = []
    done = trio.Event()

    async def first_client(task_status: trio.TaskStatus[TunnelClient]) -> None:
        try:
            await serve_client(
                rig.client_settings(), NewSession(token=TOKEN), task_status=task_status
            )
        except SessionClosed as exc:
            closed.append(exc)
        done.set()

    first: TunnelClient = await rig.nursery.start(first_client)
    events: list[ClientEvent] = []
    second = await start_client(
        rig,
        events,
        auth=AttachSession(session_id=first.session.session_id, secret=first.session.secret),
    )
    with trio.fail_after(5):
        await done.wait()
    assert "another connection attached this session" in str(closed[0])
    # The second client is a new process with no replay state: the session starts afresh.
    assert Connected(session=second.session, resumed=False) in events
    assert second.local_address is not None
    assert await echo_roundtrip(second.local_address, b"mine now") == b"mine now"
    second.close()


@attrs.define
class DetachWatchingHooks(FakeHooks):
    """The hooks fake, plus an event set once the gateway reports a detach."""

    detached_once: trio.Event = attrs.field(factory=trio.Event)

    def detached(self, session_id: str) -> None:
        super().detached(session_id)
        self.detached_once.set()


@pytest.mark.usefixtures("relay_mode")
async def test_if_a_new_client_process_attaches_a_detached_session_then_old_streams_reset(
    nursery: trio.Nursery,
) -> None:
    """If a new client process attaches a session whose old client vanished with a stream
    open, then that stream's TCP connection closes and the newcomer starts afresh."""
    hooks = DetachWatchingHooks()
    rig = await start_rig(nursery, hooks)
    ended: list[trio.Event] = []

    async def backend(stream: trio.SocketStream) -> None:
        done = trio.Event()
        ended.append(done)
        try:
            await echo_handler(stream)
        finally:
            done.set()

    rig.hooks.address = await start_tcp_server(nursery, backend)
    ws, conn = await raw_session(rig)
    await ws.send(
        conn.send(OpenStream(stream_id=1)) + conn.send(Data(stream_id=1, data=b"x" * 381))
    )
    echoed = 0
    while echoed < 381:
        conn.receive_data(await ws.receive())
        echoed += sum(len(e.data) for e in conn.events() if isinstance(e, Data))
    await trio.aclose_forcefully(ws.stream)  # the old process dies: no RESET, no close frame
    with trio.fail_after(5):
        await hooks.detached_once.wait()
    assert rig.gateway.statistics().streams == 1
    assert not ended[0].is_set()

    events: list[ClientEvent] = []
    client = await start_client(
        rig, events, auth=AttachSession(session_id="s1", secret="secret-s1")
    )
    assert Connected(session=client.session, resumed=False) in events
    with trio.fail_after(5):
        await ended[0].wait()
    assert ("ended", "s1", FRESH_REASON) in rig.hooks.log
    assert rig.hooks.log[-1] == ("attached", "s1")
    assert client.local_address is not None
    assert await echo_roundtrip(client.local_address, b"fresh start") == b"fresh start"
    stats = rig.gateway.statistics()
    assert (stats.sessions, stats.streams_opened_total) == (1, 2)
    client.close()


async def test_if_the_client_never_comes_back_then_the_grace_period_ends_the_session(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    """If a detached session is not resumed within 30 s, then it ends and the owner hears."""
    rig = await start_rig(nursery)
    ws, _conn = await raw_session(rig)
    await trio.aclose_forcefully(ws.stream)
    await trio.testing.wait_all_tasks_blocked(0.05)
    assert rig.hooks.log[-1] == ("detached", "s1")
    mock_clock.jump(29)
    await trio.testing.wait_all_tasks_blocked(0.05)
    assert rig.gateway.session_ids == frozenset({"s1"})
    mock_clock.jump(2)
    await trio.testing.wait_all_tasks_blocked(0.05)
    assert rig.hooks.log[-1] == (
        "ended",
        "s1",
        "the client did not resume within the grace period",
    )
    assert rig.gateway.session_ids == frozenset()


async def test_if_a_peer_goes_silent_then_keepalive_detaches_it(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    """If the client stops answering, then after the keepalive timeout the session detaches."""
    rig = await start_rig(nursery)
    ws, _conn = await raw_session(rig)  # never reads again, so never answers a PING
    for _ in range(4):
        mock_clock.jump(15)
        await trio.testing.wait_all_tasks_blocked(0.05)
    assert rig.hooks.log[-1] == ("detached", "s1")
    await ws.aclose()


async def test_if_streams_carry_bytes_then_the_owner_hears_the_traffic(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    """If bytes move, then the traffic hook reports them per direction within a second."""
    rig = await start_rig(nursery)
    client = await start_client(rig)
    assert client.local_address is not None
    assert await echo_roundtrip(client.local_address, b"x" * 1000) == b"x" * 1000
    await trio.testing.wait_all_tasks_blocked(0.05)
    mock_clock.jump(1.1)
    await trio.testing.wait_all_tasks_blocked(0.05)
    assert rig.hooks.traffic_seen == {"s1": [1000, 1000]}
    client.close()


@pytest.mark.usefixtures("relay_mode")
async def test_if_the_gateway_serves_tls_then_a_client_trusting_its_ca_gets_through(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """If the gateway listens with TLS, then wss:// works with the CA given and is refused
    (no retry loop) without it."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    rig = await start_rig(nursery, tls_certificate=cert_file, tls_private_key=key_file)
    url = f"wss://localhost:{rig.gateway.port}/tunnel"
    client = await start_client(rig, url=url, ca_file=ca_file)
    assert client.local_address is not None
    assert await echo_roundtrip(client.local_address, b"secure") == b"secure"
    with pytest.raises(SessionRefused, match="certificate failed verification"):
        await serve_client(rig.client_settings(url=url), NewSession(token=TOKEN))
    client.close()
