"""An honest in-memory Provider and Source for the pool logic's tests (fakes, not mocks).

:class:`FakeWorld` is the state that outlives a broker: resources with their
meta and version, running "databases", the backups in the source. A crash is
simulated by cancelling one :class:`pool.Pool` and building a new one over a
new :class:`FakeProvider` on the same world. Time passes only through
``trio.sleep`` so that ``autojump_clock`` drives every delay.

Backup contents steer the fake: ``FAIL`` anywhere makes the restore exit
non-zero, ``NOTABLES`` makes the check fail; everything else restores fine.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager

import attrs
import trio

from aldaas.pool import (
    Backup,
    Command,
    ConflictError,
    Endpoint,
    Kind,
    NotFoundError,
    Pool,
    PoolErrorEvent,
    PoolSettings,
    ProgressCallback,
    ProviderError,
    Resource,
    RestoreProgress,
    Source,
)

_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,54}[a-z0-9])?")
"""Names every real provider takes: a DNS label that still fits after the Kubernetes provider's
``<instance>-`` prefix (the local provider also takes upper case, '.' and '_')."""

EPOCH = 1_800_000_000.0
"""Wall clock at trio time 0 in these tests (wall time follows the mock clock)."""


def wall_clock() -> float:
    return EPOCH + trio.current_time()


@attrs.define
class FakeResource:
    kind: Kind
    name: str
    meta: dict[str, str]
    version: int = 1
    content: bytes = b""
    endpoint: Endpoint | None = None
    running: bool = False
    record_only: bool = False


@attrs.define
class FakeWorld:
    """Everything that survives a broker crash."""

    resources: dict[tuple[Kind, str], FakeResource] = attrs.Factory(dict)
    ports: Iterator[int] = attrs.Factory(lambda: itertools.count(20000))
    restore_calls: list[str] = attrs.Factory(list)
    """Backup keys restored, in order."""
    clone_calls: int = 0
    clone_seconds: float = 1.0
    restore_seconds_per_chunk: float = 0.5
    check_seconds: float = 0.5
    fail_clones: int = 0
    """Make the next N clone() calls of pool clones (not verify clones) fail."""
    restore_gate: trio.Event | None = None
    """When set, restores wait for this event (to crash the pool mid-restore)."""
    check_gate: trio.Event | None = None
    """When set, checks wait for this event (to crash the pool mid-verification)."""
    set_meta_calls: int = 0
    conflicts: int = 0
    """Compare-and-set writes refused because their ``expect_version`` was stale."""
    destroyed_leased: list[str] = attrs.Factory(list)
    """Clones destroyed while their meta still said ``leased`` (a lease's database vanished)."""

    def of(self, kind: Kind) -> list[FakeResource]:
        return [
            r for (k, _), r in sorted(self.resources.items(), key=lambda i: i[0][1]) if k is kind
        ]

    def get(self, kind: Kind, name: str) -> FakeResource | None:
        return self.resources.get((kind, name))

    def add_orphan(self, kind: Kind, name: str, meta: Mapping[str, str] | None = None) -> None:
        self.resources[(kind, name)] = FakeResource(
            kind=kind, name=name, meta=dict(meta or {}), running=kind is not Kind.SNAPSHOT
        )

    def kill(self, name: str) -> None:
        """The database of clone ``name`` dies (a crash of that one postgres)."""
        r = self.resources[(Kind.CLONE, name)]
        r.running = False


class FakeProvider:
    """Implements :class:`pool.Provider` over a :class:`FakeWorld`."""

    def __init__(self, world: FakeWorld) -> None:
        self.world = world

    @property
    def name(self) -> str:
        return "fake"

    @staticmethod
    def _check_name(kind: Kind, name: str) -> None:
        if not _NAME.fullmatch(name):
            raise ProviderError(
                f"{kind.value} name {name!r} is not allowed; use lower-case letters, digits "
                "and '-', at most 56 characters"
            )

    def _endpoint(self, database: str = "app") -> Endpoint:
        return Endpoint(
            host="127.0.0.1",
            port=next(self.world.ports),
            user="aldaas",
            database=database,
            password="pw",
        )

    def _resource(self, r: FakeResource) -> Resource:
        return Resource(
            kind=r.kind,
            name=r.name,
            meta=dict(r.meta),
            version=str(r.version),
            endpoint=r.endpoint if r.running else None,
            size_bytes=len(r.content),
        )

    async def create_volume(self, name: str, meta: Mapping[str, str]) -> Endpoint:
        await trio.lowlevel.checkpoint()
        self._check_name(Kind.VOLUME, name)
        key = (Kind.VOLUME, name)
        if key not in self.world.resources:
            self.world.resources[key] = FakeResource(
                kind=Kind.VOLUME,
                name=name,
                meta=dict(meta),
                endpoint=self._endpoint(),
                running=True,
            )
        endpoint = self.world.resources[key].endpoint
        assert endpoint is not None
        return endpoint

    async def restore(
        self,
        name: str,
        backup: Backup,
        source: Source,
        command: Command,
        progress: ProgressCallback,
    ) -> None:
        volume = self.world.get(Kind.VOLUME, name)
        if volume is None:
            raise NotFoundError(f"volume {name!r} does not exist")
        if not command.argv:  # as the Kubernetes provider: it can only run a command
            raise ProviderError(
                f"backup {backup.key!r} has no known suffix (.sql, .sql.gz, .dump, .pgdump); "
                "rename it or set restore.argv."
            )
        self.world.restore_calls.append(backup.key)
        started = trio.current_time()
        done = 0
        chunks = []
        async with aclosing(source.open(backup)) as stream:
            async for chunk in stream:
                await trio.sleep(self.world.restore_seconds_per_chunk)
                chunks.append(chunk)
                done += len(chunk)
                progress(
                    RestoreProgress(
                        done_bytes=done,
                        total_bytes=backup.size,
                        elapsed_seconds=trio.current_time() - started,
                    )
                )
        if self.world.restore_gate is not None:
            await self.world.restore_gate.wait()
        content = b"".join(chunks)
        if b"FAIL" in content:
            raise ProviderError(f"restore of {backup.key!r} exited with status 3: ERROR: syntax")
        volume.content = content

    async def seal(self, volume: str, snapshot: str, meta: Mapping[str, str]) -> Resource:
        await trio.lowlevel.checkpoint()
        self._check_name(Kind.SNAPSHOT, snapshot)
        vol = self.world.resources.pop((Kind.VOLUME, volume), None)
        if vol is None:
            sealed = self.world.get(Kind.SNAPSHOT, snapshot)
            if sealed is not None and not sealed.record_only:
                return self._resource(sealed)  # sealed before (a retried step): the same snapshot
            raise NotFoundError(f"volume {volume!r} does not exist")
        snap = FakeResource(kind=Kind.SNAPSHOT, name=snapshot, meta=dict(meta), content=vol.content)
        self.world.resources[(Kind.SNAPSHOT, snapshot)] = snap
        return self._resource(snap)

    async def record_failed_snapshot(self, name: str, meta: Mapping[str, str]) -> Resource:
        await trio.lowlevel.checkpoint()
        self._check_name(Kind.SNAPSHOT, name)
        key = (Kind.SNAPSHOT, name)
        existing = self.world.resources.get(key)
        if existing is not None and not existing.record_only:
            raise ConflictError(f"snapshot {name!r} exists with data; destroy it first")
        record = FakeResource(kind=Kind.SNAPSHOT, name=name, meta=dict(meta), record_only=True)
        self.world.resources[key] = record
        return self._resource(record)

    async def clone(self, snapshot: str, name: str, meta: Mapping[str, str]) -> Endpoint:
        self.world.clone_calls += 1
        self._check_name(Kind.CLONE, name)
        made = self.world.get(Kind.CLONE, name)
        if made is not None and made.running:
            assert made.endpoint is not None
            return made.endpoint  # made before (a retried step): the same clone, not a second one
        snap = self.world.get(Kind.SNAPSHOT, snapshot)
        if snap is None or snap.record_only:
            raise NotFoundError(f"snapshot {snapshot!r} has no data to clone")
        # The clone exists (half-made) while it starts: a crash now leaves it behind.
        clone = FakeResource(
            kind=Kind.CLONE,
            name=name,
            meta=dict(meta),
            content=snap.content,
            endpoint=self._endpoint(),
        )
        self.world.resources[(Kind.CLONE, name)] = clone
        await trio.sleep(self.world.clone_seconds)
        if self.world.fail_clones > 0 and name.startswith("clone-"):
            self.world.fail_clones -= 1
            raise ProviderError(f"clone {name!r} did not start: FATAL: could not map memory")
        clone.running = True
        assert clone.endpoint is not None
        return clone.endpoint

    async def check(self, name: str, command: Command) -> None:
        clone = self.world.get(Kind.CLONE, name)
        if clone is None or not clone.running:
            raise ProviderError(f"clone {name!r} is not running")
        assert command.argv, "a check command has argv"
        await trio.sleep(self.world.check_seconds)
        if self.world.check_gate is not None:
            await self.world.check_gate.wait()
        if b"NOTABLES" in clone.content:
            raise ProviderError("check command exited with status 1: no user tables")

    async def is_healthy(self, name: str) -> bool:
        await trio.lowlevel.checkpoint()
        clone = self.world.get(Kind.CLONE, name)
        return clone is not None and clone.running

    def alive(self, name: str) -> bool:
        """:class:`pool.Liveness`: the same truth as ``is_healthy``, known without waiting."""
        clone = self.world.get(Kind.CLONE, name)
        return clone is not None and clone.running

    async def set_meta(
        self, kind: Kind, name: str, meta: Mapping[str, str], *, expect_version: str | None = None
    ) -> Resource:
        await trio.lowlevel.checkpoint()
        self.world.set_meta_calls += 1
        r = self.world.get(kind, name)
        if r is None:
            raise NotFoundError(f"{kind.value} {name!r} does not exist")
        if expect_version is not None and expect_version != str(r.version):
            self.world.conflicts += 1
            raise ConflictError(
                f"{kind.value} {name!r} is at version {r.version}, not {expect_version}"
            )
        r.meta = dict(meta)
        r.version += 1
        return self._resource(r)

    async def destroy(self, kind: Kind, name: str) -> None:
        await trio.lowlevel.checkpoint()
        r = self.world.resources.pop((kind, name), None)
        if r is not None and kind is Kind.CLONE and r.meta.get("status") == "leased":
            self.world.destroyed_leased.append(name)

    async def list(self, kind: Kind | None = None) -> Sequence[Resource]:
        await trio.lowlevel.checkpoint()
        return [
            self._resource(r)
            for (k, _), r in sorted(self.world.resources.items(), key=lambda i: i[0][1])
            if kind is None or k is kind
        ]

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class RestartableFakeProvider(FakeProvider):
    """:class:`pool.Restartable` over a :class:`FakeWorld`: a clone's data outlives its database,
    as a PVC outlives its pod; a restart starts it again at a new address."""

    def __init__(self, world: FakeWorld) -> None:
        super().__init__(world)
        self.restart_gate: trio.Event | None = None
        """When set, restarts wait for this event (to look at a lease while it is restarted)."""
        self.protected: list[str] = []

    async def restart(self, name: str) -> Endpoint:
        if self.restart_gate is not None:
            await self.restart_gate.wait()
        await trio.lowlevel.checkpoint()
        clone = self.world.get(Kind.CLONE, name)
        if clone is None:
            raise NotFoundError(f"clone {name!r} does not exist")
        if not clone.running:
            clone.running, clone.endpoint = True, self._endpoint()
        assert clone.endpoint is not None
        return clone.endpoint

    async def protect(self, name: str) -> None:
        await trio.lowlevel.checkpoint()
        self.protected.append(name)


class FakeSource:
    """Implements :class:`pool.Source`: backups are bytes in memory, streamed in small chunks."""

    def __init__(self) -> None:
        self.backups: dict[str, tuple[bytes, float]] = {}
        self.list_calls = 0

    def put(self, key: str, content: bytes, *, modified: float) -> None:
        self.backups[key] = (content, modified)

    @property
    def description(self) -> str:
        return "memory://fake"

    async def list_backups(self) -> Sequence[Backup]:
        await trio.lowlevel.checkpoint()
        self.list_calls += 1
        return [
            Backup(
                key=key,
                etag=hashlib.sha256(content).hexdigest()[:16],
                size=len(content),
                modified=modified,
            )
            for key, (content, modified) in self.backups.items()
        ]

    async def open(self, backup: Backup) -> AsyncIterator[bytes]:
        content, _ = self.backups[backup.key]
        for start in range(0, len(content), 1000):
            await trio.lowlevel.checkpoint()
            yield content[start : start + 1000]


def settings(**sections: object) -> PoolSettings:
    """PoolSettings with the given sections replaced, e.g. ``settings(pool=WarmPoolSettings(size=1))``."""
    return attrs.evolve(PoolSettings(), **sections)  # type: ignore[arg-type]


@attrs.define
class Harness:
    world: FakeWorld
    source: FakeSource
    pool: Pool
    events: list[object]


@asynccontextmanager
async def running_pool(
    world: FakeWorld,
    source: FakeSource,
    pool_settings: PoolSettings,
    provider: FakeProvider | None = None,
) -> AsyncIterator[Harness]:
    """Run a Pool over the world until the block ends (then cancel it, as a crash would)."""
    events: list[object] = []
    pool = Pool(
        pool_settings,
        provider or FakeProvider(world),
        source,
        wall_clock=wall_clock,
        observers=[events.append],
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        yield Harness(world=world, source=source, pool=pool, events=events)
        nursery.cancel_scope.cancel()
    crashes = [
        e for e in events if isinstance(e, PoolErrorEvent) and e.message.startswith("unexpected")
    ]
    assert crashes == [], "a background step of the pool crashed (see the log)"


async def wait_for(condition: Callable[[], bool], *, what: str, limit: float = 3600.0) -> None:
    """Sleep in small steps of (mock) time until ``condition()`` holds; fail after ``limit`` s."""
    deadline = trio.current_time() + limit
    while not condition():
        if trio.current_time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await trio.sleep(0.1)


@attrs.define(eq=False)
class Replica:
    """One broker replica: a Pool serving over a shared world, leading while told to."""

    pool: Pool
    events: list[object]
    nursery: trio.Nursery
    lead_scope: trio.CancelScope | None = None

    async def lead(self) -> None:
        """Become leader (as LeaderElector.serve(pool.lead) would); returns once taken over."""

        async def leading(*, task_status: trio.TaskStatus[None]) -> None:
            with trio.CancelScope() as scope:
                self.lead_scope = scope
                await self.pool.lead(task_status=task_status)

        await self.nursery.start(leading)

    async def step_down(self) -> None:
        """Lose leadership: the pool's background work is cancelled, serving goes on."""
        assert self.lead_scope is not None
        self.lead_scope.cancel()
        await wait_for(lambda: not self.pool.leading, what="the leader to step down")


@asynccontextmanager
async def replica(
    world: FakeWorld, source: FakeSource, pool_settings: PoolSettings
) -> AsyncIterator[Replica]:
    """Serve a Pool (follower) over the world until the block ends, as one of several replicas."""
    events: list[object] = []
    pool = Pool(
        pool_settings,
        FakeProvider(world),
        source,
        wall_clock=wall_clock,
        observers=[events.append],
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.serve)
        yield Replica(pool=pool, events=events, nursery=nursery)
        nursery.cancel_scope.cancel()
    crashes = [
        e for e in events if isinstance(e, PoolErrorEvent) and e.message.startswith("unexpected")
    ]
    assert crashes == [], "a background step of the pool crashed (see the log)"
