"""The fake API server itself: selectors, merge patches and CRUD the real client relies on."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from k8s_fake_api import (
    FakeKubernetes,
    PodOutcome,
    field_selector_matches,
    label_selector_matches,
    merge_patch,
    wait_until,
)
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("app=db", True),
        ("app==db,tier=x", False),
        ("app!=db", False),
        ("app", True),
        ("!app", False),
        ("!missing", True),
        ("tier in (a, b)", True),
        ("tier notin (a,b)", False),
        ("tier in (c)", False),
        ("app=db,tier in (b,c),!missing", True),
    ],
)
def test_if_a_label_selector_is_given_then_it_matches_as_kubernetes_does(
    selector: str, expected: bool
) -> None:
    """If labels are matched against equality, set and existence requirements, then as the API does."""
    assert label_selector_matches(selector, {"app": "db", "tier": "b"}) is expected


def test_if_a_merge_patch_has_nulls_then_those_keys_go() -> None:
    """If a merge patch sets a key to null, then the key is removed; nested maps merge."""
    target = {"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"x": [1, 2]}}
    patch = {"metadata": {"labels": {"a": None, "c": "3"}}, "spec": {"x": [3]}}
    assert merge_patch(target, patch) == {
        "metadata": {"labels": {"b": "2", "c": "3"}},
        "spec": {"x": [3]},
    }


def test_if_a_field_selector_names_something_unsupported_then_it_is_refused() -> None:
    """If a field selector is not on metadata.name/namespace, then the fake says so (400)."""
    obj = {"metadata": {"name": "x", "namespace": "n"}}
    assert field_selector_matches("metadata.name=x", obj) is True
    assert field_selector_matches("metadata.name!=x", obj) is False
    with pytest.raises(Exception, match="not supported"):
        field_selector_matches("status.phase=Running", obj)


def test_if_services_and_secrets_are_written_then_the_real_client_reads_them_back(
    fake: FakeKubernetes, api_client: client.ApiClient
) -> None:
    """If the client creates, patches, lists and deletes core objects, then the fake answers like the API."""
    core = client.CoreV1Api(api_client)
    service = {
        "metadata": {"name": "db", "labels": {"app": "db"}},
        "spec": {"ports": [{"port": 1}]},
    }
    core.create_namespaced_service("n", service)
    secret = {"metadata": {"name": "s", "labels": {"app": "other"}}, "stringData": {"k": "v"}}
    core.create_namespaced_secret("n", secret)
    with pytest.raises(ApiException) as exists:
        core.create_namespaced_service("n", service)
    assert exists.value.status == 409
    patched = core.patch_namespaced_service("db", "n", {"metadata": {"labels": {"tier": "x"}}})
    assert patched.metadata.labels == {"app": "db", "tier": "x"}
    listed = core.list_namespaced_service("n", label_selector="tier=x")
    assert [s.metadata.name for s in listed.items] == ["db"]
    stale = {"metadata": {"resourceVersion": "1", "labels": {"tier": "y"}}}
    with pytest.raises(ApiException) as conflict:
        core.patch_namespaced_service("db", "n", stale)
    assert conflict.value.status == 409
    assert "modified" in json.loads(conflict.value.body)["message"]
    core.delete_namespaced_secret("s", "n")
    with pytest.raises(ApiException) as gone:
        core.read_namespaced_secret("s", "n")
    assert gone.value.status == 404


@pytest.mark.slow
async def test_if_a_simulated_controller_crashes_then_stopping_the_fake_raises_it() -> None:
    """If the fake's controller thread raises (a bug in the fake), then stop() raises it, not a print."""
    fake = FakeKubernetes()
    fake.start()

    def broken_kubelet(pod: dict[str, object]) -> PodOutcome:
        raise KeyError("containerPort")

    fake.pod_rule = broken_kubelet
    fake.put("", "persistentvolumeclaims", "ns", {"metadata": {"name": "data"}, "spec": {}})
    pod_spec = {"volumes": [{"persistentVolumeClaim": {"claimName": "data"}}], "containers": []}
    fake.put("", "pods", "ns", {"metadata": {"name": "db"}, "spec": pod_spec})
    await wait_until(lambda: bool(fake.crashes))
    with pytest.raises(ExceptionGroup) as caught:
        fake.stop()
    (crash,) = caught.value.exceptions
    assert isinstance(crash, KeyError)
    (note,) = crash.__notes__
    assert note.startswith("raised in the fake Kubernetes API's controller, on ")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"metadata": {"name": "p"}, "spec": {"containers": [], "nodeSelectr": {}}},
            "Additional properties are not allowed ('nodeSelectr' was unexpected)",
        ),
        (
            {"metadata": {"name": "p" * 64}, "spec": {"containers": []}},
            f"Pod name {'p' * 64!r} (64 characters) is not a valid name",
        ),
        (
            {"metadata": {"name": "p", "labels": {"a": "x" * 64}}, "spec": {"containers": []}},
            "label 'a': value",
        ),
    ],
    ids=["unknown-field", "name-over-63", "label-value-over-63"],
)
def test_if_a_client_sends_what_kubernetes_refuses_then_the_fake_refuses_it_too(
    fake: FakeKubernetes, body: dict[str, object], expected: str
) -> None:
    """If a create carries an unknown field, a name over 63 characters or a bad label, then the
    fake answers 422 as kube-apiserver with strict field validation does, and stores nothing.

    (Sent as raw HTTP: the official client's own models refuse an unknown field before sending.)
    """
    request = urllib.request.Request(
        f"{fake.url}/api/v1/namespaces/test/pods",
        data=json.dumps({"apiVersion": "v1", "kind": "Pod", **body}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)
    assert caught.value.code == 422
    assert expected in json.loads(caught.value.read())["message"]
    assert fake.all("pods") == []


def _events_since(
    api_client: client.ApiClient, list_fn: str, resource_version: str
) -> list[tuple[str, bool]]:
    """(type, has a deletionTimestamp) of each watch event since ``resource_version``."""
    core = client.CoreV1Api(api_client)
    stream = watch.Watch().stream(
        getattr(core, list_fn), "n", resource_version=resource_version, timeout_seconds=1
    )
    return [(e["type"], e["object"].metadata.deletion_timestamp is not None) for e in stream]


@pytest.mark.slow
def test_if_an_object_with_a_finalizer_is_deleted_then_it_stays_until_the_finalizer_goes(
    fake: FakeKubernetes, api_client: client.ApiClient
) -> None:
    """If a DELETE hits an object with finalizers, then it only gets a deletionTimestamp; it
    cannot gain finalizers, its name stays taken, and it goes when the last one is removed;
    a watch sees MODIFIED, MODIFIED, DELETED."""
    core = client.CoreV1Api(api_client)
    body = {"metadata": {"name": "c", "finalizers": ["example.com/keep"]}, "data": {"k": "v"}}
    created = core.create_namespaced_config_map("n", body)
    core.delete_namespaced_config_map("c", "n")
    held = core.read_namespaced_config_map("c", "n")
    assert held.metadata.deletion_timestamp is not None
    assert held.metadata.deletion_grace_period_seconds == 0
    with pytest.raises(ApiException) as more:
        core.patch_namespaced_config_map(
            "c", "n", {"metadata": {"finalizers": ["example.com/keep", "example.com/more"]}}
        )
    assert more.value.status == 422
    assert "no new finalizers can be added" in json.loads(more.value.body)["message"]
    with pytest.raises(ApiException) as taken:
        core.create_namespaced_config_map("n", {"metadata": {"name": "c"}})
    assert taken.value.status == 409
    core.patch_namespaced_config_map("c", "n", {"metadata": {"finalizers": []}})
    with pytest.raises(ApiException) as gone:
        core.read_namespaced_config_map("c", "n")
    assert gone.value.status == 404
    assert _events_since(
        api_client, "list_namespaced_config_map", created.metadata.resource_version
    ) == [("MODIFIED", True), ("MODIFIED", True), ("DELETED", True)]


def _running_pod(fake: FakeKubernetes, name: str, claim: str) -> None:
    fake.put("", "persistentvolumeclaims", "n", {"metadata": {"name": claim}, "spec": {}})
    volume = {"name": "data", "persistentVolumeClaim": {"claimName": claim}}
    spec = {"containers": [{"name": "db", "image": "postgres"}], "volumes": [volume]}
    fake.put("", "pods", "n", {"metadata": {"name": name}, "spec": spec})


@pytest.mark.slow
async def test_if_a_used_pvc_and_its_pod_are_deleted_then_the_pvc_waits_for_the_pod(
    fake: FakeKubernetes, api_client: client.ApiClient
) -> None:
    """If a PVC a running pod uses is deleted, then it stays Terminating (pvc-protection); the
    pod's DELETE leaves it Terminating with its grace period until the kubelet has stopped it,
    and then the pod and the PVC go, in that order."""
    core = client.CoreV1Api(api_client)
    _running_pod(fake, "db", "data")
    await wait_until(lambda: (fake.get("pods", "n", "db") or {}).get("status", {}).get("phase"))
    start = str(fake.rv)
    fake.kubelet_stops_pods = False
    core.delete_namespaced_persistent_volume_claim("data", "n")
    core.delete_namespaced_pod("db", "n", grace_period_seconds=7)
    pvc = core.read_namespaced_persistent_volume_claim("data", "n")
    assert pvc.metadata.finalizers == ["kubernetes.io/pvc-protection"]
    assert pvc.metadata.deletion_timestamp is not None
    pod = core.read_namespaced_pod("db", "n")
    assert pod.metadata.deletion_grace_period_seconds == 7
    fake.kubelet_stops_pods = True
    fake.kick()
    await wait_until(lambda: fake.get("persistentvolumeclaims", "n", "data") is None)
    deletions = [
        (p, o["metadata"]["name"])
        for rv, p, t, o in fake.events
        if rv > int(start) and t == "DELETED"
    ]
    assert deletions == [("pods", "db"), ("persistentvolumeclaims", "data")]


async def test_if_a_pvc_is_being_restored_from_a_snapshot_then_the_deleted_snapshot_waits(
    fake: FakeKubernetes, api_client: client.ApiClient
) -> None:
    """If a VolumeSnapshot is deleted while a PVC is still Pending from it, then it stays
    (volumesnapshot-as-source-protection) until that PVC is bound."""
    size = {"resources": {"requests": {"storage": "1Gi"}}}
    fake.put("", "persistentvolumeclaims", "n", {"metadata": {"name": "src"}, "spec": size})
    snapshot = {"metadata": {"name": "s"}, "spec": {"source": {"persistentVolumeClaimName": "src"}}}
    fake.put("snapshot.storage.k8s.io", "volumesnapshots", "n", snapshot)
    await wait_until(lambda: (fake.get("volumesnapshots", "n", "s") or {}).get("status"))
    fake.controllers_enabled = False  # the restored PVC stays Pending
    source = {"kind": "VolumeSnapshot", "name": "s", "apiGroup": "snapshot.storage.k8s.io"}
    fake.put(
        "",
        "persistentvolumeclaims",
        "n",
        {"metadata": {"name": "r"}, "spec": {"dataSource": source}},
    )
    client.CustomObjectsApi(api_client).delete_namespaced_custom_object(
        "snapshot.storage.k8s.io", "v1", "n", "volumesnapshots", "s"
    )
    fake.controllers_enabled = True
    swept = fake.sweeps
    fake.kick()
    await wait_until(lambda: fake.sweeps > swept)
    held = fake.get("volumesnapshots", "n", "s")
    assert held is not None
    assert held["metadata"]["deletionTimestamp"]
    fake.update_status("persistentvolumeclaims", "n", "r", {"phase": "Bound"})
    await wait_until(lambda: fake.get("volumesnapshots", "n", "s") is None)


@pytest.mark.slow
@pytest.mark.parametrize(("policy", "pod_stays"), [("Background", False), (None, True)])
async def test_if_a_job_is_deleted_then_its_pods_follow_the_propagation_policy(
    fake: FakeKubernetes, api_client: client.ApiClient, policy: str | None, pod_stays: bool
) -> None:
    """If a finished Job is deleted in the background, then the garbage collector deletes its
    pod afterwards; with no policy (batch/v1 orphans by default) the pod stays, unowned."""
    template = {"metadata": {}, "spec": {"containers": [{"name": "main", "image": "x"}]}}
    fake.put("batch", "jobs", "n", {"metadata": {"name": "j"}, "spec": {"template": template}})
    await wait_until(lambda: (fake.get("jobs", "n", "j") or {}).get("status", {}).get("succeeded"))
    (pod,) = fake.all("pods")
    assert pod["metadata"]["finalizers"] == []  # the Job controller has counted it
    client.BatchV1Api(api_client).delete_namespaced_job("j", "n", propagation_policy=policy)
    assert fake.get("jobs", "n", "j") is None
    if pod_stays:
        assert fake.get("pods", "n", pod["metadata"]["name"])["metadata"]["ownerReferences"] == []  # type: ignore[index]
    else:
        await wait_until(lambda: fake.all("pods") == [])
