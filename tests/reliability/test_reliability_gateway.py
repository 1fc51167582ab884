"""Hostile peers at the gateway: fuzzed handshakes and frames, guessed credentials, stolen secrets.

Real loopback sockets, the gateway of tunnel/ with the tests' dict-backed
hooks (tests/tunnel/tunnel_fakes.py). Whatever a peer sends, the gateway
answers it alone (an HTTP error or a websocket close), never crashes, logs no
unexpected error, and a well-behaved session beside it keeps echoing.
"""

from __future__ import annotations

import select
import struct
from collections.abc import Awaitable, Callable

import pytest
import structlog
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tunnel_fakes import TOKEN, Rig, start_rig

from aldaas.tunnel import NewSession, TunnelClient, serve_client
from aldaas.tunnel._protocol import Connection, Hello, Role, Welcome
from aldaas.tunnel._ws import HandshakeRejected, WebSocket, connect

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Protocol: aldaas.v1\r\n{headers}\r\n"
)


async def good_client(rig: Rig) -> TunnelClient:
    async def run(task_status: trio.TaskStatus[TunnelClient]) -> None:
        await serve_client(
            rig.client_settings(), NewSession(token=TOKEN, params={}), task_status=task_status
        )

    client: TunnelClient = await rig.nursery.start(run)
    return client


async def echo(client: TunnelClient, payload: bytes) -> bytes:
    assert client.local_address is not None
    tcp = await trio.open_tcp_stream(*client.local_address)
    async with tcp:
        await tcp.send_all(payload)
        await tcp.send_eof()
        received = b""
        while data := await tcp.receive_some(65536):
            received += data
    return received


def with_rig(body: Callable[[Rig, TunnelClient], Awaitable[None]]) -> None:
    """Run ``body`` against a fresh gateway with one good session; check the aftermath.

    Afterwards: no unexpected error was logged, and neither the instance token nor the
    good session's secret appears anywhere in the captured log.
    """

    secrets: list[str] = [TOKEN]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            rig = await start_rig(nursery)
            good = await good_client(rig)
            secrets.append(good.session.secret or "")
            with trio.fail_after(20):
                await body(rig, good)
                assert await echo(good, b"still here") == b"still here"
            assert rig.gateway.statistics().sessions >= 1
            good.close()
            nursery.cancel_scope.cancel()

    with structlog.testing.capture_logs() as logs:
        trio.run(main)
    unexpected = [e for e in logs if e.get("log_level") in ("error", "critical")]
    assert unexpected == [], unexpected
    assert logs, "the gateway's log was captured"
    for secret in secrets:  # the instance token and the good session's secret never logged
        assert secret
        assert secret not in repr(logs)


async def drain(tcp: trio.SocketStream) -> bytes:
    received = b""
    with trio.move_on_after(10):
        try:
            while data := await tcp.receive_some(65536):
                received += data
        except trio.BrokenResourceError:
            pass
    return received


http_junk = st.one_of(
    st.binary(max_size=600),
    st.builds(
        lambda path, headers: UPGRADE.format(path=path, headers=headers).encode("utf-8", "replace"),
        st.sampled_from(["/tunnel", "/", "/x/y/z", "/tunnel?x=1", "//", "/" + "a" * 3000]),
        st.lists(
            st.sampled_from(
                [
                    f"Authorization: Bearer {TOKEN}x\r\n",
                    "Authorization: Bearer \r\n",
                    "Authorization: Aldaas-Session s1:wrong\r\n",
                    "Authorization: Aldaas-Session :\r\n",
                    "Authorization: Basic dXNlcjpwYXNz\r\n",
                    "Content-Length: 99999999\r\n",
                    "Transfer-Encoding: chunked\r\n",
                    "Sec-WebSocket-Version: 99\r\n",
                    "X-Junk: \x00\x01\x02\r\n",
                    "Authorization: Aldaas-Session " + "s" * 5000 + ":x\r\n",
                ]
            ),
            max_size=3,
        ).map("".join),
    ),
)


@pytest.mark.slow
@FUZZ
@given(http_junk)
def test_if_a_peer_sends_any_handshake_then_it_alone_is_turned_away(junk: bytes) -> None:
    """If a peer sends junk or a broken upgrade, then it gets an HTTP error or a hang-up, no more."""

    async def body(rig: Rig, good: TunnelClient) -> None:
        tcp = await trio.open_tcp_stream("127.0.0.1", rig.gateway.port)
        async with tcp:
            try:
                await tcp.send_all(junk)
                await tcp.send_eof()
            except trio.BrokenResourceError:
                return
            answer = await drain(tcp)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:200]

    with_rig(body)


