"""Per-clone credentials on Kubernetes: what the Secrets, pods and Jobs carry, and what they never do.

Real logins (two leases, old passwords, a restarted broker) are proven with
real PostgreSQL in test_k8s_e2e.py; these tests look at the objects the
provider sends to the (fake) API server.
"""

from __future__ import annotations

import base64
import json

import attrs
import pytest
from k8s_fake_api import FakeKubernetes
from k8s_local_kubelet import ContainerFailed
from kubernetes import client

from aldaas.pool import Backup, Command, Kind, ProviderError
from aldaas.pool._roles import scram_verifier
from aldaas.pool.providers.kubernetes import _manifests as manifests
from aldaas.pool.providers.kubernetes._provider import KubernetesProvider
from aldaas.pool.providers.kubernetes._settings import ApplicationSettings, KubernetesSettings

NS = "test"


def _decoded(fake: FakeKubernetes, name: str) -> dict[str, str]:
    secret = fake.get("secrets", NS, name)
    assert secret is not None, name
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


async def _clone(provider: KubernetesProvider, name: str = "c") -> None:
    await provider.create_volume("v", {})
    await provider.seal("v", "s", {"status": "ready"})
    await provider.clone("s", name, {"status": "warm"})


async def test_if_a_clone_is_made_then_its_pod_reads_only_verifiers_and_no_spec_holds_a_password(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If a clone is made, then its Secret holds fresh passwords with their SCRAM verifiers, its
    init container reads only the verifiers, its database container no password, and no object
    but the Secrets spells a password."""
    volume = await provider.create_volume("v", {})
    await provider.seal("v", "s", {"status": "ready"})
    await provider.clone("s", "c", {"status": "warm"})
    values = _decoded(fake, "aldaas-c")
    assert set(values) == {
        "password",
        "password-verifier",
        "admin-password",
        "admin-password-verifier",
    }
    for key in ("password", "admin-password"):
        salt = base64.b64decode(values[f"{key}-verifier"].split("$")[1].split(":")[1])
        assert scram_verifier(values[key], salt=salt) == values[f"{key}-verifier"]
    pod = fake.get("pods", NS, "aldaas-c")
    assert pod is not None
    (init,) = pod["spec"]["initContainers"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in init["env"] if "valueFrom" in e}
    assert refs == {
        "ALDAAS_LOGIN_VERIFIER": {"name": "aldaas-c", "key": "password-verifier"},
        "ALDAAS_ADMIN_VERIFIER": {"name": "aldaas-c", "key": "admin-password-verifier"},
    }
    (database,) = pod["spec"]["containers"]
    assert not any("PASSWORD" in e["name"] for e in database["env"])
    passwords = [*values.values(), volume.password]
    for plural, obj in fake.created:
        if plural != "secrets":
            text = json.dumps(obj)
            assert not any(p in text for p in passwords), plural


async def test_if_two_volumes_are_made_then_each_admin_has_its_own_password(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If two volumes are made, then their admins' passwords differ and reach the image as
    POSTGRES_PASSWORD from the volume's Secret (never a shared value from the settings)."""
    first = await provider.create_volume("v1", {})
    second = await provider.create_volume("v2", {})
    assert first.password
    assert second.password
    assert first.password != second.password
    pod = fake.get("pods", NS, "aldaas-v1")
    assert pod is not None
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "aldaas-v1", "key": "admin-password"}
    }
    assert env["POSTGRES_USER"]["value"] == "aldaas_admin"


