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
from kubernetes import client
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
