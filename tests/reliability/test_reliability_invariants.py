"""A Hypothesis state machine drives the pool through any order of operations; invariants hold.

The pool runs in a trio loop on a helper thread with a :class:`MockClock` that
stands still between rules (autojump off), so Hypothesis's own work never
lets time pass. A rule calls into the loop through ``trio.from_thread.run``;
while its operation runs, autojump is on, so waits in the queue, clone starts
and restores take mock seconds. After every rule the loop is left to settle
(``wait_all_tasks_blocked``) and the invariants are checked against both the
pool's public view and the fake provider's world (what survives a crash).

A crash is the pool's cancellation followed by a new :class:`pool.Pool` over
the same world, exactly as tests/pool does it.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import attrs
import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)
from pool_fakes import (
    EPOCH,
    FakeProvider,
    FakeSource,
    FakeWorld,
    running_pool,
    wait_for,
    wall_clock,
)
from pool_fakes import settings as pool_settings
from trio.testing import MockClock

from aldaas.pool import (
    CloneFailed,
    CloneProvisioned,
    Endpoint,
    Kind,
    LeaseNotFoundError,
    LeaseSettings,
    NoSnapshotReadyError,
    Pool,
    PoolErrorEvent,
    QueueTimeoutError,
    Resource,
    SnapshotSettings,
    SourceSettings,
    WarmPoolSettings,
)

T = TypeVar("T")

SIZE = 2
MAX_PROVISIONING = 2
MAX_LIFETIME = 2000.0
SETTINGS = pool_settings(
    pool=WarmPoolSettings(size=SIZE, max_provisioning=MAX_PROVISIONING, health_check_interval=10.0),
    lease=LeaseSettings(ttl=50.0, max_ttl=1000.0, max_lifetime=MAX_LIFETIME, queue_timeout=20.0),
    snapshots=SnapshotSettings(keep=1, failed_grace=300.0),
    source=SourceSettings(poll_interval=60.0),
)

# Meta ``status`` writes a clone may see, derived from CLONE_TRANSITIONS (``broken`` is never
# written: a broken clone goes straight to destroy). A leased clone is rewritten while leased
# (extend, attach), but never with another lease id.
CLONE_WRITES = {
    (None, "provisioning"),
    ("provisioning", "warm"),
    ("provisioning", "destroying"),
    ("warm", "leased"),
    ("warm", "destroying"),
    ("leased", "leased"),
    ("leased", "destroying"),
    ("destroying", "destroying"),
}
SNAPSHOT_WRITES = {
    (None, "restoring"),  # create_volume
    ("restoring", "verifying"),  # seal
    ("verifying", "ready"),
    ("restoring", "failed"),  # record_failed_snapshot after the volume was destroyed
    ("verifying", "failed"),
}


class RecordingProvider(FakeProvider):
    """The fake provider, checking every meta write against the life-cycle tables."""

    def __init__(self, world: FakeWorld, history: dict[str, list[str]], errors: list[str]) -> None:
        super().__init__(world)
        self.history = history
        self.errors = errors

    def _record(self, kind: Kind, name: str, meta: Mapping[str, str]) -> None:
        status = meta.get("status", "")
        key = f"{kind.value if kind is Kind.CLONE else 'snapshot'}:{name}"
        seen = self.history.setdefault(key, [])
        previous = seen[-1] if seen else None
        allowed = CLONE_WRITES if kind is Kind.CLONE else SNAPSHOT_WRITES
        if (previous, status) not in allowed and not (kind is Kind.CLONE and meta.get("role")):
            self.errors.append(f"{key}: illegal meta write {previous!r} -> {status!r}")
        if kind is Kind.CLONE and status == "leased":
            current = self.world.get(Kind.CLONE, name)
            old = current.meta.get("lease_id") if current is not None else None
            if old is not None and old != meta.get("lease_id"):
                self.errors.append(f"{key}: handed to lease {meta.get('lease_id')} after {old}")
        if previous == "gone":
            self.errors.append(f"{key}: written after it was destroyed")
        seen.append(status)

    async def create_volume(self, name: str, meta: Mapping[str, str]) -> Endpoint:
        self._record(Kind.VOLUME, name, meta)
        return await super().create_volume(name, meta)

    async def seal(self, volume: str, snapshot: str, meta: Mapping[str, str]) -> Resource:
        self._record(Kind.SNAPSHOT, snapshot, meta)
        return await super().seal(volume, snapshot, meta)

    async def record_failed_snapshot(self, name: str, meta: Mapping[str, str]) -> Resource:
        self._record(Kind.SNAPSHOT, name, meta)
        return await super().record_failed_snapshot(name, meta)

    async def clone(self, snapshot: str, name: str, meta: Mapping[str, str]) -> Endpoint:
        self._record(Kind.CLONE, name, meta)
        return await super().clone(snapshot, name, meta)

    async def set_meta(
        self, kind: Kind, name: str, meta: Mapping[str, str], *, expect_version: str | None = None
    ) -> Resource:
        resource = await super().set_meta(kind, name, meta, expect_version=expect_version)
        self._record(kind, name, meta)  # only writes that landed
        return resource

    async def destroy(self, kind: Kind, name: str) -> None:
        await super().destroy(kind, name)
        if kind is Kind.CLONE:
            self.history.setdefault(f"clone:{name}", []).append("gone")


@attrs.define
class HeldLease:
    """What the lease's holder knows, and the earliest moment the pool may end the lease."""

    id: str
    secret: str
    clone: str
    ttl: float
    lifetime_deadline: float
    idle_deadline: float
    attached: int = 0
    dead_since_restart: int | None = None
    """Restart count when its database was killed (a restart then ends it as ``lost``)."""

    def earliest_end(self) -> float:
        if self.attached:
            return self.lifetime_deadline
        return min(self.lifetime_deadline, self.idle_deadline)