async def test_if_the_check_runs_then_it_logs_in_as_the_admin_with_the_clones_secret(
    settings: KubernetesSettings, provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If the check (or masking) Job runs on a clone, then it is the admin with the clone's own
    admin password from the clone's Secret, whatever check.env says."""
    settings = attrs.evolve(settings, check=attrs.evolve(settings.check, env={"PGUSER": "x"}))
    provider = KubernetesProvider(settings, provider._client.api_client)
    await _clone(provider)
    await provider.check("c", Command(argv=["psql", "-c", "select 1"]))
    (job,) = [obj for plural, obj in fake.created if plural == "jobs"]
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PGUSER"]["value"] == "aldaas_admin"
    assert env["PGPASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "aldaas-c", "key": "admin-password"}
    }


async def test_if_the_broker_restarts_then_it_finds_each_clones_password_again(
    settings: KubernetesSettings,
    provider: KubernetesProvider,
    fake: FakeKubernetes,
    api_client: client.ApiClient,
) -> None:
    """If a new provider lists the clones (a restart), then each endpoint carries the password
    of the clone's Secret: the DSN a lease holder got stays valid."""
    await _clone(provider)
    await provider.clone("s", "d", {"status": "warm"})
    restarted = KubernetesProvider(settings, api_client)
    endpoints = {r.name: r.endpoint for r in await restarted.list(Kind.CLONE)}
    for name in ("c", "d"):
        endpoint = endpoints[name]
        assert endpoint is not None
        assert endpoint.password == _decoded(fake, f"aldaas-{name}")["password"]
    assert endpoints["c"] != endpoints["d"]
    await restarted.aclose()


@pytest.mark.parametrize(("status", "kept"), [("warm", False), ("leased", True)])
async def test_if_a_clone_has_no_secret_then_only_a_live_lease_keeps_its_address(
    provider: KubernetesProvider, fake: FakeKubernetes, status: str, kept: bool
) -> None:
    """If a clone has no Secret (made before per-clone credentials), then as a warm clone it has
    no endpoint (the pool replaces it), while a leased one keeps its address for its holder."""
    await _clone(provider)
    await provider.set_meta(Kind.CLONE, "c", {"status": status})
    fake.remove("secrets", NS, "aldaas-c")
    (clone,) = await provider.list(Kind.CLONE)
    if kept:
        assert clone.endpoint is not None
        assert clone.endpoint.password is None
    else:
        assert clone.endpoint is None


async def test_if_a_secret_of_that_name_is_not_aldaass_then_the_clone_is_refused(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If a Secret named like the clone exists without aldaas's labels, then the clone fails in
    one sentence and the Secret is neither read into a DSN nor deleted."""
    await provider.create_volume("v", {})
    await provider.seal("v", "s", {"status": "ready"})
    foreign = {"metadata": {"name": "aldaas-c"}, "data": {"password": "c2VjcmV0"}}
    fake.put("", "secrets", NS, foreign)
    with pytest.raises(ProviderError, match=r'Secret "aldaas-c" already exists but is not'):
        await provider.clone("s", "c", {})
    await provider.destroy(Kind.CLONE, "c")
    assert fake.get("secrets", NS, "aldaas-c") is not None


class _FailingCredentials:
    """A kubelet whose clone pods' init container exits 1 (a broken image, a bad Secret)."""

    def start_pod(self, pod: dict[str, object], pvc: dict[str, object], ip: str) -> None:
        if pod["spec"].get("initContainers"):  # type: ignore[attr-defined]
            raise ContainerFailed("credentials", "CrashLoopBackOff", "FATAL:  role is broken")

    def stop_pod(self, pod: dict[str, object]) -> None:
        pass

    def deleted_pvc(self, pvc: dict[str, object]) -> None:
        pass

    def take_snapshot(self, snapshot: dict[str, object]) -> None:
        pass

    def deleted_snapshot(self, snapshot: dict[str, object]) -> None:
        pass


async def test_if_the_credentials_init_container_fails_then_the_clone_fails_quoting_it(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If the init container that sets the clone's passwords keeps failing, then clone() fails at
    once, naming the pod and quoting that container's log."""
    fake.kubelet = _FailingCredentials()
    await provider.create_volume("v", {})
    await provider.seal("v", "s", {"status": "ready"})
    with pytest.raises(ProviderError, match=r"CrashLoopBackOff.*FATAL:  role is broken"):
        await provider.clone("s", "c", {})


async def test_if_credentials_are_static_then_no_secret_and_every_clone_shares_the_login(
    settings: KubernetesSettings, fake: FakeKubernetes, api_client: client.ApiClient
) -> None:
    """If application.logins is static (an image that is not PostgreSQL's), then no Secret or
    init container is made and endpoints carry application.user/password, as configured."""
    app = ApplicationSettings(logins="static", user="app", database="app", password="pw")
    provider = KubernetesProvider(attrs.evolve(settings, application=app), api_client)
    await _clone(provider)
    await provider.clone("s", "d", {})
    endpoints = {r.name: r.endpoint for r in await provider.list(Kind.CLONE)}
    assert {(e.user, e.password) for e in endpoints.values() if e} == {("app", "pw")}
    assert fake.all("secrets") == []
    pod = fake.get("pods", NS, "aldaas-c")
    assert pod is not None
    assert "initContainers" not in pod["spec"]
    await provider.aclose()


def test_if_the_credentials_mode_is_unknown_then_the_provider_refuses_in_one_sentence(
    settings: KubernetesSettings,
) -> None:
    """If application.logins is neither per-clone nor static, then the provider does not
    start, naming the value and both choices."""
    app = ApplicationSettings(logins="perclone")
    with pytest.raises(ProviderError, match=r"application.logins is 'perclone'; use 'per"):
        KubernetesProvider(attrs.evolve(settings, application=app))


def test_if_lease_superuser_is_on_then_the_init_container_makes_the_login_a_superuser(
    settings: KubernetesSettings,
) -> None:
    """If lease.superuser is on, then the clone's init container grants SUPERUSER, else
    NOSUPERUSER (the restore's seal step made the login without it)."""
    for superuser, bit in ((True, " SUPERUSER "), (False, " NOSUPERUSER ")):
        pod = manifests.database_pod(settings, Kind.CLONE, "c", lease_superuser=superuser)
        env = {e["name"]: e.get("value") for e in pod["spec"]["initContainers"][0]["env"]}
        assert bit in env["ALDAAS_CREDENTIALS_SQL"]


async def test_if_a_restore_job_runs_then_it_seals_the_roles_as_the_admin(
    provider: KubernetesProvider, fake: FakeKubernetes, source: object
) -> None:
    """If a backup is restored, then the Job's container runs the seal step after the restore
    command, as the admin, with the volume's admin password from its Secret."""
    backup = Backup(key="x.sql.gz", etag="e", size=1, modified=0.0)
    await provider.create_volume("v", {})
    await provider.restore("v", backup, source, Command(argv=["psql"]), lambda p: None)  # type: ignore[arg-type]
    (job,) = [obj for plural, obj in fake.created if plural == "jobs"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][2].endswith(manifests.SEAL_SCRIPT)
    assert container["command"][3:] == ["aldaas-restore", "psql"]
    env = {e["name"]: e for e in container["env"]}
    assert env["PGUSER"]["value"] == "aldaas_admin"
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "aldaas-v",
        "key": "admin-password",
    }
    assert 'ALTER ROLE "aldaas" WITH LOGIN' in env["ALDAAS_SEAL_ROLES_SQL"]["value"]


async def test_if_a_snapshot_predates_per_clone_credentials_then_it_is_listed_for_deletion(
    settings: KubernetesSettings,
    provider: KubernetesProvider,
    fake: FakeKubernetes,
    api_client: client.ApiClient,
) -> None:
    """If a VolumeSnapshot was made before per-clone credentials (its only login the image's
    superuser, the shared password), then it is listed with a status the pool does not know, so
    the pool deletes it and restores its backup again; a new one is listed as it is."""
    static = attrs.evolve(settings, application=ApplicationSettings(logins="static"))
    old = KubernetesProvider(static, api_client)
    await old.create_volume("v", {})
    await old.seal("v", "old", {"status": "ready"})
    await old.aclose()
    await provider.create_volume("w", {})
    await provider.seal("w", "new", {"status": "ready"})
    listed = {r.name: r.meta["status"] for r in await provider.list(Kind.SNAPSHOT)}
    assert listed == {"old": "made-before-per-clone-credentials", "new": "ready"}
    await provider.set_meta(Kind.SNAPSHOT, "new", {"status": "ready", "seen": "1"})
    (new,) = [r for r in await provider.list(Kind.SNAPSHOT) if r.name == "new"]
    assert new.meta == {"status": "ready", "seen": "1"}
