"""The Kubernetes provider when a DELETE does not mean "gone": objects that are Terminating.

On a real cluster a deleted pod lingers until the kubelet has stopped it, a PVC
until no pod uses it, a VolumeSnapshot until no PVC is provisioned from it; the
fake API does the same, and a test holds the kubelet to keep a pod Terminating.
"""

from __future__ import annotations

import pytest
import trio
from k8s_fake_api import FakeKubernetes, wait_until

from aldaas.pool import Kind, NotFoundError
from aldaas.pool.providers.kubernetes._provider import KubernetesProvider

NS = "test"


def _uid(fake: FakeKubernetes, plural: str, name: str) -> str:
    obj = fake.get(plural, NS, name)
    assert obj is not None, name
    return str(obj["metadata"]["uid"])


@pytest.mark.slow
async def test_if_a_pod_of_that_name_is_still_terminating_then_create_waits_for_it_to_go(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If a step re-creates a pod while the old one of that name is Terminating, then it waits
    for the old one to go and makes a new one, instead of adopting (and answering with) the
    dying pod."""
    await provider.create_volume("v", {})
    old = _uid(fake, "pods", "aldaas-v")
    fake.kubelet_stops_pods = False
    fake.remove("pods", NS, "aldaas-v")
    done = trio.Event()

    async def again() -> None:
        await provider.create_volume("v", {})
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(again)
        await wait_until(lambda: fake.open_watches > 0 or done.is_set())
        assert not done.is_set()
        fake.kubelet_stops_pods = True
        fake.kick()
        with trio.fail_after(10):
            await done.wait()
    pod = fake.get("pods", NS, "aldaas-v")
    assert pod is not None
    assert pod["metadata"]["uid"] != old
    assert "deletionTimestamp" not in pod["metadata"]
    assert (pod.get("status") or {}).get("phase") == "Running"


async def test_if_a_pod_is_terminating_then_it_is_not_healthy(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If a clone's pod is being deleted (still Ready while the kubelet stops it), then
    is_healthy is False: its database is going away."""
    await provider.create_volume("v", {})
    fake.kubelet_stops_pods = False
    fake.remove("pods", NS, "aldaas-v", grace=30)
    pod = fake.get("pods", NS, "aldaas-v")
    assert pod is not None
    assert pod["metadata"]["deletionGracePeriodSeconds"] == 30
    assert await provider.is_healthy("v") is False


async def test_if_a_snapshot_is_terminating_then_clone_refuses_at_once(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If a VolumeSnapshot is being deleted, then clone() says so at once and makes no PVC
    (the provisioner would refuse it: the PVC would stay Pending until the ready timeout)."""
    await provider.create_volume("v", {})
    await provider.seal("v", "s", {"status": "ready"})
    snapshot = fake.get("volumesnapshots", NS, "aldaas-s")
    assert snapshot is not None
    assert sorted(snapshot["metadata"]["finalizers"]) == [
        "snapshot.storage.kubernetes.io/volumesnapshot-as-source-protection",
        "snapshot.storage.kubernetes.io/volumesnapshot-bound-protection",
    ]
    fake.controllers_enabled = False  # the snapshot controller has not removed them yet
    fake.remove("volumesnapshots", NS, "aldaas-s")
    with pytest.raises(NotFoundError, match="snapshot 's' is being deleted, so clone 'c'"):
        await provider.clone("s", "c", {})
    assert fake.get("persistentvolumeclaims", NS, "aldaas-c") is None


@pytest.mark.slow
async def test_if_a_clone_is_destroyed_then_its_pvc_waits_for_the_pod_and_both_go(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If a clone is destroyed while its pod is still stopping, then list() no longer shows it,
    its PVC stays Terminating (pvc-protection) until the pod is gone, and then both go."""
    await provider.create_volume("v", {})
    await provider.seal("v", "s", {"status": "ready"})
    await provider.clone("s", "c", {})
    fake.kubelet_stops_pods = False
    await provider.destroy(Kind.CLONE, "c")
    pvc = fake.get("persistentvolumeclaims", NS, "aldaas-c")
    assert pvc is not None
    assert pvc["metadata"]["deletionTimestamp"]
    assert [r.name for r in await provider.list(Kind.CLONE)] == []
    fake.kubelet_stops_pods = True
    fake.kick()
    await wait_until(lambda: fake.get("persistentvolumeclaims", NS, "aldaas-c") is None)
    assert fake.get("pods", NS, "aldaas-c") is None
