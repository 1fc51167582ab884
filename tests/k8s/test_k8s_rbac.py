"""The RBAC rules the provider documents are exactly the calls it makes."""

from __future__ import annotations

import attrs
import pytest
import trio
from k8s_fake_api import FakeKubernetes, JobOutcome, PodOutcome, rbac_verbs
from kubernetes import client

from aldaas.pool import Backup, Command, Kind, KubernetesProvider, LeaderElector, ProviderError
from aldaas.pool.providers.kubernetes import _manifests as manifests
from aldaas.pool.providers.kubernetes._client import RBAC_RULES
from aldaas.pool.providers.kubernetes._settings import KubernetesSettings


@pytest.mark.slow
async def test_if_every_provider_step_runs_then_it_needs_exactly_the_documented_rbac(
    settings: KubernetesSettings, fake: FakeKubernetes, api_client: client.ApiClient, source: object
) -> None:
    """If every step runs, including failures and adoption, then the verbs used are RBAC_RULES."""
    fake.act_when_watched = True  # every wait then finds a pending object and watches it
    provider = KubernetesProvider(
        attrs.evolve(settings, progress_interval_seconds=0.01), api_client
    )
    backup = Backup(key="x.sql.gz", etag="e", size=1, modified=0.0)
    await provider.create_volume("v", {})
    await provider.create_volume("v", {})  # adoption reads what exists
    await provider.restore("v", backup, source, Command(argv=["psql"]), lambda p: None)  # type: ignore[arg-type]
    snapshot = await provider.seal("v", "s", {"status": "verifying"})
    await provider.set_meta(
        Kind.SNAPSHOT, "s", {"status": "ready"}, expect_version=snapshot.version
    )
    await provider.clone("s", "c", {})
    await provider.check("c", Command(argv=["true"]))
    done = {"type": "Complete", "status": "True"}
    labels = manifests.system_labels(settings, "check", "c")
    job = {
        "metadata": {"name": "aldaas-c-check", "labels": labels},
        "spec": {},
        "status": {"conditions": [done]},
    }
    fake.put("batch", "jobs", "test", job)  # left by a broker that died mid-check: adopted
    await provider.check("c", Command(argv=["true"]))
    assert await provider.is_healthy("c")
    await provider.protect("c")
    await provider.protect("c")  # a new leader protects it again: adopted
    fake.remove("pods", "test", "aldaas-c")  # evicted or deleted: the lease's pod comes back
    await provider.restart("c")
    fake.update_status(
        "pods",
        "test",
        "aldaas-c",
        {
            "phase": "Failed",
            "reason": "Evicted",
            "conditions": [{"type": "Ready", "status": "False"}],
        },
    )
    await provider.restart("c")
    await provider.set_meta(Kind.CLONE, "c", {"state": "warm"})
    failed = await provider.record_failed_snapshot("f", {"status": "failed"})
    await provider.set_meta(Kind.SNAPSHOT, "f", {"status": "failed", "seen": "1"})
    assert failed.name == "f"
    await provider.list()
    fake.job_rule = lambda job: JobOutcome(succeeded=False, log="boom")
    with pytest.raises(ProviderError):
        await provider.check("c", Command(argv=["false"]))
    fake.pod_rule = lambda pod: PodOutcome(waiting_reason="CrashLoopBackOff")
    with pytest.raises(ProviderError):
        await provider.create_volume("w", {})
    for kind, name in [(Kind.CLONE, "c"), (Kind.SNAPSHOT, "s"), (Kind.SNAPSHOT, "f")]:
        await provider.destroy(kind, name)
    elector = LeaderElector(settings, api_client, identity="a")
    async with trio.open_nursery() as nursery:
        await nursery.start(elector.serve)
        await elector.wait_elected()
        await trio.sleep(settings.leader_election.retry_period_seconds * 2)  # renews
        nursery.cancel_scope.cancel()  # releases

    documented = {(g, r, v) for g, r, verbs in RBAC_RULES for v in verbs}
    assert rbac_verbs(fake.calls) == documented