class PoolMachine(RuleBasedStateMachine):
    """Acquire, release, extend, reset, attach/detach, time, backups, kills and crashes in any order."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = MockClock()
        self.world = FakeWorld()
        self.source = FakeSource()
        self.source.put("b000.sql", b"CREATE TABLE a();", modified=1.0)
        self.backups = 1
        self.history: dict[str, list[str]] = {}
        self.errors: list[str] = []
        self.events: list[object] = []
        self.handed: list[str] = []
        self.held: dict[str, HeldLease] = {}
        self.restarts = 0
        self.dead_warm: set[str] = set()
        """Warm clones whose database was killed: none of them may be handed out."""
        self.pool: Pool | None = None
        self.pool_scope: trio.CancelScope | None = None
        tokens: queue.Queue[Any] = queue.Queue()
        self.thread = threading.Thread(target=self._thread, args=(tokens,), daemon=True)
        self.thread.start()
        self.token, self.nursery = tokens.get(timeout=10)
        self.call(self._start_pool)
        self.call(self._wait_warm)

    # -- plumbing --------------------------------------------------------------------------

    def _thread(self, tokens: queue.Queue[Any]) -> None:
        async def main() -> None:
            async with trio.open_nursery() as nursery:
                tokens.put((trio.lowlevel.current_trio_token(), nursery))
                await trio.sleep_forever()

        try:
            trio.run(main, clock=self.clock)
        except BaseException as exc:  # reported through the next call's timeout
            self.errors.append(f"trio loop crashed: {exc!r}")

    def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` in the loop with time flowing, then let the loop settle with time stopped."""

        async def drive() -> T:
            self.clock.autojump_threshold = 0
            try:
                with trio.fail_after(3 * MAX_LIFETIME):
                    return await fn()
            finally:
                self.clock.autojump_threshold = math.inf
                await trio.testing.wait_all_tasks_blocked()

        return trio.from_thread.run(drive, trio_token=self.token)

    def sync(self, fn: Callable[[], T]) -> T:
        """Run a synchronous ``fn`` in the loop's thread (the pool reads trio's clock)."""
        return trio.from_thread.run_sync(fn, trio_token=self.token)

    def teardown(self) -> None:
        def stop() -> None:
            self.nursery.cancel_scope.cancel()

        trio.from_thread.run_sync(stop, trio_token=self.token)
        self.thread.join(timeout=10)

    async def _start_pool(self) -> None:
        pool = Pool(
            SETTINGS,
            RecordingProvider(self.world, self.history, self.errors),
            self.source,
            wall_clock=wall_clock,
            observers=[self.events.append],
        )
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                await pool.run(task_status=task_status)

        await self.nursery.start(run)
        self.pool, self.pool_scope = pool, scope

    async def _wait_warm(self) -> None:
        await wait_for(lambda: self.running_pool().statistics().clones["warm"] >= SIZE, what="warm")

    def running_pool(self) -> Pool:
        assert self.pool is not None
        return self.pool

    def now(self) -> float:
        return self.clock.current_time()

    def legitimately_gone(self, held: HeldLease) -> bool:
        if held.dead_since_restart is not None and self.restarts > held.dead_since_restart:
            return True
        return self.now() >= held.earliest_end()

    def gone(self, lease_id: str) -> None:
        held = self.held.pop(lease_id)
        assert self.legitimately_gone(held), (
            f"lease {lease_id} vanished at t={self.now()} before {held.earliest_end()}"
        )

    # -- rules -----------------------------------------------------------------------------

    @rule(ttl=st.sampled_from([5.0, 50.0, 400.0]))
    def acquire(self, ttl: float) -> None:
        start = self.now()

        async def go() -> Any:
            try:
                return await self.running_pool().acquire(ttl=ttl, labels={"who": "hypothesis"})
            except (QueueTimeoutError, NoSnapshotReadyError):
                return None

        lease = self.call(go)
        if lease is None:
            return
        assert lease.clone not in self.handed, f"clone {lease.clone} handed out twice"
        assert lease.clone not in self.dead_warm, f"dead clone {lease.clone} handed out"
        self.handed.append(lease.clone)
        self.held[lease.id] = HeldLease(
            id=lease.id,
            secret=lease.secret,
            clone=lease.clone,
            ttl=ttl,
            lifetime_deadline=start + MAX_LIFETIME,
            idle_deadline=start + ttl,
        )

    def _pick(self, data: st.DataObject) -> HeldLease | None:
        # Ids are random and trio's scheduler shuffles: draw the same way whatever the state
        # is (a position modulo the count), so that Hypothesis's replays stay consistent.
        ids = list(self.held)
        index = data.draw(st.integers(0, 7))
        return self.held[ids[index % len(ids)]] if ids else None

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        held = self._pick(data)
        if held is None:
            return

        async def go() -> bool:
            try:
                await self.running_pool().release(held.id)
            except LeaseNotFoundError:
                return False
            return True

        if not self.call(go):
            self.gone(held.id)
            return
        del self.held[held.id]
        clone = self.world.get(Kind.CLONE, held.clone)
        assert clone is None or clone.meta["status"] == "destroying"

    @rule(data=st.data(), ttl=st.sampled_from([None, 10.0, 300.0]))
    def extend(self, data: st.DataObject, ttl: float | None) -> None:
        held = self._pick(data)
        if held is None:
            return
        start = self.now()

        async def go() -> bool:
            try:
                await self.running_pool().extend(held.id, ttl=ttl)
            except LeaseNotFoundError:
                return False
            return True

        if not self.call(go):
            self.gone(held.id)
            return
        held.ttl = ttl if ttl is not None else held.ttl
        held.idle_deadline = start + held.ttl

    @rule(data=st.data())
    def reset(self, data: st.DataObject) -> None:
        held = self._pick(data)
        if held is None:
            return
        start = self.now()

        async def go() -> Any:
            try:
                return await self.running_pool().reset(held.id)
            except QueueTimeoutError:
                return None
            except LeaseNotFoundError:
                return False

        lease = self.call(go)
        if lease is False:
            self.gone(held.id)
            return
        if lease is None:
            return
        assert lease.id == held.id
        assert lease.clone not in self.handed, f"clone {lease.clone} handed out twice"
        assert lease.clone not in self.dead_warm, f"dead clone {lease.clone} handed out"
        self.handed.append(lease.clone)
        held.clone = lease.clone
        held.dead_since_restart = None
        held.idle_deadline = start + held.ttl

    @rule(data=st.data())
    def attach(self, data: st.DataObject) -> None:
        held = self._pick(data)
        if held is None:
            return

        async def go() -> bool:
            try:
                self.running_pool().attached(held.id)
            except LeaseNotFoundError:
                return False
            await trio.lowlevel.checkpoint()
            return True

        if not self.call(go):
            self.gone(held.id)
            return
        held.attached += 1

    @rule(data=st.data())
    def detach(self, data: st.DataObject) -> None:
        attached = [i for i, h in self.held.items() if h.attached]
        index = data.draw(st.integers(0, 7))
        if not attached:
            return
        held = self.held[attached[index % len(attached)]]

        async def go() -> None:
            self.running_pool().detached(held.id)
            await trio.lowlevel.checkpoint()

        self.call(go)
        held.attached -= 1
        if held.attached == 0:
            held.idle_deadline = self.now() + held.ttl

    @rule(seconds=st.sampled_from([0.5, 3.0, 30.0, 120.0, 700.0]))
    def time_passes(self, seconds: float) -> None:
        async def go() -> None:
            await trio.sleep(seconds)

        self.call(go)

    @rule(content=st.sampled_from([b"CREATE TABLE b();", b"FAIL", b"NOTABLES", b"x" * 5000]))
    def new_backup(self, content: bytes) -> None:
        """A new backup arrives (good, failing restore, failing check, or a slow one)."""
        self.source.put(f"b{self.backups:03}.sql", content, modified=1.0 + self.backups)
        self.backups += 1

        async def go() -> None:
            self.running_pool().trigger_refresh()
            await trio.lowlevel.checkpoint()

        self.call(go)

    @rule(data=st.data())
    def leased_database_dies(self, data: st.DataObject) -> None:
        held = self._pick(data)
        if held is None:
            return
        if self.world.get(Kind.CLONE, held.clone) is not None:
            self.world.kill(held.clone)
            held.dead_since_restart = self.restarts

    @rule(data=st.data())
    def warm_database_dies(self, data: st.DataObject) -> None:
        warm = [r.name for r in self.world.of(Kind.CLONE) if r.meta.get("status") == "warm"]
        created = {key: i for i, key in enumerate(self.history)}  # names are random: creation order
        warm.sort(key=lambda name: created.get(f"clone:{name}", -1))
        index = data.draw(st.integers(0, 7))
        if warm:
            victim = warm[index % len(warm)]
            self.world.kill(victim)
            self.dead_warm.add(victim)

    @rule()
    def crash_and_restart(self) -> None:
        scope = self.pool_scope
        assert scope is not None
        self.restarts += 1

        async def go() -> None:
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            await self._start_pool()

        restart = self.now()
        self.call(go)
        for held in self.held.values():
            if held.attached:  # clients were cut off by the crash: a full idle TTL from now
                held.attached = 0
                held.idle_deadline = restart + held.ttl

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def life_cycles_are_legal_and_nothing_crashed(self) -> None:
        assert self.errors == []
        crashes = [
            e.message
            for e in self.events
            if isinstance(e, PoolErrorEvent) and e.message.startswith("unexpected")
        ]
        assert crashes == []

    @invariant()
    def live_leases_are_kept_and_on_distinct_clones(self) -> None:
        pool = self.running_pool()
        active = {lease.id: lease for lease in self.sync(pool.leases)}
        assert len({lease.clone for lease in active.values()}) == len(active)
        assert set(active) <= set(self.held), "the pool holds a lease nobody was given"
        for lease_id in [i for i in self.held if i not in active]:
            self.gone(lease_id)
        for lease_id, held in self.held.items():
            assert active[lease_id].clone == held.clone
        leased = {
            r.name: r.meta.get("lease_id")
            for r in self.world.of(Kind.CLONE)
            if r.meta.get("status") == "leased"
        }
        assert leased == {lease.clone: lease.id for lease in active.values()}

    @invariant()
    def secrets_stay_with_their_lease(self) -> None:
        if not self.held:
            return
        pool = self.running_pool()
        holders = sorted(self.held.values(), key=lambda h: h.id)

        def check() -> list[tuple[bool, bool]]:
            return [
                (
                    pool.verify_secret(h.id, h.secret),
                    pool.verify_secret(h.id, holders[(i + 1) % len(holders)].secret),
                )
                for i, h in enumerate(holders)
            ]

        results = self.sync(check)
        for (own, other), h in zip(results, holders, strict=True):
            assert own, f"lease {h.id} no longer accepts its own secret"
            assert not other or len(holders) == 1

    @invariant()
    def nothing_leaks(self) -> None:
        clones = self.world.of(Kind.CLONE)
        spare = [r for r in clones if r.meta.get("status") != "leased"]
        assert len(spare) <= SIZE + MAX_PROVISIONING + 1, [
            (r.name, r.meta.get("status")) for r in spare
        ]
        assert len(self.world.of(Kind.VOLUME)) <= 1
        leased = [r for r in clones if r.meta.get("status") == "leased"]
        assert len(leased) == len(self.held)
        ready = sorted(
            (r for r in self.world.of(Kind.SNAPSHOT) if r.meta.get("status") == "ready"),
            key=lambda r: float(r.meta["created"]),
            reverse=True,
        )
        pinned = {r.meta.get("snapshot") for r in clones}
        unpinned_old = [r.name for r in ready[1:] if r.name not in pinned]
        assert unpinned_old == [], "an old ready snapshot no clone needs was not pruned"
        failed_at = [
            float(r.meta["failed_at"])
            for r in self.world.of(Kind.SNAPSHOT)
            if r.meta.get("status") == "failed"
        ]
        grace = SETTINGS.snapshots.failed_grace + SETTINGS.pool.health_check_interval
        assert all(EPOCH + self.now() - t <= grace for t in failed_at)


