"""The three providers the contract suite runs against, each over state shared by a test module.

A :class:`Backend` is what outlives a broker: a :class:`FakeWorld`, a local
data folder with its running PostgreSQL servers, or the fake Kubernetes API's
store. Each test opens fresh providers on it (as a restarted broker would),
finds snapshot ``base`` and volume ``scratch`` there (made once per module,
since a real ``initdb`` costs a second), and leaves nothing else behind.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Protocol

import attrs
import trio

_TESTS = pathlib.Path(__file__).resolve().parent.parent
for _helpers in ("pool", "k8s"):  # tests/ has no __init__.py: reach the fakes next door
    if str(_TESTS / _helpers) not in sys.path:
        sys.path.append(str(_TESTS / _helpers))

from k8s_fake_api import FakeKubernetes, Fault  # noqa: E402
from kubernetes import client  # noqa: E402
from pool_fakes import FakeProvider, FakeWorld  # noqa: E402

from aldaas.pool import (  # noqa: E402
    ApplicationSettings,
    Kind,
    KubernetesProvider,
    KubernetesSettings,
    Liveness,
    LocalProvider,
    LocalSettings,
    Provider,
)
from aldaas.pool.providers.local import _postgres as pg  # noqa: E402

SNAPSHOT = "base"
"""A sealed snapshot every test may clone (and must not destroy)."""
VOLUME = "scratch"
"""A running volume every test may read and write the meta of (and must not destroy)."""
BASELINE = {(Kind.SNAPSHOT, SNAPSHOT), (Kind.VOLUME, VOLUME)}


class LiveProvider(Provider, Liveness, Protocol):
    """A provider that also answers :meth:`Liveness.alive` (all three do)."""


@attrs.define
class Backend:
    """One kind of provider over state that outlives each provider object made on it."""

    name: str
    open: Callable[[], LiveProvider]
    """A new provider over the shared state, as a restarted broker makes one."""
    kill: Callable[[str], Awaitable[None]]
    """Clone ``name``'s database dies (its process, its pod), without the provider's knowledge."""
    outage: Callable[[], contextlib.AbstractContextManager[None]] | None = None
    """While entered, the service the provider talks to fails as a flaky network would; ``None``
    where the provider talks to no remote service (nothing it does can fail temporarily)."""

    @contextlib.asynccontextmanager
    async def provider(self) -> AsyncIterator[LiveProvider]:
        provider = self.open()
        try:
            yield provider
        finally:
            await provider.aclose()


async def _build(backend: Backend) -> None:
    async with backend.provider() as provider:
        await provider.create_volume(SNAPSHOT, {"status": "restoring"})
        await provider.seal(SNAPSHOT, SNAPSHOT, {"status": "ready", "backup_key": "base.sql"})
        await provider.create_volume(VOLUME, {"status": "restoring"})


async def clear(provider: Provider) -> None:
    """Destroy everything a test made; the shared snapshot and volume stay."""
    for resource in await provider.list():
        if (resource.kind, resource.name) not in BASELINE:
            await provider.destroy(resource.kind, resource.name)


@contextlib.contextmanager
def fake_backend() -> Iterator[Backend]:
    world = FakeWorld(clone_seconds=0.0)

    async def kill(name: str) -> None:
        await trio.lowlevel.checkpoint()
        world.kill(name)

    backend = Backend(name="fake", open=lambda: FakeProvider(world), kill=kill)
    trio.run(_build, backend)
    yield backend


@contextlib.contextmanager
def local_backend(data_dir: pathlib.Path) -> Iterator[Backend]:
    settings = LocalSettings(data_dir=data_dir)

    async def kill(name: str) -> None:
        pgdata = data_dir / "clones" / name / "pgdata"
        info = pg.running_postmaster(pgdata)
        assert info is not None, f"clone {name!r} has no running postmaster to kill"
        os.kill(info.pid, signal.SIGKILL)
        with trio.fail_after(10):
            while pg.process_identity(info.pid) is not None:  # noqa: ASYNC110 (another process)
                await trio.sleep(0.01)

    backend = Backend(name="local", open=lambda: LocalProvider(settings), kill=kill)
    trio.run(_build, backend)
    yield backend


@contextlib.contextmanager
def kubernetes_backend() -> Iterator[Backend]:
    fake = FakeKubernetes()
    fake.start()
    settings = KubernetesSettings(
        namespace="contract",
        identity="contract-suite",
        application=ApplicationSettings(user="aldaas", database="app"),
        ready_timeout_seconds=10.0,
        snapshot_timeout_seconds=10.0,
        request_timeout_seconds=5.0,
        api_retries=3,
        api_retry_delay_seconds=0.01,
        stop_grace_seconds=1,
    )

    def open_provider() -> KubernetesProvider:
        configuration = client.Configuration(host=fake.url)
        configuration.retries = False  # the provider retries; urllib3 must not retry under it
        return KubernetesProvider(settings, client.ApiClient(configuration))

    async def kill(name: str) -> None:
        await trio.lowlevel.checkpoint()
        not_ready = {"conditions": [{"type": "Ready", "status": "False"}]}
        fake.update_status("pods", settings.namespace, f"{settings.instance}-{name}", not_ready)

    @contextlib.contextmanager
    def outage() -> Iterator[None]:
        fault = Fault(method=None, path_contains="/", code=503, times=1_000_000)
        fake.faults.append(fault)
        try:
            yield
        finally:
            fake.faults.remove(fault)
        assert fault.hits > 0, "the outage was never noticed"

    backend = Backend(name="kubernetes", open=open_provider, kill=kill, outage=outage)
    try:
        trio.run(_build, backend)
        yield backend
    finally:
        fake.stop()
