"""The gateway's admission limits over real loopback sockets: handshakes before authentication,
sessions (HTTP 503), the memory budget, and what a refusal may tell a client."""

from __future__ import annotations

import functools
import select
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from tunnel_fakes import TOKEN, Rig, start_rig

from aldaas.tunnel import NewSession, TunnelClient, open_control, serve_client
from aldaas.tunnel._limits import PEERS_MAX, REPLAY_CHUNK, LoginPenalties
from aldaas.tunnel._ws import HandshakeRejected, connect

pytestmark = pytest.mark.slow

WINDOW = 64 * 1024


async def start_client(rig: Rig) -> TunnelClient:
    client: TunnelClient = await rig.nursery.start(
        functools.partial(serve_client, rig.client_settings(), NewSession(token=TOKEN, params={}))
    )
    return client


async def idle_from(rig: Rig, source: str) -> trio.SocketStream:
    """A connection that never sends its upgrade (a slowloris)."""
    tcp = await trio.open_tcp_stream("127.0.0.1", rig.gateway.port, local_address=source)
    await trio.testing.wait_all_tasks_blocked(0.02)
    return tcp


async def answer_of(tcp: trio.SocketStream) -> bytes:
    with trio.fail_after(2):
        data = await tcp.receive_some(4096)
    await tcp.aclose()
    return data


async def test_if_a_peer_holds_its_handshake_limit_then_its_next_connection_gets_429_at_once(
    nursery: trio.Nursery,
) -> None:
    """If one address holds max_unauthenticated_per_peer idle handshakes, then its next
    connection is answered 429 before sending anything, another address is still served, and
    once an idle one goes, the address is admitted again."""
    rig = await start_rig(nursery, max_unauthenticated=10, max_unauthenticated_per_peer=3)
    idle = [await idle_from(rig, "127.0.0.2") for _ in range(3)]
    assert rig.gateway.statistics().handshakes == 3
    over = await idle_from(rig, "127.0.0.2")
    answer = await answer_of(over)
    assert answer.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    assert b"still in their handshake" in answer
    other = await start_client(rig)  # 127.0.0.1 is another peer
    await idle[0].aclose()
    await trio.testing.wait_all_tasks_blocked(0.02)
    again = await idle_from(rig, "127.0.0.2")
    assert rig.gateway.statistics().handshakes == 3
    for tcp in [*idle[1:], again]:
        await tcp.aclose()
    other.close()