@pytest.mark.slow
def test_if_pool_operations_come_in_any_order_then_the_invariants_hold() -> None:
    """If leases, time, backups, deaths and crashes interleave at random, then no invariant breaks."""
    run_state_machine_as_test(
        PoolMachine,
        settings=settings(
            max_examples=50,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


async def test_if_a_warm_clone_died_since_the_health_check_then_the_next_one_is_handed_out(
    autojump_clock: MockClock,
) -> None:
    """If a warm clone dies between health checks, then acquire skips it and it is replaced."""
    source = FakeSource()
    source.put("a.sql", b"CREATE TABLE a();", modified=1.0)
    s = pool_settings(
        pool=WarmPoolSettings(size=2, max_provisioning=1, health_check_interval=3600.0)
    )
    async with running_pool(FakeWorld(), source, s) as h:
        await wait_for(lambda: h.pool.statistics().clones["warm"] == 2, what="two warm clones")
        # The clone that became warm first is the next one handed out: kill that one.
        dead, living = [e.clone for e in h.events if isinstance(e, CloneProvisioned)]
        h.world.kill(dead)
        lease = await h.pool.acquire()
        assert lease.clone == living  # no health check ran: the hand-out itself saw it
        failed = [e for e in h.events if isinstance(e, CloneFailed) and e.clone == dead]
        assert [e.reason for e in failed] == ["its database was found dead at hand-out"]
        (info,) = h.pool.statistics().leases
        assert info.healthy
        await wait_for(lambda: h.world.get(Kind.CLONE, dead) is None, what="dead one gone")
        await wait_for(lambda: h.pool.statistics().clones["warm"] == 2, what="replaced")


async def test_if_the_only_warm_clone_is_dead_then_acquire_waits_for_its_replacement(
    autojump_clock: MockClock,
) -> None:
    """If the one warm clone died unseen, then acquire queues and gets a fresh, running clone."""
    source = FakeSource()
    source.put("a.sql", b"CREATE TABLE a();", modified=1.0)
    s = pool_settings(
        pool=WarmPoolSettings(size=1, max_provisioning=1, health_check_interval=3600.0)
    )
    async with running_pool(FakeWorld(), source, s) as h:
        await wait_for(lambda: h.pool.statistics().clones["warm"] == 1, what="a warm clone")
        (dead,) = h.world.of(Kind.CLONE)
        h.world.kill(dead.name)
        lease = await h.pool.acquire()
        assert lease.clone != dead.name
        clone = h.world.get(Kind.CLONE, lease.clone)
        assert clone is not None
        assert clone.running


async def test_if_a_reset_waits_in_the_queue_longer_than_the_idle_ttl_then_the_lease_survives(
    autojump_clock: MockClock,
) -> None:
    """If a reset waits 30 s for a clone while the lease's idle TTL is 5 s, then the lease is kept."""
    source = FakeSource()
    source.put("a.sql", b"CREATE TABLE a();", modified=1.0)
    world = FakeWorld()
    s = pool_settings(pool=WarmPoolSettings(size=1, max_provisioning=1))
    async with running_pool(world, source, s) as h:
        await wait_for(lambda: h.pool.statistics().clones["warm"] == 1, what="a warm clone")
        lease = await h.pool.acquire(ttl=5.0)
        world.clone_seconds = 30.0  # the replacement takes longer than the idle TTL
        await wait_for(lambda: h.pool.statistics().clones["provisioning"] == 1, what="making")
        healed = await h.pool.reset(lease.id, timeout=120)
        assert healed.id == lease.id
        assert healed.clone != lease.clone
        assert [x.id for x in h.pool.leases()] == [lease.id]
