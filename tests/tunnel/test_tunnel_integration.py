"""Gateway and client over real loopback sockets."""

from __future__ import annotations

import pytest
import trio
from tunnel_fakes import TOKEN, Rig

from tunnel import (
    ClientEvent,
    Connected,
    NewSession,
    TunnelClient,
    serve_client,
)


async def start_client(
    rig: Rig, events: list[ClientEvent] | None = None, **changes: object
) -> TunnelClient:
    auth = NewSession(token=TOKEN, params={"name": "ci"})
    client: TunnelClient = await rig.nursery.start(
        lambda task_status: serve_client(
            rig.client_settings(**changes),
            auth,
            on_event=(events.append if events is not None else None),
            task_status=task_status,
        )
    )
    return client


@pytest.mark.slow
async def test_if_a_local_connection_is_made_then_bytes_echo_through_the_tunnel(rig: Rig) -> None:
    """If an application connects to the local port, then the echo server's reply comes back."""
    events: list[ClientEvent] = []
    client = await start_client(rig, events)
    assert client.session.session_id == "s1"
    assert client.session.info == {"user": "u1"}
    assert client.local_address is not None
    tcp = await trio.open_tcp_stream(*client.local_address)
    await tcp.send_all(b"hello tunnel")
    got = b""
    while len(got) < 12:
        got += await tcp.receive_some(100)
    assert got == b"hello tunnel"
    await tcp.send_eof()
    assert await tcp.receive_some(100) == b""
    await tcp.aclose()
    assert isinstance(events[-1], Connected)
    client.close()
