"""The broker's wiring of gateway sessions to pool leases, over the pool's in-memory fakes."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
from pool_fakes import (
    FakeSource,
    FakeWorld,
    Harness,
    RestartableFakeProvider,
    running_pool,
    settings,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families
from trio.testing import MockClock

from aldaas import tunnel
from aldaas.broker._admin import StartupError
from aldaas.broker._broker import Broker, make_pool
from aldaas.broker._settings import Settings
from aldaas.pool import (
    CloneProvisioned,
    KubernetesSettings,
    LeaseSettings,
    S3Settings,
    SourceSettings,
    WarmPoolSettings,
)


@attrs.frozen(kw_only=True)
class FakeGatewayStatistics:
    sessions: int
    streams: int
    bytes_up_total: int
    bytes_down_total: int
    auth_failures_total: int
    refused_total: int
    handshakes: int
    memory_held_bytes: int


@attrs.define
class FakeGateway:
    """Plays the gateway's part: opens sessions at the broker, relays traffic, closes on request.

    Its statistics count what went through it, as the real gateway's do: a
    closed session leaves the open count but its bytes stay in the totals.
    """

    closed: list[tuple[str, str]] = attrs.Factory(list)
    open_sessions: dict[str, tuple[int, int]] = attrs.Factory(dict)
    """Session id → (bytes up, bytes down) so far."""
    closed_bytes: tuple[int, int] = (0, 0)

    async def open(self, broker: Broker) -> tunnel.SessionGrant:
        grant = await broker.open_session({}, _no_progress)
        self.open_sessions[grant.session_id] = (0, 0)
        return grant

    def relay(self, broker: Broker, session_id: str, up: int, down: int) -> None:
        before_up, before_down = self.open_sessions[session_id]
        self.open_sessions[session_id] = (before_up + up, before_down + down)
        broker.traffic(session_id, up, down)

    def close_session(self, session_id: str, reason: str) -> bool:
        """Every session the broker granted counts as open here (tests open most directly)."""
        self.closed.append((session_id, reason))
        up, down = self.open_sessions.pop(session_id, (0, 0))
        self.closed_bytes = (self.closed_bytes[0] + up, self.closed_bytes[1] + down)
        return True

    def statistics(self) -> FakeGatewayStatistics:
        counted = [*self.open_sessions.values(), self.closed_bytes]
        return FakeGatewayStatistics(
            sessions=len(self.open_sessions),
            streams=0,
            bytes_up_total=sum(up for up, _ in counted),
            bytes_down_total=sum(down for _, down in counted),
            auth_failures_total=0,
            refused_total=0,
            handshakes=0,
            memory_held_bytes=0,
        )


@attrs.frozen
class Wired:
    h: Harness
    broker: Broker
    gateway: FakeGateway
    provider: RestartableFakeProvider | None = None


def _source() -> FakeSource:
    source = FakeSource()
    source.put("nightly.sql", b"CREATE TABLE t (i int);\n" * 10, modified=1.0)
    return source


@asynccontextmanager
async def wired(
    source: FakeSource | None = None,
    *,
    size: int = 2,
    queue_timeout: float = 120.0,
    clone_seconds: float = 1.0,
    restartable: bool = False,
) -> AsyncIterator[Wired]:
    pool_settings = settings(
        pool=WarmPoolSettings(size=size, max_provisioning=2),
        lease=LeaseSettings(ttl=300.0, queue_timeout=queue_timeout),
    )
    world = FakeWorld(clone_seconds=clone_seconds)
    provider = RestartableFakeProvider(world) if restartable else None
    async with running_pool(world, source or _source(), pool_settings, provider) as h:
        broker = Broker(Settings(), h.pool)
        gateway = FakeGateway()
        broker.gateway = gateway  # type: ignore[assignment]
        yield Wired(h=h, broker=broker, gateway=gateway, provider=provider)


async def _warm(w: Wired, n: int) -> None:
    await wait_for(lambda: w.h.pool.statistics().clones["warm"] >= n, what=f"{n} warm clones")


def _sample(w: Wired, name: str, labels: dict[str, str] | None = None) -> float:
    text = w.broker.metrics.exposition().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == (labels or {}):
                return float(s.value)
    raise AssertionError(f"no sample {name}{labels or ''}")


def _no_progress(_: tunnel.JSONObject) -> None:
    raise AssertionError("no progress expected")


async def test_if_a_session_opens_then_it_is_a_lease_that_resolves_to_its_clone(
    autojump_clock: MockClock,
) -> None:
    """If a new session opens, then its id and secret are a lease's and it resolves to the clone."""
    async with wired() as w:
        await _warm(w, 2)
        grant = await w.broker.open_session({"ttl": 60, "name": "dev"}, _no_progress)
        lease = w.h.pool.lease(grant.session_id)
        assert (lease.ttl, dict(lease.labels)) == (60.0, {"name": "dev"})
        assert await w.broker.verify_session(grant.session_id, grant.secret) is True
        assert await w.broker.verify_session(grant.session_id, grant.secret + "x") is False
        assert w.broker.resolve(grant.session_id) == (
            lease.endpoint.host,
            lease.endpoint.port,
        )
        assert grant.info["user"] == lease.endpoint.user
        assert grant.info["database"] == lease.endpoint.database
        assert grant.secret not in repr(grant.info)
        assert _sample(w, "aldaas_handout_seconds_count") == 1


