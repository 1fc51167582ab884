"""What other packages import: light to import, the real classes when used."""

from __future__ import annotations

import subprocess
import sys

import pytest

import pool
from pool._kubernetes import KubernetesProvider, LeaderElector


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
