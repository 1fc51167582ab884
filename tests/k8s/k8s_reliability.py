"""Shared pieces of the Kubernetes reliability tests (test_reliability_k8s_*.py).

Everything runs against the fake API server (k8s_fake_api.py) with simulated
pods (no PostgreSQL): these tests are about what the provider and the pool do
with the API, not about databases.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import attrs
import trio
from k8s_fake_api import FakeKubernetes
from kubernetes import client

from aldaas.pool import Backup, Kind, Pool, PoolSettings, SourceSettings, WarmPoolSettings
from aldaas.pool.providers.kubernetes._provider import KubernetesProvider

NS = "test"
TOKEN = "k8s-token-7f3a9c-never-logged"  # searched for in logs and errors
OLD = Backup(key="dumps/old.sql.gz", etag="etag-old", size=1000, modified=1.0)
NEW = Backup(key="dumps/new.sql.gz", etag="etag-new", size=2000, modified=2.0)


@attrs.define
class Backups:
    """A source listing ``backups``; the restore Job downloads them, never the broker."""

    backups: list[Backup] = attrs.Factory(list)
    description: str = "s3://backups/dumps"

    async def list_backups(self) -> Sequence[Backup]:
        await trio.lowlevel.checkpoint()
        return list(self.backups)

    def open(self, backup: Backup) -> AsyncIterator[bytes]:
        raise AssertionError("the Kubernetes provider must not stream backups through the broker")


def api_client(url: str) -> client.ApiClient:
    """One replica's client (own connection pool) with a bearer token, configured as conftest's."""
    configuration = client.Configuration(host=url)
    configuration.connection_pool_maxsize = 4
    configuration.retries = False
    configuration.api_key = {"authorization": f"Bearer {TOKEN}"}
    return client.ApiClient(configuration)


def pool_settings(size: int = 2) -> PoolSettings:
    """Short intervals so that background loops act within a test's second."""
    return attrs.evolve(
        PoolSettings(),
        pool=WarmPoolSettings(
            size=size, max_provisioning=2, health_check_interval=0.1, refresh_interval=0.2
        ),
        source=SourceSettings(poll_interval=3600.0),
    )


async def seed_ready_snapshot(provider: KubernetesProvider, name: str, backup: Backup) -> None:
    """A ready VolumeSnapshot of ``backup``, as a leader made it earlier."""
    now = time.time()
    await provider.create_volume(name, {"status": "restoring"})
    await provider.seal(
        name,
        name,
        {
            "status": "ready",
            "snapshot": name,
            "backup_key": backup.key,
            "backup_etag": backup.etag,
            "backup_modified": f"{backup.modified:.3f}",
            "created": f"{now - 100:.3f}",
            "ready_at": f"{now - 100:.3f}",
        },
    )


async def until(check: Callable[[], Awaitable[bool] | bool], seconds: float = 30.0) -> None:
    """Poll until ``check()`` holds; the bound only turns a hang into a failure."""
    with trio.fail_after(seconds):
        while True:
            result = check()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await trio.sleep(0.02)


def settled(pool: Pool, *, warm: int) -> bool:
    """At least ``warm`` clones free (a refill made for an acquirer that another clone served
    stays warm), none being made or destroyed (nothing in flight to count as leaked)."""
    clones = pool.statistics().clones
    return clones["warm"] >= warm and (clones["provisioning"], clones["destroying"]) == (0, 0)


def history(fake: FakeKubernetes, clone: str) -> list[tuple[int, str, str | None, str | None]]:
    """(resourceVersion, event, status, lease id) of a clone's PVC: the story when a check fails."""
    story = []
    for rv, plural, kind, obj in fake.events:
        if plural == "persistentvolumeclaims" and obj["metadata"]["name"] == f"aldaas-{clone}":
            labels = obj["metadata"].get("labels") or {}
            annotations = obj["metadata"].get("annotations") or {}
            story.append(
                (rv, kind, labels.get("aldaas.io/status"), annotations.get("aldaas.io/lease_id"))
            )
    return story


def objects(fake: FakeKubernetes, plural: str) -> dict[str, dict[str, str]]:
    """name → labels of every ``plural`` object in the test namespace."""
    return {
        o["metadata"]["name"]: o["metadata"].get("labels") or {}
        for o in fake.all(plural)
        if o["metadata"]["namespace"] == NS
    }


async def leftovers(fake: FakeKubernetes, pool: Pool, provider: KubernetesProvider) -> list[str]:
    """What the cluster holds that the pool does not account for (empty when nothing leaked).

    Every clone PVC is warm or leased in the pool and has its pod; no volume
    PVC, Job or pod without a PVC is left; every VolumeSnapshot is one the pool
    knows.
    """
    problems: list[str] = []
    stats = pool.statistics()
    leased = {lease.clone for lease in stats.leases}
    clones = {r.name: r for r in await provider.list(Kind.CLONE)}
    volumes = await provider.list(Kind.VOLUME)
    problems += [f"half-made volume {r.name}" for r in volumes]
    pvcs, pods = objects(fake, "persistentvolumeclaims"), objects(fake, "pods")
    problems += [f"pod without PVC {name}" for name in pods if name not in pvcs]
    problems += [f"PVC without pod {name}" for name in pvcs if name not in pods]
    problems += [f"Job {name}" for name in objects(fake, "jobs")]
    budgets = objects(fake, "poddisruptionbudgets")
    problems += [
        f"PodDisruptionBudget {n}" for n in budgets if n.removeprefix("aldaas-") not in leased
    ]
    warm = stats.clones["warm"]
    for name, r in clones.items():
        status = r.meta.get("status")
        if status == "leased" and name not in leased:
            problems.append(f"leased clone {name} no lease holds")
        elif status not in ("warm", "leased"):
            problems.append(f"clone {name} with status {status}")
    if sum(1 for r in clones.values() if r.meta.get("status") == "warm") != warm:
        problems.append(f"warm clones in the cluster differ from the pool's {warm}")
    known = {s.name for s in stats.snapshots}
    snapshots = {r.name for r in await provider.list(Kind.SNAPSHOT)}
    problems += [f"snapshot {name} the pool does not know" for name in snapshots - known]
    return problems


async def assert_nothing_leaked(
    fake: FakeKubernetes, pool: Pool, provider: KubernetesProvider, *, warm: int
) -> None:
    """Wait until the pool has settled with ``warm`` free clones and the cluster holds nothing it
    does not account for; fail with what leaked if that does not happen.

    Polls: a view refresh may show the pool a clone another replica took, and
    the leader then makes a replacement, so one look is not enough.
    """
    problems: list[str] = ["not settled"]
    with trio.move_on_after(30):
        while True:
            await pool.refresh_view()
            if settled(pool, warm=warm):
                problems = await leftovers(fake, pool, provider)
                if not problems and settled(pool, warm=warm):
                    return
            await trio.sleep(0.05)
    assert problems == [], (problems, pool.statistics().clones)