async def test_if_no_snapshot_is_ready_then_the_session_is_refused_in_one_sentence(
    autojump_clock: MockClock,
) -> None:
    """If nothing has been restored yet, then open_session refuses with one sentence."""
    async with wired(FakeSource()) as w:
        with pytest.raises(tunnel.SessionRefused) as info:
            await w.broker.open_session({}, _no_progress)
        message = str(info.value)
        assert message.startswith("No snapshot is ready yet")
        assert message.endswith(".")
        assert w.broker.is_ready() == (
            False,
            "No snapshot is ready yet; the broker is waiting for a backup.",
        )


async def test_if_the_ttl_is_not_a_number_then_the_session_is_refused(
    autojump_clock: MockClock,
) -> None:
    """If the client's TTL is not a number, then open_session refuses naming the value."""
    async with wired() as w:
        with pytest.raises(tunnel.SessionRefused, match="got 'soon'"):
            await w.broker.open_session({"ttl": "soon"}, _no_progress)


async def test_if_the_pool_is_exhausted_then_progress_is_sent_and_the_queue_times_out(
    autojump_clock: MockClock,
) -> None:
    """If no clone is free, then the client gets queue progress, then a timeout refusal."""
    async with wired(size=1, queue_timeout=5, clone_seconds=100) as w:
        await _warm(w, 1)
        await w.broker.open_session({}, _no_progress)
        progress: list[tunnel.JSONObject] = []
        with pytest.raises(tunnel.SessionRefused) as info:
            await w.broker.open_session({}, progress.append)
        assert progress[0]["queue_position"] == 1
        assert str(info.value)[0].isupper()
        assert str(info.value).startswith("No database became free within 5 s")


async def test_if_a_client_detaches_then_the_idle_ttl_ends_the_lease_and_the_session(
    autojump_clock: MockClock,
) -> None:
    """If the only client detaches, then after the TTL the lease expires and its session closes."""
    async with wired() as w:
        await _warm(w, 2)
        grant = await w.broker.open_session({"ttl": 60}, _no_progress)
        w.broker.attached(grant.session_id)
        await trio.sleep(600)
        assert w.h.pool.lease(grant.session_id).attached == 1
        w.broker.detached(grant.session_id)
        w.broker.session_ended(grant.session_id, "grace period over")
        await wait_for(lambda: bool(w.gateway.closed), what="the session to be closed")
        assert w.gateway.closed == [
            (grant.session_id, "the lease expired after its idle TTL with no client attached.")
        ]
        assert _sample(w, "aldaas_lease_expirations_total") == 1


