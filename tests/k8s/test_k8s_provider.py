"""The Kubernetes provider against a fake API server that the real client talks to over HTTP."""

from __future__ import annotations

import base64
import threading

import attrs
import pytest
import trio
from k8s_fake_api import FakeKubernetes, JobOutcome, PodOutcome, wait_until
from kubernetes import client

from aldaas.pool import (
    Backup,
    Command,
    ConflictError,
    Kind,
    NotFoundError,
    ProviderError,
    RestoreProgress,
    TemporaryProviderError,
)
from aldaas.pool.providers.kubernetes._provider import KubernetesProvider
from aldaas.pool.providers.kubernetes._settings import KubernetesSettings

NS = "test"
BACKUP = Backup(key="dumps/2026-11-26.sql.gz", etag="etag-1", size=1000, modified=0.0)


@pytest.mark.slow
async def test_if_a_backup_goes_through_the_whole_pipeline_then_every_object_appears_and_goes(
    provider: KubernetesProvider, fake: FakeKubernetes, source: object
) -> None:
    """If a volume is restored, sealed, cloned, checked and destroyed, then the cluster ends empty
    (Secrets included); each step logs in with the passwords of its volume's or clone's Secret."""
    endpoint = await provider.create_volume("v1", {"status": "restoring", "backup": "nightly"})
    assert endpoint.host.startswith("127.0.0.")
    assert (endpoint.port, endpoint.user, endpoint.database) == (5432, "aldaas_admin", "app")
    volume_secret = secret_values(fake, "aldaas-v1")
    assert endpoint.password == volume_secret["admin-password"]
    database = fake.get("pods", NS, "aldaas-v1")
    assert database is not None
    assert {"name": "POSTGRES_USER", "value": "aldaas_admin"} in database["spec"]["containers"][0][
        "env"
    ]
    pvc = fake.get("persistentvolumeclaims", NS, "aldaas-v1")
    assert pvc is not None
    assert pvc["spec"]["storageClassName"] == "fast"
    assert pvc["metadata"]["labels"]["aldaas.io/status"] == "restoring"
    assert pvc["metadata"]["labels"]["aldaas"] == "aldaas"

    progress: list[RestoreProgress] = []
    command = Command(argv=["psql", "-v", "ON_ERROR_STOP=1"], env={"EXTRA": "1"})
    await provider.restore("v1", BACKUP, source, command, progress.append)  # type: ignore[arg-type]
    assert [(p.done_bytes, p.total_bytes) for p in progress] == [(0, 1000), (1000, 1000)]
    job = next(obj for plural, obj in fake.created if plural == "jobs")
    spec = job["spec"]["template"]["spec"]
    assert spec["initContainers"][0]["command"] == [
        "aldaas",
        "fetch-backup",
        "--key",
        "dumps/2026-11-26.sql.gz",
        "--to",
        "/backup/2026-11-26.sql.gz",
    ]
    restore = spec["containers"][0]
    assert restore["command"][-3:] == ["psql", "-v", "ON_ERROR_STOP=1"]
    env = {e["name"]: e.get("value") or e["valueFrom"] for e in restore["env"]}
    assert env["PGUSER"] == "aldaas_admin"
    assert env["PGPASSWORD"] == {"secretKeyRef": {"name": "aldaas-v1", "key": "admin-password"}}
    assert env["ALDAAS_HOST_DAEMON"] == endpoint.host
    assert env["ALDAAS_BACKUP_FILE"] == "/backup/2026-11-26.sql.gz"
    assert env["EXTRA"] == "1"
    assert fake.get("jobs", NS, "aldaas-v1-restore") is None

    snapshot = await provider.seal("v1", "s1", {"status": "verifying"})
    assert (snapshot.kind, snapshot.name, dict(snapshot.meta)) == (
        Kind.SNAPSHOT,
        "s1",
        {"status": "verifying"},
    )
    assert snapshot.size_bytes == 1024**3
    assert fake.get("persistentvolumeclaims", NS, "aldaas-v1") is None
    assert fake.get("pods", NS, "aldaas-v1") is None
    assert fake.get("secrets", NS, "aldaas-v1") is None
    snap = fake.get("volumesnapshots", NS, "aldaas-s1")
    assert snap is not None
    assert snap["spec"] == {
        "source": {"persistentVolumeClaimName": "aldaas-v1"},
        "volumeSnapshotClassName": "snap",
    }

    clone_endpoint = await provider.clone("s1", "c1", {"state": "warm"})
    assert clone_endpoint.host.startswith("127.0.0.")
    clone_pvc = fake.get("persistentvolumeclaims", NS, "aldaas-c1")
    assert clone_pvc is not None
    assert clone_pvc["spec"]["dataSource"] == {
        "apiGroup": "snapshot.storage.k8s.io",
        "kind": "VolumeSnapshot",
        "name": "aldaas-s1",
    }
    clone_secret = fake.get("secrets", NS, "aldaas-c1")
    assert clone_secret is not None
    assert clone_secret["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "name": "aldaas-c1",
            "uid": clone_pvc["metadata"]["uid"],
        }
    ]
    passwords = secret_values(fake, "aldaas-c1")
    assert (clone_endpoint.user, clone_endpoint.password) == ("aldaas", passwords["password"])
    assert passwords["admin-password"] != volume_secret["admin-password"]
    assert await provider.is_healthy("c1") is True
    await provider.check("c1", Command(argv=["psql", "-c", "select 1"]))

    ready = await provider.set_meta(
        Kind.SNAPSHOT, "s1", {"status": "ready"}, expect_version=snapshot.version
    )
    assert dict(ready.meta) == {"status": "ready"}
    snap = fake.get("volumesnapshots", NS, "aldaas-s1")
    assert snap is not None
    assert snap["metadata"]["labels"]["status"] == "ready"

    listed = {(r.kind, r.name) for r in await provider.list()}
    assert listed == {(Kind.SNAPSHOT, "s1"), (Kind.CLONE, "c1")}

    await provider.destroy(Kind.CLONE, "c1")
    await provider.destroy(Kind.SNAPSHOT, "s1")
    await provider.destroy(Kind.CLONE, "c1")  # a second destroy is not an error
    assert await provider.list() == []
    assert await provider.is_healthy("c1") is False
    assert fake.all("secrets") == []


