"""Fixtures for the Kubernetes provider: a fake API server on loopback and clients for it."""

from __future__ import annotations

import pathlib
import sys
from collections.abc import AsyncIterator, Iterator, Sequence

import attrs
import pytest
from k8s_fake_api import FakeKubernetes
from kubernetes import client

from aldaas.pool import Backup
from aldaas.pool.providers.kubernetes._provider import KubernetesProvider
from aldaas.pool.providers.kubernetes._settings import (
    ApplicationSettings,
    KubernetesSettings,
    LeaderElectionSettings,
)

# tests/ has no __init__.py: make tests/reliability's fault proxy importable from here.
_RELIABILITY_TESTS = str(pathlib.Path(__file__).resolve().parent.parent / "reliability")
if _RELIABILITY_TESTS not in sys.path:
    sys.path.append(_RELIABILITY_TESTS)


@pytest.fixture
def fake() -> Iterator[FakeKubernetes]:
    server = FakeKubernetes()
    server.start()
    yield server
    server.stop()


def make_api_client(fake: FakeKubernetes) -> client.ApiClient:
    configuration = client.Configuration(host=fake.url)
    configuration.connection_pool_maxsize = 4
    configuration.retries = False  # as KubernetesProvider configures its own client
    return client.ApiClient(configuration)


@pytest.fixture
def api_client(fake: FakeKubernetes) -> Iterator[client.ApiClient]:
    api = make_api_client(fake)
    yield api
    api.close()


@pytest.fixture
def settings() -> KubernetesSettings:
    return KubernetesSettings(
        namespace="test",
        instance="aldaas",
        identity="broker-0",
        storage_class="fast",
        snapshot_class="snap",
        storage_size="1Gi",
        application=ApplicationSettings(user="aldaas", database="app"),
        ready_timeout_seconds=10.0,
        snapshot_timeout_seconds=10.0,
        watch_timeout_seconds=5,
        request_timeout_seconds=5.0,
        api_retry_delay_seconds=0.01,
        stop_grace_seconds=1,
        leader_election=LeaderElectionSettings(
            lease_duration_seconds=2.0, renew_deadline_seconds=1.2, retry_period_seconds=0.2
        ),
    )


@pytest.fixture
async def provider(
    settings: KubernetesSettings, api_client: client.ApiClient
) -> AsyncIterator[KubernetesProvider]:
    kube = KubernetesProvider(settings, api_client)
    yield kube
    await kube.aclose()


@attrs.frozen
class NoSource:
    """A Source the Kubernetes provider never reads: the restore Job downloads the backup itself."""

    description: str = "s3://backups/nightly"

    async def list_backups(self) -> Sequence[Backup]:
        raise AssertionError("the Kubernetes provider must not list backups")

    def open(self, backup: Backup) -> AsyncIterator[bytes]:
        raise AssertionError("the Kubernetes provider must not stream backups through the broker")


@pytest.fixture
def source() -> NoSource:
    return NoSource()