async def test_if_reset_is_asked_on_the_session_then_new_streams_reach_a_new_clone(
    autojump_clock: MockClock,
) -> None:
    """If the client asks reset on its session, then resolve gives the new clone, id unchanged."""
    async with wired() as w:
        await _warm(w, 2)
        grant = await w.broker.open_session({}, _no_progress)
        before = w.broker.resolve(grant.session_id)
        answer = await w.broker.control(grant.session_id, "reset", {})
        assert isinstance(answer, dict)
        assert answer["lease"] == grant.session_id
        assert answer["resets"] == 1
        after = w.broker.resolve(grant.session_id)
        assert after != before
        assert _sample(w, "aldaas_lease_resets_total") == 1
        assert w.gateway.closed == []


async def test_if_a_leased_database_is_started_again_then_streams_wait_for_its_new_address(
    autojump_clock: MockClock,
) -> None:
    """If a lease's database dies on a provider that keeps its data (Kubernetes), then new streams
    are refused in one sentence while it is started again (never sent to the old address), and
    then reach its new address under the same session, which stays open."""
    async with wired(restartable=True) as w:
        await _warm(w, 2)
        grant = await w.broker.open_session({}, _no_progress)
        before = w.broker.resolve(grant.session_id)
        provider = w.provider
        assert provider is not None
        provider.restart_gate = trio.Event()
        w.h.world.kill(w.h.pool.lease(grant.session_id).clone)
        await wait_for(
            lambda: w.h.pool.lease(grant.session_id).endpoint is None, what="address withdrawn"
        )
        with pytest.raises(tunnel.SessionRefused, match="is being started again") as refused:
            w.broker.resolve(grant.session_id)
        assert str(refused.value).count(". ") == 0
        provider.restart_gate.set()
        await wait_for(
            lambda: w.h.pool.lease(grant.session_id).endpoint is not None, what="new address"
        )
        after = w.broker.resolve(grant.session_id)
        assert after != before
        clone = w.h.pool.lease(grant.session_id).clone
        await wait_for(lambda: clone in provider.protected, what="protected from drains")
        assert w.h.world.destroyed_leased == []
        assert w.gateway.closed == []


async def test_if_a_control_connection_names_a_lease_then_its_secret_must_match(
    autojump_clock: MockClock,
) -> None:
    """If reset/release come without a session, then a wrong secret is refused in one sentence."""
    async with wired() as w:
        await _warm(w, 2)
        grant = await w.broker.open_session({}, _no_progress)
        with pytest.raises(tunnel.ControlError) as info:
            await w.broker.control(None, "release", {"lease": grant.session_id, "secret": "nope"})
        assert "secret does not match" in str(info.value)
        assert "nope" not in str(info.value)
        answer = await w.broker.control(
            None, "release", {"lease": grant.session_id, "secret": grant.secret}
        )
        assert answer == {"released": grant.session_id}
        assert w.gateway.closed == [(grant.session_id, "the lease was released.")]
        with pytest.raises(tunnel.ControlError, match="has ended"):
            await w.broker.control(grant.session_id, "extend", {})


async def test_if_a_client_releases_over_its_own_session_then_the_gateway_is_not_told(
    autojump_clock: MockClock,
) -> None:
    """If the release arrives on the lease's own session, then the client closes it, not us."""
    async with wired() as w:
        await _warm(w, 2)
        grant = await w.broker.open_session({}, _no_progress)
        assert await w.broker.control(grant.session_id, "release", {}) == {
            "released": grant.session_id
        }
        assert w.gateway.closed == []