frames = st.lists(
    st.one_of(
        st.builds(
            lambda kind, flags, ident, payload, lie: (
                struct.pack("!BBHII", kind, flags, 0, ident, max(0, len(payload) + lie)) + payload
            ),
            st.sampled_from([0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x10, 0x11, 0x12, 0x13])
            | st.integers(0, 255),
            st.sampled_from([0, 1]) | st.integers(0, 255),
            st.sampled_from([0, 1, 2, 3]) | st.integers(0, 2**32 - 1),
            st.binary(max_size=64) | st.just(b'{"name":"status","args":{}}'),
            st.sampled_from([0, 0, 0, 1, -1, 1 << 20]),
        ),
        st.binary(max_size=40),
    ),
    min_size=1,
    max_size=6,
).map(b"".join)


@pytest.mark.slow
@FUZZ
@given(frames)
def test_if_a_session_sends_any_frames_then_only_its_websocket_suffers(wire: bytes) -> None:
    """If an authenticated peer sends fuzzed frames, then at worst its websocket is closed."""

    async def body(rig: Rig, good: TunnelClient) -> None:
        ws: WebSocket = await connect(rig.url, authorization=f"Bearer {TOKEN}", receive_size=65536)
        conn = Connection(Role.CLIENT)
        await ws.send(conn.send(Hello(mode="new")))
        welcomed = False
        while not welcomed:
            conn.receive_data(await ws.receive())
            welcomed = any(isinstance(e, Welcome) for e in conn.events())
        try:
            await ws.send(wire)
            with trio.move_on_after(0.2):  # let the gateway react (it may close at once)
                while await ws.receive():
                    pass
        except trio.BrokenResourceError:
            pass
        await ws.aclose()

    with_rig(body)


def readable(tcp: trio.SocketStream) -> bool:
    return bool(select.select([tcp.socket.fileno()], [], [], 0)[0])


async def upgrade_from(rig: Rig, source: str, authorization: str) -> trio.SocketStream:
    tcp = await trio.open_tcp_stream("127.0.0.1", rig.gateway.port, local_address=source)
    headers = f"Authorization: {authorization}\r\n"
    await tcp.send_all(UPGRADE.format(path="/tunnel", headers=headers).encode())
    return tcp


async def test_if_a_peer_keeps_guessing_then_it_is_locked_out_longer_and_no_socket_waits(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    """If one address fails auth again and again, then each failure is answered at once and
    locks that address and credential out for longer (0.1, 0.2, 0.4, 0.8 s: HTTP 429 before
    the credentials are read); another address, or another lease, is not locked out."""
    rig = await start_rig(nursery)

    async def answer(source: str, authorization: str) -> bytes:
        tcp = await upgrade_from(rig, source, authorization)
        await trio.testing.wait_all_tasks_blocked(0.02)
        assert readable(tcp), "the answer waited"  # no clock jump: nothing sleeps
        with trio.fail_after(1):
            data = await tcp.receive_some(4096)
        await tcp.aclose()
        return data

    for lockout in (0.1, 0.2, 0.4, 0.8):
        assert (await answer("127.0.0.2", "Bearer guess")).startswith(b"HTTP/1.1 401")
        locked = await answer("127.0.0.2", f"Bearer {TOKEN}")
        assert locked.startswith(b"HTTP/1.1 429")
        assert b"\r\nretry-after: 1\r\n" in locked.lower()
        mock_clock.jump(lockout)
    assert (await answer("127.0.0.1", "Aldaas-Session s9:guess")).startswith(b"HTTP/1.1 403")
    assert (await answer("127.0.0.1", "Bearer guess")).startswith(b"HTTP/1.1 401")
    assert (await answer("127.0.0.2", "Aldaas-Session s9:guess")).startswith(b"HTTP/1.1 403")
    # Once the lockout is over, the right token from the guessing address is served at once.
    assert (await answer("127.0.0.2", f"Bearer {TOKEN}")).startswith(b"HTTP/1.1 101")
    await trio.testing.wait_all_tasks_blocked(0.02)
    stats = rig.gateway.statistics()
    assert (stats.auth_failures_total, stats.refused_total, stats.handshakes) == (7, 4, 0)


@pytest.mark.slow
async def test_if_a_session_secret_is_used_for_another_session_then_403(
    nursery: trio.Nursery,
) -> None:
    """If a client presents session A's id with session B's secret, then the gateway refuses it."""
    rig = await start_rig(nursery)
    first, second = await good_client(rig), await good_client(rig)
    a, b = first.session, second.session
    assert a.secret is not None
    assert b.secret is not None
    for session_id, secret in ((a.session_id, b.secret), (b.session_id, a.secret)):
        with pytest.raises(HandshakeRejected) as caught:
            await connect(
                rig.url, authorization=f"Aldaas-Session {session_id}:{secret}", receive_size=65536
            )
        assert caught.value.status == 403
        assert secret not in caught.value.message
    assert await echo(first, b"a") == b"a"
    assert await echo(second, b"b") == b"b"
    first.close()
    second.close()
