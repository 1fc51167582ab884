"""The network between client and gateway is cut (connections reset, reconnects refused), then restored.

Real loopback sockets: the tunnel client reaches the gateway through
:class:`faultproxy.FaultProxy`. Inside the gateway's grace period the session
resumes and a transfer in flight arrives whole; beyond it the client is
welcomed again without its streams (``resumed=False``) and says so through
its ``Connected`` event, old connections break, new ones work.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import trio
from faultproxy import FaultProxy
from tunnel_fakes import TOKEN, Rig, start_rig

from aldaas.tunnel import (
    ClientEvent,
    Connected,
    Disconnected,
    NewSession,
    TunnelClient,
    serve_client,
)

pytestmark = pytest.mark.slow


async def client_through(rig: Rig, proxy: FaultProxy, events: list[ClientEvent]) -> TunnelClient:
    settings = rig.client_settings(
        url=f"ws://127.0.0.1:{proxy.port}/tunnel",
        reconnect_initial_delay=0.02,
        reconnect_max_delay=0.1,
    )

    async def run(task_status: trio.TaskStatus[TunnelClient]) -> None:
        await serve_client(
            settings,
            NewSession(token=TOKEN, params={}),
            on_event=events.append,
            task_status=task_status,
        )

    client: TunnelClient = await rig.nursery.start(run)
    return client


async def wait_until(condition: object, seconds: float = 10.0) -> None:
    with trio.fail_after(seconds):
        while not condition():  # type: ignore[operator]  # noqa: ASYNC110 - real sockets
            await trio.sleep(0.02)


async def test_if_the_link_is_down_shorter_than_the_grace_period_then_a_transfer_resumes_whole(
    nursery: trio.Nursery,
) -> None:
    """If the link is reset and refused for a while mid-transfer, then resumption delivers every byte once."""
    rig = await start_rig(nursery, grace_period=30.0)
    proxy = FaultProxy("127.0.0.1", rig.gateway.port)
    await nursery.start(proxy.run)
    events: list[ClientEvent] = []
    client = await client_through(rig, proxy, events)
    assert client.local_address is not None
    payload = os.urandom(3 * 1024 * 1024)
    received = bytearray()
    tcp = await trio.open_tcp_stream(*client.local_address)
    async with tcp, trio.open_nursery() as inner:

        async def send() -> None:
            await tcp.send_all(payload)
            await tcp.send_eof()

        async def outage() -> None:
            await wait_until(lambda: len(received) > 512 * 1024)
            proxy.mode = "refuse"
            proxy.cut()
            await wait_until(lambda: proxy.connections >= 4)  # a few refused reconnects
            proxy.mode = "pass"

        inner.start_soon(send)
        inner.start_soon(outage)
        while data := await tcp.receive_some(65536):
            received += data
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert proxy.cuts >= 4
    first_drop = next(i for i, e in enumerate(events) if isinstance(e, Disconnected))
    after = [e.resumed for e in events[first_drop:] if isinstance(e, Connected)]
    assert True in after, events  # the reconnect after the cut resumed the session
    client.close()


async def test_if_the_link_is_down_beyond_the_grace_period_then_the_client_starts_afresh(
    nursery: trio.Nursery,
) -> None:
    """If the link stays down past the grace period, then the client is welcomed without its streams."""
    rig = await start_rig(nursery, grace_period=0.5)
    proxy = FaultProxy("127.0.0.1", rig.gateway.port)
    await nursery.start(proxy.run)
    events: list[ClientEvent] = []
    client = await client_through(rig, proxy, events)
    assert client.local_address is not None
    old = await trio.open_tcp_stream(*client.local_address)
    await old.send_all(b"ping")
    assert await old.receive_some(10) == b"ping"
    proxy.mode = "refuse"
    proxy.cut()
    await wait_until(lambda: any(e[0] == "ended" for e in rig.hooks.log))
    proxy.mode = "pass"
    await wait_until(lambda: any(isinstance(e, Connected) and not e.resumed for e in events))
    with trio.fail_after(10):
        try:
            await old.send_all(b"lost?")
            assert await old.receive_some(10) == b""
        except trio.BrokenResourceError:
            pass
    await old.aclose()
    new = await trio.open_tcp_stream(*client.local_address)
    async with new:
        await new.send_all(b"fresh")
        assert await new.receive_some(10) == b"fresh"
    session = [e.session.session_id for e in events if isinstance(e, Connected)]
    assert len(session) >= 2
    client.close()