async def test_if_two_replicas_claim_the_same_warm_clone_then_exactly_one_wins(
    settings: KubernetesSettings, fake: FakeKubernetes, api_client: client.ApiClient
) -> None:
    """If two providers compare-and-set the same clone's meta with one version, then one gets ConflictError."""
    first = KubernetesProvider(settings, api_client)
    second = KubernetesProvider(settings, api_client)
    await first.create_volume("v", {})
    await first.seal("v", "s", {"status": "ready"})
    await first.clone("s", "c", {"state": "warm"})
    (warm,) = await second.list(Kind.CLONE)
    outcomes: dict[str, str] = {}

    async def claim(provider: KubernetesProvider, lease: str) -> None:
        try:
            await provider.set_meta(
                Kind.CLONE, "c", {"state": "leased", "lease": lease}, expect_version=warm.version
            )
            outcomes[lease] = "won"
        except ConflictError:
            outcomes[lease] = "lost"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(claim, first, "lease-a")
        nursery.start_soon(claim, second, "lease-b")
    assert sorted(outcomes.values()) == ["lost", "won"]
    winner = next(lease for lease, outcome in outcomes.items() if outcome == "won")
    (claimed,) = await first.list(Kind.CLONE)
    assert dict(claimed.meta) == {"state": "leased", "lease": winner}
    assert claimed.endpoint is not None


async def test_if_a_provider_restarts_then_it_adopts_what_the_cluster_holds(
    settings: KubernetesSettings, fake: FakeKubernetes, api_client: client.ApiClient
) -> None:
    """If a new provider lists the namespace, then it sees every volume, snapshot and clone with meta."""
    before = KubernetesProvider(settings, api_client)
    await before.create_volume("v", {"status": "restoring"})
    await before.create_volume("old", {})
    await before.seal("old", "s", {"status": "ready", "backup_etag": "e" * 80})
    await before.clone("s", "c", {"state": "leased", "secret_hash": "f" * 64})
    await before.aclose()
    fake.put("", "persistentvolumeclaims", NS, {"metadata": {"name": "unrelated"}, "spec": {}})

    after = KubernetesProvider(settings, api_client)
    found = {(r.kind, r.name): r for r in await after.list()}
    assert set(found) == {(Kind.VOLUME, "v"), (Kind.SNAPSHOT, "s"), (Kind.CLONE, "c")}
    assert dict(found[Kind.SNAPSHOT, "s"].meta) == {"status": "ready", "backup_etag": "e" * 80}
    assert dict(found[Kind.CLONE, "c"].meta) == {"state": "leased", "secret_hash": "f" * 64}
    assert found[Kind.CLONE, "c"].endpoint is not None
    snap = fake.get("volumesnapshots", NS, "aldaas-s")
    assert snap is not None
    assert "aldaas.io/backup_etag" in snap["metadata"]["annotations"]