async def test_if_a_tls_peer_is_over_its_handshake_limit_then_it_is_hung_up_on_at_once(
    nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """If the gateway serves TLS and one address holds its handshake limit, then its next
    connection is closed without the clock moving (no TLS handshake is waited for), counted
    by the address under TLS; another address still gets through."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    rig = await start_rig(
        nursery,
        tls_certificate=cert_file,
        tls_private_key=key_file,
        max_unauthenticated_per_peer=1,
    )
    idle = await idle_from(rig, "127.0.0.2")
    assert rig.gateway.statistics().handshakes == 1
    over = await idle_from(rig, "127.0.0.2")
    assert select.select([over.socket.fileno()], [], [], 0)[0], "the refusal waited"
    assert await over.receive_some(4096) == b""
    assert rig.gateway.statistics().refused_total == 1
    other = await idle_from(rig, "127.0.0.3")
    assert rig.gateway.statistics().handshakes == 2
    for tcp in (idle, over, other):
        await tcp.aclose()


async def test_if_the_gateway_holds_its_handshake_limit_then_every_new_connection_gets_503(
    nursery: trio.Nursery,
) -> None:
    """If max_unauthenticated handshakes are open across peers, then a new connection from any
    address is answered 503 at once; authenticated sessions do not count."""
    rig = await start_rig(nursery, max_unauthenticated=2, max_unauthenticated_per_peer=2)
    session = await start_client(rig)
    idle = [await idle_from(rig, "127.0.0.2"), await idle_from(rig, "127.0.0.3")]
    answer = await answer_of(await idle_from(rig, "127.0.0.4"))
    assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert rig.gateway.statistics().refused_total == 1
    for tcp in idle:
        await tcp.aclose()
    session.close()


async def test_if_max_sessions_is_reached_then_a_new_session_gets_http_503_and_control_works(
    nursery: trio.Nursery,
) -> None:
    """If the gateway holds max_sessions sessions, then a new session's upgrade is answered
    HTTP 503 with Retry-After, while a control connection (aldaas status) is still served."""
    rig = await start_rig(nursery, max_sessions=1)
    first = await start_client(rig)
    with pytest.raises(HandshakeRejected) as refused:
        await connect(rig.url, authorization=f"Bearer {TOKEN}", receive_size=65536)
    assert refused.value.status == 503
    assert "holds 1 sessions, its limit (max_sessions)" in refused.value.message
    async with open_control(rig.client_settings(), TOKEN) as control:
        assert await control.request("status") == {"session": None, "args": {}}
    first.close()


async def test_if_a_stream_cannot_connect_then_the_client_hears_no_internal_address(
    nursery: trio.Nursery,
) -> None:
    """If the session's database refuses the connection, then the stream's reset reason says
    why without the database's address (host or port)."""
    rig = await start_rig(nursery)
    client = await start_client(rig)
    rig.hooks.addresses["s1"] = ("127.0.0.9", 1)
    stream = await client.open_stream()
    with pytest.raises(trio.BrokenResourceError) as broken:
        await stream.receive_some()
    message = str(broken.value)
    assert "could not connect to the session's database (connection refused)" in message
    assert "127.0.0.9" not in message
    assert "1)" not in message.replace("(code 2)", "")
    client.close()


async def test_if_the_legacy_database_cannot_be_reached_then_502_names_no_address(
    nursery: trio.Nursery,
) -> None:
    """If a legacy websocket's database refuses the connection, then the 502 names no address."""
    rig = await start_rig(nursery, legacy_endpoint=True)
    rig.hooks.secrets["abc"] = "secret-abc"
    rig.hooks.address = ("127.0.0.9", 1)
    with pytest.raises(HandshakeRejected) as refused:
        await connect(
            f"ws://127.0.0.1:{rig.gateway.port}/app/secret-abc/abc",
            authorization="",
            receive_size=65536,
        )
    assert refused.value.status == 502
    assert "127.0.0.9" not in refused.value.message
    assert "connection refused" in refused.value.message


async def test_if_the_memory_budget_is_full_then_new_streams_and_sessions_are_refused(
    nursery: trio.Nursery,
) -> None:
    """If the memory budget holds one session's replay floor and two stream windows, then a
    third stream is reset (code 3) and a second session gets 503; closing a stream gives its
    window back, and an ended session gives everything back."""
    budget = REPLAY_CHUNK + 2 * WINDOW
    rig = await start_rig(nursery, memory_budget=budget, stream_window=WINDOW)
    client = await start_client(rig)
    first, second = await client.open_stream(), await client.open_stream()
    await first.send_all(b"one")
    assert await first.receive_some() == b"one"
    await second.send_all(b"two")
    assert await second.receive_some() == b"two"
    assert rig.gateway.statistics().memory_held_bytes == budget
    third = await client.open_stream()
    with pytest.raises(trio.BrokenResourceError, match="memory budget"):
        await third.receive_some()
    with pytest.raises(HandshakeRejected) as refused:
        await connect(rig.url, authorization=f"Bearer {TOKEN}", receive_size=65536)
    assert (refused.value.status, "memory budget" in refused.value.message) == (503, True)
    await second.aclose()
    await trio.testing.wait_all_tasks_blocked(0.02)
    fourth = await client.open_stream()
    await fourth.send_all(b"four")
    assert await fourth.receive_some() == b"four"
    client.close()
    await trio.testing.wait_all_tasks_blocked(0.02)
    assert rig.gateway.close_session("s1", "test over")  # ends its grace period now
    assert rig.gateway.statistics().memory_held_bytes == 0


async def test_if_the_budget_leaves_no_room_to_grow_the_replay_then_bulk_data_still_flows(
    nursery: trio.Nursery,
) -> None:
    """If the budget holds only the session's replay floor and one window, then a transfer
    many times larger still arrives whole (the gateway waits for ACKs instead of buffering),
    and the session never holds more than the budget."""
    budget = REPLAY_CHUNK + WINDOW
    rig = await start_rig(nursery, memory_budget=budget, stream_window=WINDOW)
    client = await start_client(rig)
    stream = await client.open_stream()
    payload = bytes(range(256)) * (16 * 1024)  # 4 MiB, 16 replay floors
    held: list[int] = []

    async def send() -> None:
        await stream.send_all(payload)
        await stream.send_eof()

    async with trio.open_nursery() as inner:
        inner.start_soon(send)
        received = bytearray()
        while data := await stream.receive_some(65536):
            received += data
            held.append(rig.gateway.statistics().memory_held_bytes)
    assert received == payload
    assert max(held) <= budget
    client.close()


def test_if_a_peer_fails_with_many_made_up_session_ids_then_its_token_lockout_stays() -> None:
    """If a peer locked out for the instance token then fails with more made-up session ids
    than the penalties remember, then its instance-token lockout is still there."""
    penalties = LoginPenalties()
    penalties.failed("10.0.0.1", "", now=0.0)
    for n in range(PEERS_MAX + 10):
        penalties.failed("10.0.0.1", f"made-up-{n}" + "x" * 1000, now=0.01)
    assert penalties.locked_for("10.0.0.1", "", now=0.02) > 0
    assert penalties.locked_for("10.0.0.1", "made-up-0" + "x" * 1000, now=0.02) == 0
    assert penalties.locked_for("10.0.0.1", f"made-up-{PEERS_MAX + 9}", now=0.02) == 0
    assert penalties.locked_for("10.0.0.1", f"made-up-{PEERS_MAX + 9}" + "x" * 1000, now=0.02) > 0