async def test_if_a_client_releases_over_its_own_session_then_its_detach_ends_the_session(
    autojump_clock: MockClock,
) -> None:
    """If a client released its lease over its session and hangs up, then the session ends at once.

    Found by bench/load_cycles.py: without this each released session waited out the
    gateway's grace period (30 s) with its tasks, one per ``aldaas run``.
    """
    async with wired() as w:
        await _warm(w, 2)
        grant = await w.broker.open_session({}, _no_progress)
        w.broker.attached(grant.session_id)
        await w.broker.control(grant.session_id, "release", {})
        assert w.gateway.closed == []  # the answer must reach the client first
        w.broker.detached(grant.session_id)
        assert w.gateway.closed == [(grant.session_id, "the lease was released.")]
        w.broker.session_ended(grant.session_id, "the lease was released.")
        w.broker.detached(grant.session_id)
        assert len(w.gateway.closed) == 1


async def test_if_an_admin_kills_a_lease_then_its_client_is_told_why(
    autojump_clock: MockClock,
) -> None:
    """If an admin kills a lease, then its session closes saying so; an unknown id gives False."""
    async with wired() as w:
        await _warm(w, 2)
        grant = await w.broker.open_session({}, _no_progress)
        assert await w.broker.kill_lease(grant.session_id) is True
        assert await w.broker.kill_lease(grant.session_id) is False
        assert w.gateway.closed == [(grant.session_id, "the lease was killed by an administrator.")]


async def test_if_status_is_asked_then_it_lists_leases_without_secrets(
    autojump_clock: MockClock,
) -> None:
    """If status is asked on a session, then it shows the pool and leases, marks 'you', no secret."""
    async with wired() as w:
        await _warm(w, 2)
        grant = await w.broker.open_session({"name": "dev"}, _no_progress)
        status = await w.broker.control(grant.session_id, "status", {})
        assert isinstance(status, dict)
        assert status["you"] == grant.session_id
        assert status["ready"] is True
        assert [lease["id"] for lease in status["leases"]] == [grant.session_id]  # type: ignore[index,union-attr]
        assert grant.secret not in repr(status)
        anonymous = await w.broker.control(None, "status", {})
        assert "you" not in anonymous  # type: ignore[operator]
        snapshots = await w.broker.control(None, "snapshots", {})
        assert [s["status"] for s in snapshots] == ["ready"]  # type: ignore[index,union-attr]
        with pytest.raises(tunnel.ControlError, match="Unknown request 'dance'"):
            await w.broker.control(None, "dance", {})


async def test_if_the_broker_drains_then_readyz_fails_and_sessions_are_refused(
    autojump_clock: MockClock,
) -> None:
    """If the broker drains, then it is not ready and new sessions are refused."""
    async with wired() as w:
        await _warm(w, 2)
        assert w.broker.is_ready() == (True, "")
        await w.broker.drain()
        ready, reason = w.broker.is_ready()
        assert (ready, reason) == (False, "The broker is draining and hands out no new databases.")
        with pytest.raises(tunnel.SessionRefused, match="draining"):
            await w.broker.open_session({}, _no_progress)


async def test_if_metrics_are_scraped_then_pool_and_gateway_levels_show(
    autojump_clock: MockClock,
) -> None:
    """If a lease ends while another runs, then /metrics shows one lease, one session, all bytes."""
    async with wired() as w:
        await _warm(w, 2)
        ended = await w.gateway.open(w.broker)
        kept = await w.gateway.open(w.broker)
        w.gateway.relay(w.broker, ended.session_id, 10, 300)
        w.gateway.relay(w.broker, kept.session_id, 20, 400)
        await w.h.pool.kill(ended.session_id)  # the broker must close its gateway session
        await _warm(w, 2)
        assert _sample(w, "aldaas_clones", {"state": "leased"}) == 1
        assert _sample(w, "aldaas_leases_active") == 1
        assert _sample(w, "aldaas_snapshots", {"status": "ready"}) == 1
        assert _sample(w, "aldaas_gateway_sessions") == 1
        assert _sample(w, "aldaas_gateway_bytes_total", {"direction": "up"}) == 30
        assert _sample(w, "aldaas_gateway_bytes_total", {"direction": "down"}) == 700
        provisioned = [e for e in w.h.events if isinstance(e, CloneProvisioned)]
        assert len(provisioned) == 4  # two warm, one each to replace the two handed out
        assert _sample(w, "aldaas_provision_seconds_count") == len(provisioned)


