"""What other packages import: light to import, the real classes when used."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import yaml
from k8s_fake_api import FakeKubernetes

from aldaas import pool
from aldaas.pool import KubernetesProvider, LeaderElector
from aldaas.pool.providers.kubernetes._settings import KubernetesSettings


@pytest.mark.slow
def test_if_pool_is_imported_then_the_kubernetes_client_is_not() -> None:
    """If a process only imports pool, then the heavy kubernetes client stays unloaded."""
    code = (
        "import sys, pool; print('kubernetes' in sys.modules, pool.KubernetesSettings().instance)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "aldaas"]


def test_if_the_provider_is_taken_from_pool_then_it_is_the_kubernetes_one() -> None:
    """If code imports KubernetesProvider/LeaderElector from pool, then it gets the real classes."""
    assert pool.KubernetesProvider is KubernetesProvider
    assert pool.LeaderElector is LeaderElector
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = pool.Nope  # type: ignore[attr-defined]


async def test_if_a_kubeconfig_is_named_then_the_provider_builds_its_own_client(
    fake: FakeKubernetes, tmp_path: pathlib.Path
) -> None:
    """If settings name a kubeconfig, then the provider connects with it, pool-sized and unretried."""
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
                "users": [{"name": "me", "user": {"token": "not-a-secret"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}],
                "current-context": "fake",
            }
        )
    )
    settings = KubernetesSettings(namespace="test", kubeconfig=str(kubeconfig), api_connections=6)
    provider = KubernetesProvider(settings)
    try:
        await provider.create_volume("v", {})
        assert [r.name for r in await provider.list()] == ["v"]
        configuration = provider._client.api_client.configuration
        assert (configuration.connection_pool_maxsize, configuration.retries) == (6, False)
    finally:
        await provider.aclose()
