"""Untrusted input (lease labels, backup keys, settings) never makes invalid objects or selectors."""

from __future__ import annotations

import json
import re

import attrs
import pytest
import trio
from k8s_fake_api import FakeKubernetes
from k8s_reliability import OLD, Backups, api_client, objects, pool_settings, until
from kubernetes import client

from aldaas.pool import Backup, Kind, KubernetesProvider, LeaderElector, Pool, ProviderError
from aldaas.pool.providers.kubernetes._settings import KubernetesSettings, LeaderElectionSettings

# What the API server accepts (apimachinery's validation): a qualified name key with an
# optional DNS-subdomain prefix, and a value of ≤ 63 characters.
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_SUBDOMAIN = r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?"
LABEL_KEY = re.compile(rf"^({_SUBDOMAIN}/)?{_NAME}$")
LABEL_VALUE = re.compile(rf"^({_NAME})?$")
OBJECT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

HOSTILE = {
    "$(touch /tmp/aldaas-pwned)": "`id`;rm -rf /",
    "app.kubernetes.io/managed-by": "someone-else",
    "aldaas.io/kind": "volume",
    "a,b=c": "x in (y),!z",
    "'; DROP TABLE leases; --": '"quoted"\n\\',
    "nul\x00key": "nul\x00value",
    "é" * 64: "ü" * 256,
}
HOSTILE_KEY = "dumps/$(touch /tmp/aldaas-pwned);`id`\n'\"…/../../x y.sql.gz"


def assert_valid(fake: FakeKubernetes) -> None:
    """Every object aldaas made has a valid name and labels, and carries its own system labels."""
    for plural in ("persistentvolumeclaims", "pods", "volumesnapshots", "configmaps", "jobs"):
        for obj in fake.all(plural):
            name, labels = obj["metadata"]["name"], obj["metadata"].get("labels") or {}
            assert OBJECT_NAME.match(name), (plural, name)
            for key, value in labels.items():
                assert LABEL_KEY.match(key), (plural, name, key)
                assert LABEL_VALUE.match(value), (plural, name, key, value)
            if "aldaas.io/kind" in labels and "job-name" not in labels:
                assert labels["app.kubernetes.io/managed-by"] == "aldaas", (plural, name)
                assert labels["aldaas.io/instance"] == "aldaas", (plural, name)
                assert labels["aldaas.io/kind"] in ("snapshot", "clone", "volume", "restore"), (
                    plural,
                    name,
                )


@pytest.mark.slow
async def test_if_labels_and_backup_keys_are_hostile_then_objects_stay_valid_and_values_round_trip(
    fake: FakeKubernetes, settings: KubernetesSettings
) -> None:
    """If a backup key and lease labels hold shell syntax, selector syntax, our own label keys,
    NUL and long Unicode, then every object and label is valid, the key reaches the restore Job
    as one argv element, and after a restart the labels come back unchanged."""
    backup = Backup(key=HOSTILE_KEY, etag="e\n'$(x)", size=10, modified=3.0)
    api = api_client(fake.url)
    provider = KubernetesProvider(settings, api)
    try:
        pool = Pool(pool_settings(size=1), provider, Backups([OLD, backup]))
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            await until(lambda: pool.statistics().clones["warm"] == 1)
            lease = await pool.acquire(labels=HOSTILE, timeout=30)
            assert lease.labels == HOSTILE
            assert_valid(fake)
            nursery.cancel_scope.cancel()
        (snapshot,) = [s for s in pool.statistics().snapshots if s.status == "ready"]
        assert snapshot.backup_key == HOSTILE_KEY
        (restore,) = [
            obj
            for plural, obj in fake.created
            if plural == "jobs" and "restore" in obj["metadata"]["name"]
        ]
        fetch = restore["spec"]["template"]["spec"]["initContainers"][0]["command"]
        assert fetch[fetch.index("--key") + 1] == HOSTILE_KEY
        container = restore["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert re.fullmatch(r"/backup/[A-Za-z0-9._-]+", env["ALDAAS_BACKUP_FILE"])
        assert restore["metadata"]["annotations"]["aldaas.io/backup-key"] == HOSTILE_KEY

        restarted = Pool(pool_settings(size=1), provider, Backups([OLD, backup]))
        async with trio.open_nursery() as nursery:
            await nursery.start(restarted.run)
            assert restarted.lease(lease.id).labels == HOSTILE
            assert restarted.verify_secret(lease.id, lease.secret or "")
            nursery.cancel_scope.cancel()
        pvc = fake.get("persistentvolumeclaims", "test", f"aldaas-{lease.clone}")
        assert pvc is not None
        stored = pvc["metadata"]["annotations"]["aldaas.io/lease_labels"]
        assert json.loads(stored) == HOSTILE
        assert {r.name for r in await provider.list(Kind.CLONE)} == {
            n.removeprefix("aldaas-") for n in objects(fake, "persistentvolumeclaims")
        }
    finally:
        await provider.aclose()
        api.close()


@pytest.mark.parametrize(
    ("changes", "setting"),
    [
        ({"instance": "aldaas,aldaas.io/kind!=x"}, "instance"),
        ({"instance": "Aldaas"}, "instance"),
        ({"instance": ""}, "instance"),
        ({"instance": "a" * 64}, "instance"),
        ({"label_prefix": "aldaas.io/kind=x,y/"}, "label_prefix"),
        ({"label_prefix": "aldaas.io"}, "label_prefix"),
        ({"namespace": "../kube-system"}, "namespace"),
        ({"namespace": "a b"}, "namespace"),
        ({"label_meta_keys": ("status", "bad key")}, "label_meta_keys"),
        ({"leader_election": LeaderElectionSettings(lease_name="x/../y")}, "lease_name"),
    ],
)
async def test_if_a_naming_setting_would_inject_into_selectors_or_paths_then_it_is_refused(
    settings: KubernetesSettings,
    api_client: client.ApiClient,
    changes: dict[str, object],
    setting: str,
) -> None:
    """If instance, label_prefix, namespace, label keys or the Lease name are not valid
    Kubernetes names, then the provider and elector refuse them at start in one sentence
    naming the setting, before any request."""
    bad = attrs.evolve(settings, **changes)
    with pytest.raises(ProviderError) as caught:
        KubernetesProvider(bad, api_client)
    with pytest.raises(ProviderError) as caught_by_elector:
        LeaderElector(bad, api_client)
    assert str(caught_by_elector.value) == str(caught.value)
    message = str(caught.value)
    assert setting in message
    assert "\n" not in message
    assert len(message) < 400