async def test_if_a_legacy_websocket_names_a_lease_then_it_routes_to_its_clone(
    autojump_clock: MockClock,
) -> None:
    """If the legacy endpoint names an active lease, then it routes there; else one sentence."""
    async with wired() as w:
        await _warm(w, 2)
        grant = await w.broker.open_session({}, _no_progress)
        route = await w.broker.resolve_legacy("aldaas-chart", grant.session_id)
        endpoint = w.h.pool.lease(grant.session_id).endpoint
        assert (route.session_id, route.host, route.port) == (
            grant.session_id,
            endpoint.host,
            endpoint.port,
        )
        with pytest.raises(tunnel.SessionRefused, match="There is no active lease 'nope'"):
            await w.broker.resolve_legacy("aldaas-chart", "nope")


@attrs.define
class FakeElector:
    is_leader: bool = False

    async def serve(self, while_leader: object = None, *, task_status: object = None) -> None:
        raise AssertionError("not used by these tests")


async def test_if_this_replica_is_not_the_leader_then_it_still_hands_out(
    autojump_clock: MockClock,
) -> None:
    """If another replica leads, then this one is still ready and serves; status says who leads."""
    async with wired() as w:
        await _warm(w, 2)
        elector = FakeElector(is_leader=False)
        w.broker.elector = elector
        assert w.broker.is_ready() == (True, "")
        grant = await w.broker.open_session({}, _no_progress)
        assert w.h.pool.lease(grant.session_id).id == grant.session_id
        assert w.broker.status()["leader"] is False
        elector.is_leader = True
        assert w.broker.status()["leader"] is True


def test_if_kubernetes_is_chosen_with_a_directory_source_then_startup_says_to_use_s3() -> None:
    """If provider is kubernetes but the source a folder, then make_pool refuses in one sentence."""
    with pytest.raises(StartupError, match=r"set source\.kind: s3"):
        make_pool(Settings(provider="kubernetes"))


def test_if_kubernetes_is_chosen_with_s3_then_the_pool_runs_on_the_kubernetes_provider(
    tmp_path: pathlib.Path,
) -> None:
    """If provider is kubernetes and the source S3, then the pool is built on KubernetesProvider."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u, namespace: ns}}]\n"
    )
    settings = Settings(
        provider="kubernetes",
        kubernetes=KubernetesSettings(kubeconfig=str(kubeconfig)),
        source=SourceSettings(kind="s3"),
        s3=S3Settings(bucket="backups"),
    )
    _, provider = make_pool(settings)
    assert type(provider).__name__ == "KubernetesProvider"


async def test_if_a_restarted_client_takes_over_then_the_stale_session_is_closed(
    autojump_clock: MockClock,
) -> None:
    """If takeover comes with the lease's secret, then its gateway session closes; lease stays."""
    async with wired() as w:
        await _warm(w, 2)
        grant = await w.broker.open_session({}, _no_progress)
        args: tunnel.JSONObject = {"lease": grant.session_id, "secret": grant.secret}
        assert await w.broker.control(None, "takeover", args) == {"taken_over": True}
        assert w.gateway.closed == [
            (grant.session_id, "another aldaas connect took over this lease.")
        ]
        assert w.h.pool.lease(grant.session_id).id == grant.session_id
        with pytest.raises(tunnel.ControlError, match="secret does not match"):
            await w.broker.control(None, "takeover", {"lease": grant.session_id, "secret": "x"})
