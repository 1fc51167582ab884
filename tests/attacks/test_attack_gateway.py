"""Attacks on the gateway by a lease holder: learning another lease's id, opening another lease.

The real broker (``Broker``: its status answer and its gateway hooks) behind the real gateway
on loopback, over the pool's in-memory fakes (tests/pool/pool_fakes.py) under the real clock.
The attacker holds what every lease holder holds: the instance token and its own lease's id
and secret. Each attack must be refused.
"""

from __future__ import annotations

import functools
import pathlib
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio

# tests/ has no __init__.py: the pool's fakes live in tests/pool.
_POOL_TESTS = str(pathlib.Path(__file__).resolve().parent.parent / "pool")
if _POOL_TESTS not in sys.path:
    sys.path.append(_POOL_TESTS)

from pool_fakes import FakeSource, FakeWorld, running_pool, settings, wait_for  # noqa: E402

from aldaas import tunnel  # noqa: E402
from aldaas.broker._broker import Broker  # noqa: E402
from aldaas.broker._settings import AdminSettings, Settings  # noqa: E402
from aldaas.pool import LeaseSettings, WarmPoolSettings  # noqa: E402
from aldaas.tunnel._ws import HandshakeRejected, connect  # noqa: E402

pytestmark = pytest.mark.slow

TOKEN = "instance-token-held-by-every-lease-holder"
ADMIN_TOKEN = "admin-token-held-by-the-operator"


@attrs.frozen
class Stage:
    broker: Broker
    port: int
    nursery: trio.Nursery

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/tunnel"

    def client_settings(self) -> tunnel.ClientSettings:
        return tunnel.ClientSettings(url=self.url, listen=False)

    async def lease(self) -> tunnel.TunnelClient:
        """A lease holder's session, as ``aldaas connect`` opens it."""
        client: tunnel.TunnelClient = await self.nursery.start(
            functools.partial(
                tunnel.serve_client,
                self.client_settings(),
                tunnel.NewSession(token=TOKEN, params={"name": "dev"}),
            )
        )
        return client


@asynccontextmanager
async def stage(**gateway: object) -> AsyncIterator[Stage]:
    """The broker over a warm fake pool of two, its gateway listening on loopback."""
    source = FakeSource()
    source.put("nightly.sql", b"CREATE TABLE t (i int);\n", modified=1.0)
    world = FakeWorld(clone_seconds=0.01, restore_seconds_per_chunk=0.01, check_seconds=0.01)
    pool_settings = settings(
        pool=WarmPoolSettings(size=2, max_provisioning=2), lease=LeaseSettings(ttl=300.0)
    )
    broker_settings = Settings(
        gateway=tunnel.GatewaySettings(
            host="127.0.0.1",
            port=0,
            instance_token=TOKEN,
            **gateway,  # type: ignore[arg-type]
        ),
        admin=AdminSettings(token=ADMIN_TOKEN),
    )
    async with running_pool(world, source, pool_settings) as h, trio.open_nursery() as nursery:
        broker = Broker(broker_settings, h.pool)
        await wait_for(lambda: h.pool.statistics().clones["warm"] >= 2, what="2 warm clones")
        port = await nursery.start(broker.run_gateway)
        yield Stage(broker, port, nursery)
        nursery.cancel_scope.cancel()


async def test_if_a_lease_holder_asks_status_then_it_sees_no_other_lease_id() -> None:
    """If a lease holder asks status (on its session or a control connection), then it sees the
    pool's totals and its own lease only; another lease's id appears nowhere in the answer."""
    async with stage() as s:
        victim, attacker = await s.lease(), await s.lease()
        victim_id = victim.session.session_id
        on_session = await attacker.request("status", {})
        async with tunnel.open_control(s.client_settings(), TOKEN) as control:
            anonymous = await control.request("status", {})
            named = await control.request(
                "status",
                {"lease": attacker.session.session_id, "secret": attacker.session.secret},
            )
            guessed = await control.request("status", {"lease": victim_id, "secret": "guess"})
        for answer in (on_session, anonymous, named, guessed):
            assert isinstance(answer, dict)
            assert victim_id not in repr(answer)
            assert answer["pool"]["leases_active"] == 2  # type: ignore[index,call-overload]
        assert isinstance(on_session, dict)
        assert isinstance(named, dict)
        for mine in (on_session, named):
            assert [lease["id"] for lease in mine["leases"]] == [  # type: ignore[index,union-attr]
                attacker.session.session_id
            ]
        assert anonymous["leases"] == []  # type: ignore[index,call-overload]
        victim.close()
        attacker.close()


async def test_if_the_admin_token_is_sent_then_status_lists_every_lease_and_a_wrong_one_fails() -> (
    None
):
    """If status carries the admin token, then it lists every lease; a wrong admin token is
    refused, and a right one sent right after a wrong one is refused too (no guessing)."""
    async with stage() as s:
        first, second = await s.lease(), await s.lease()
        async with tunnel.open_control(s.client_settings(), TOKEN) as control:
            everything = await control.request("status", {"admin_token": ADMIN_TOKEN})
            assert isinstance(everything, dict)
            assert sorted(lease["id"] for lease in everything["leases"]) == sorted(  # type: ignore[union-attr,index]
                [first.session.session_id, second.session.session_id]
            )
            with pytest.raises(tunnel.ControlError, match="admin token is wrong"):
                await control.request("status", {"admin_token": "guess"})
            with pytest.raises(tunnel.ControlError, match="admin token was wrong moments ago"):
                await control.request("status", {"admin_token": ADMIN_TOKEN})
            await trio.sleep(0.2)  # the first failure's lockout (0.1 s) is over
            again = await control.request("status", {"admin_token": ADMIN_TOKEN})
            assert isinstance(again, dict)
            assert len(again["leases"]) == 2  # type: ignore[arg-type]
        first.close()
        second.close()


async def test_if_a_lease_holder_opens_another_lease_by_its_bare_id_then_the_legacy_path_refuses() -> (
    None
):
    """If the legacy endpoint is on and a lease holder puts the instance token (or its own
    lease's secret) and another lease's id in the path, then the gateway answers 403."""
    async with stage(legacy_endpoint=True) as s:
        victim, attacker = await s.lease(), await s.lease()
        victim_id = victim.session.session_id
        base = f"ws://127.0.0.1:{s.port}"
        for credential in (TOKEN, attacker.session.secret or ""):
            with pytest.raises(HandshakeRejected) as refused:
                await connect(
                    f"{base}/aldaas-chart/{credential}/{victim_id}",
                    authorization="",
                    receive_size=65536,
                )
            assert refused.value.status == 403
            assert "not its own" in refused.value.message
            await trio.sleep(0.2)  # past the lockout the failure started
        assert s.broker.gateway is not None
        assert s.broker.gateway.statistics().auth_failures_total == 2
        victim.close()
        attacker.close()