async def test_if_meta_is_replaced_then_removed_keys_disappear_from_labels_and_annotations(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If set_meta drops a key or moves a value out of label range, then no stale copy remains."""
    await provider.create_volume("v", {"state": "warm", "deadline": "1764100000.5"})
    resource = await provider.set_meta(Kind.VOLUME, "v", {"state": "x" * 70})
    assert dict(resource.meta) == {"state": "x" * 70}
    pvc = fake.get("persistentvolumeclaims", NS, "aldaas-v")
    assert pvc is not None
    assert "aldaas.io/state" not in pvc["metadata"]["labels"]
    assert pvc["metadata"]["annotations"]["aldaas.io/state"] == "x" * 70
    assert "aldaas.io/deadline" not in pvc["metadata"]["annotations"]


async def test_if_the_version_is_stale_or_the_object_gone_then_set_meta_says_so(
    provider: KubernetesProvider,
) -> None:
    """If set_meta carries an old version, then ConflictError; if the clone is gone, NotFoundError."""
    await provider.create_volume("v", {})
    (volume,) = await provider.list(Kind.VOLUME)
    await provider.set_meta(Kind.VOLUME, "v", {"state": "a"})
    with pytest.raises(ConflictError, match="changed since version"):
        await provider.set_meta(Kind.VOLUME, "v", {"state": "b"}, expect_version=volume.version)
    with pytest.raises(NotFoundError):
        await provider.set_meta(Kind.CLONE, "v", {"state": "b"})
    with pytest.raises(NotFoundError):
        await provider.set_meta(Kind.CLONE, "nothing", {"state": "b"})


async def test_if_the_restore_job_fails_then_the_error_quotes_its_log_tail(
    provider: KubernetesProvider, fake: FakeKubernetes, source: object
) -> None:
    """If the restore command exits non-zero, then ProviderError names the Job and quotes its log."""
    fake.job_rule = lambda job: JobOutcome(succeeded=False, log="line 1\nERROR: relation exists\n")
    await provider.create_volume("v", {})
    with pytest.raises(
        ProviderError, match=r'restore Job "aldaas-v-restore" failed.*relation exists'
    ):
        await provider.restore("v", BACKUP, source, Command(argv=["psql"]), lambda p: None)  # type: ignore[arg-type]
    assert fake.get("jobs", NS, "aldaas-v-restore") is None


async def test_if_the_database_image_cannot_be_pulled_then_create_fails_with_the_reason(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If the kubelet reports ImagePullBackOff, then create_volume fails at once naming it."""
    fake.pod_rule = lambda pod: PodOutcome(waiting_reason="ImagePullBackOff")
    with pytest.raises(ProviderError, match="ImagePullBackOff"):
        await provider.create_volume("v", {})


@pytest.mark.slow
async def test_if_a_pod_never_becomes_ready_then_create_times_out_with_one_sentence(
    settings: KubernetesSettings, fake: FakeKubernetes, api_client: client.ApiClient
) -> None:
    """If the pod stays unready past ready_timeout_seconds, then ProviderError says so."""
    fake.pod_rule = lambda pod: PodOutcome(ready=False)
    provider = KubernetesProvider(attrs.evolve(settings, ready_timeout_seconds=0.3), api_client)
    with pytest.raises(ProviderError, match=r'pod "aldaas-v" did not become Ready within 0.3 s'):
        await provider.create_volume("v", {})
    assert provider.watch_threads == 0


async def test_if_a_name_is_not_a_valid_object_name_then_the_error_says_how_to_fix_it(
    provider: KubernetesProvider,
) -> None:
    """If the pool asks for an upper-case name, then ProviderError explains the naming rule."""
    with pytest.raises(ProviderError, match="lower-case letters"):
        await provider.create_volume("Bad_Name", {})
    with pytest.raises(ProviderError, match="meta key 'kind'"):
        await provider.create_volume("v", {"kind": "x"})


async def test_if_the_download_fails_then_the_error_quotes_the_fetch_log(
    provider: KubernetesProvider, fake: FakeKubernetes, source: object
) -> None:
    """If the init container cannot fetch the backup, then the error quotes the fetch log, not the command's."""
    fake.job_rule = lambda job: JobOutcome(
        fetch_failed=True, fetch_log="NoSuchKey: dumps/x.sql.gz\n"
    )
    await provider.create_volume("v", {})
    with pytest.raises(ProviderError, match=r"BackoffLimitExceeded.*NoSuchKey: dumps/x.sql.gz"):
        await provider.restore("v", BACKUP, source, Command(argv=["psql"]), lambda p: None)  # type: ignore[arg-type]


async def test_if_the_download_is_running_then_its_progress_is_reported(
    settings: KubernetesSettings, fake: FakeKubernetes, api_client: client.ApiClient, source: object
) -> None:
    """If the fetch container prints progress lines, then restore reports them to the callback."""
    provider = KubernetesProvider(
        attrs.evolve(settings, progress_interval_seconds=0.01), api_client
    )
    hold = threading.Event()
    fake.job_rule = lambda job: JobOutcome(
        fetch_log="progress 100 1000\nprogress 400 1000\n", hold=hold
    )
    await provider.create_volume("v", {})
    seen: list[tuple[int, int]] = []

    def record(p: RestoreProgress) -> None:
        seen.append((p.done_bytes, p.total_bytes))
        if p.done_bytes == 400:
            hold.set()

    await provider.restore("v", BACKUP, source, Command(argv=["psql"]), record)  # type: ignore[arg-type]
    assert seen == [(0, 1000), (400, 1000), (1000, 1000)]


async def test_if_a_snapshot_failed_then_its_record_is_listed_and_destroyed_like_a_snapshot(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If the pool records a failed snapshot, then it lists, updates and destroys it, and cannot clone it."""
    meta = {
        "status": "failed",
        "reason": "restore exited 3: ERROR: syntax error",
        "backup_key": "a/b",
    }
    record = await provider.record_failed_snapshot("snap-1", meta)
    assert (record.kind, record.name, dict(record.meta)) == (Kind.SNAPSHOT, "snap-1", meta)
    again = await provider.record_failed_snapshot("snap-1", meta)  # idempotent
    assert again.version == record.version
    (listed,) = await provider.list(Kind.SNAPSHOT)
    assert listed == record
    updated = await provider.set_meta(
        Kind.SNAPSHOT, "snap-1", {**meta, "pruned": "no"}, expect_version=record.version
    )
    assert updated.meta["pruned"] == "no"
    with pytest.raises(NotFoundError):
        await provider.clone("snap-1", "c", {})
    await provider.destroy(Kind.SNAPSHOT, "snap-1")
    assert await provider.list() == []
    assert fake.all("configmaps") == []


async def test_if_a_clone_was_listed_then_claiming_it_is_a_single_api_call(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If the pool claims a clone at the version it listed, then the hand-out is one PATCH request."""
    await provider.create_volume("v", {})
    await provider.seal("v", "s", {"status": "ready"})
    await provider.clone("s", "c", {"state": "warm"})
    (warm,) = await provider.list(Kind.CLONE)
    before = len(fake.requests)
    leased = await provider.set_meta(
        Kind.CLONE, "c", {"state": "leased"}, expect_version=warm.version
    )
    assert fake.requests[before:] == [
        ("PATCH", "/api/v1/namespaces/test/persistentvolumeclaims/aldaas-c")
    ]
    assert leased.endpoint == warm.endpoint


async def test_if_an_object_is_being_deleted_then_list_leaves_it_out(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If a PVC is Terminating (its pod still uses it), then list() no longer reports it."""
    await provider.create_volume("v", {})
    await provider.create_volume("w", {})
    fake.kubelet_stops_pods = False
    fake.remove("pods", NS, "aldaas-w")
    fake.remove("persistentvolumeclaims", NS, "aldaas-w")
    pvc = fake.get("persistentvolumeclaims", NS, "aldaas-w")
    assert pvc is not None
    assert pvc["metadata"]["finalizers"] == ["kubernetes.io/pvc-protection"]
    assert pvc["metadata"]["deletionTimestamp"]
    assert [r.name for r in await provider.list()] == ["v"]


async def test_if_the_volume_does_not_exist_then_seal_says_so_at_once(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If seal names a volume that was never created, then NotFoundError instead of a long wait."""
    with pytest.raises(NotFoundError, match="volume 'ghost' does not exist"):
        await provider.seal("ghost", "s", {})
    assert fake.all("volumesnapshots") == []


async def test_if_seal_runs_again_after_it_finished_then_it_returns_the_snapshot(
    provider: KubernetesProvider,
) -> None:
    """If a restarted pipeline seals again, then the existing snapshot is adopted."""
    await provider.create_volume("v", {})
    first = await provider.seal("v", "s", {"status": "verifying"})
    again = await provider.seal("v", "s", {"status": "verifying"})
    assert (again.name, again.version) == (first.name, first.version)


async def test_if_a_clone_is_still_being_provisioned_from_a_snapshot_then_it_is_not_deleted(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If a PVC made from the snapshot is not bound yet, then destroy is a temporary error."""
    await provider.create_volume("v", {})
    await provider.seal("v", "s", {"status": "ready"})
    fake.controllers_enabled = False  # the clone's PVC stays Pending
    async with trio.open_nursery() as nursery:
        nursery.start_soon(provider.clone, "s", "c", {})
        await wait_until(lambda: fake.get("pods", NS, "aldaas-c") is not None)
        with pytest.raises(TemporaryProviderError, match='restored into PVC "aldaas-c"'):
            await provider.destroy(Kind.SNAPSHOT, "s")
        nursery.cancel_scope.cancel()
    fake.controllers_enabled = True
    fake.update_status("persistentvolumeclaims", NS, "aldaas-c", {"phase": "Bound"})
    await provider.destroy(Kind.SNAPSHOT, "s")
    await wait_until(lambda: fake.get("volumesnapshots", NS, "aldaas-s") is None)


@pytest.mark.slow
async def test_if_a_clone_pod_was_not_ready_at_the_last_list_then_alive_says_so_without_a_call(
    settings: KubernetesSettings, fake: FakeKubernetes, api_client: client.ApiClient
) -> None:
    """If the last list saw the clone's pod not Ready (or gone), then alive() is False; no API call."""
    provider = KubernetesProvider(settings, api_client)
    await provider.create_volume("v", {})
    await provider.seal("v", "s", {"status": "ready"})
    await provider.clone("s", "c", {"state": "warm"})
    await provider.clone("s", "d", {"state": "warm"})
    calls = len(fake.calls)
    assert provider.alive("c") is True  # Ready when it was made
    assert provider.alive("never-seen") is True  # it cannot know cheaply: the health loop will
    assert len(fake.calls) == calls, "alive() must answer from what the provider knows"

    fake.update_status(
        "pods", NS, "aldaas-c", {"conditions": [{"type": "Ready", "status": "False"}]}
    )
    assert provider.alive("c") is True  # not seen yet: the health loop's is_healthy finds it
    await provider.list()
    assert provider.alive("c") is False
    assert provider.alive("d") is True
    await provider.destroy(Kind.CLONE, "d")
    assert provider.alive("d") is False


async def test_if_a_pvc_of_the_same_name_is_someone_elses_then_it_is_never_adopted_or_deleted(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If a PVC (and pod) named like a clone exist without aldaas's labels, then making that clone
    fails in one sentence, no database pod is started on it, and destroy() leaves both alone."""
    await provider.create_volume("v", {})
    await provider.seal("v", "s", {"status": "ready"})
    foreign_labels = {"app": "billing", "aldaas.io/kind": "clone"}  # a look-alike, not ours
    pvc = {"metadata": {"name": "aldaas-c", "labels": foreign_labels}, "spec": {}}
    fake.put("", "persistentvolumeclaims", NS, pvc)
    with pytest.raises(ProviderError) as caught:
        await provider.clone("s", "c", {"state": "warm"})
    assert str(caught.value) == (
        'PVC "aldaas-c" already exists but is not aldaas\'s clone of instance "aldaas" (its '
        "labels do not say so); rename or delete it, or give aldaas another kubernetes.instance."
    )
    assert fake.get("pods", NS, "aldaas-c") is None
    foreign_pod = {"containers": [{"name": "app", "image": "billing:1"}]}
    fake.put("", "pods", NS, {"metadata": {"name": "aldaas-c"}, "spec": foreign_pod})
    await provider.destroy(Kind.CLONE, "c")
    assert fake.get("persistentvolumeclaims", NS, "aldaas-c") is not None
    assert fake.get("pods", NS, "aldaas-c") is not None


def secret_values(fake: FakeKubernetes, name: str) -> dict[str, str]:
    """The decoded data of Secret ``name`` in the test namespace (which must exist)."""
    secret = fake.get("secrets", NS, name)
    assert secret is not None, name
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
