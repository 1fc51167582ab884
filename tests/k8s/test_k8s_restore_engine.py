"""The restore Job running aldaas's own restore: what its outcome does on the provider's side.

The Job's container is simulated here (the fake API's JobOutcome); the real
``aldaas restore-backup`` running in it is exercised end to end in
test_k8s_e2e.py, through the local kubelet.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import threading
from collections.abc import Mapping

import attrs
import pytest
from k8s_built import built_objects, pod_specs
from k8s_fake_api import FakeKubernetes, JobOutcome
from kubernetes import client

from aldaas.pool import Backup, Command, Endpoint, Kind, ProviderError, RestoreProgress
from aldaas.pool.providers.kubernetes._provider import KubernetesProvider
from aldaas.pool.providers.kubernetes._settings import KubernetesSettings

BUILTIN = Command(argv=(), builtin=True)
BACKUP = Backup(key="spilo/acid/logical_backups/1.sql.gz", etag="e", size=1000, modified=0.0)
OUTCOME = {
    "restore_format": "script+gzip",
    "restore_database": "app_production",
    "restore_tolerated": "CREATE ROLE postgres (the role exists)",
    "restore_created_roles": "app_owner",
}


def _ignore(_: RestoreProgress) -> None:
    pass


async def _seal_and_clone(
    provider: KubernetesProvider, fake: FakeKubernetes, meta: Mapping[str, str]
) -> tuple[Endpoint, dict[str, str]]:
    """Seal volume v into snapshot s with ``meta`` and clone it: the clone's endpoint and the
    annotations of its PVC."""
    await provider.seal("v", "s", {"status": "verifying", **meta})
    endpoint = await provider.clone("s", "c", {"state": "warm"})
    claim = fake.get("persistentvolumeclaims", "test", "aldaas-c")
    assert claim is not None
    return endpoint, dict(claim["metadata"]["annotations"])


async def test_if_the_engine_reports_a_database_then_the_snapshot_and_its_clones_hand_it_out(
    provider: KubernetesProvider,
    fake: FakeKubernetes,
    settings: KubernetesSettings,
    api_client: client.ApiClient,
    source: object,
) -> None:
    """If the restore's termination message names the pg_dumpall's database, then restore returns
    it as snapshot meta, the masking step and the check run in it, and every clone of the
    snapshot (also as a restarted broker lists it) hands it out instead of application.database."""
    fake.job_rule = lambda job: JobOutcome(message=json.dumps({**OUTCOME, "other": "ignored"}))
    await provider.create_volume("v", {})
    meta = await provider.restore("v", BACKUP, source, BUILTIN, _ignore)  # type: ignore[arg-type]
    assert meta == OUTCOME
    await provider.check("v", Command(argv=("psql", "-f", "masking.sql")))
    check = [obj for plural, obj in fake.created if plural == "jobs"][-1]
    env = {
        e["name"]: e.get("value") for e in check["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["PGDATABASE"] == "app_production"

    endpoint, annotations = await _seal_and_clone(provider, fake, meta)
    assert endpoint.database == "app_production"
    assert annotations["aldaas.io/database"] == "app_production"

    restarted = KubernetesProvider(settings, api_client)
    try:
        (clone,) = await restarted.list(Kind.CLONE)
    finally:
        await restarted.aclose()
    assert clone.endpoint is not None
    assert clone.endpoint.database == "app_production"
    assert "database" not in clone.meta  # the annotation is the provider's, not the pool's meta


async def test_if_the_engine_chose_the_application_database_then_clones_carry_no_annotation(
    provider: KubernetesProvider, fake: FakeKubernetes, source: object
) -> None:
    """If the outcome names application.database (a plain pg_dump), then the clone's PVC carries
    no database annotation and its endpoint names application.database."""
    await provider.create_volume("v", {})
    meta = await provider.restore("v", BACKUP, source, BUILTIN, _ignore)  # type: ignore[arg-type]
    assert meta["restore_database"] == "app"
    endpoint, annotations = await _seal_and_clone(provider, fake, meta)
    assert endpoint.database == "app"
    assert "aldaas.io/database" not in annotations


@pytest.mark.parametrize("message", ["", "restored", json.dumps({"restore_format": "x"})])
async def test_if_the_engine_leaves_no_outcome_then_the_restore_fails_naming_the_image(
    provider: KubernetesProvider, fake: FakeKubernetes, source: object, message: str
) -> None:
    """If the restore Job succeeds without a usable outcome (an older helper image), then the
    restore fails in one sentence naming the image settings, not with a wrong database."""
    fake.job_rule = lambda job: JobOutcome(message=message)
    await provider.create_volume("v", {})
    with pytest.raises(ProviderError, match=r"without reporting its outcome.*helper_image"):
        await provider.restore("v", BACKUP, source, BUILTIN, _ignore)  # type: ignore[arg-type]


async def test_if_a_command_is_configured_then_no_outcome_is_expected(
    provider: KubernetesProvider, fake: FakeKubernetes, source: object
) -> None:
    """If the pool's restore.argv is set (the Job runs it, not the engine), then a Job without
    a termination message restores, adding no meta."""
    await provider.create_volume("v", {})
    meta = await provider.restore("v", BACKUP, source, Command(argv=("psql",)), _ignore)  # type: ignore[arg-type]
    assert meta == {}


async def test_if_the_engine_is_running_then_its_progress_follows_the_downloads(
    settings: KubernetesSettings, fake: FakeKubernetes, api_client: client.ApiClient, source: object
) -> None:
    """If the download prints progress and then the engine does, then restore reports the
    download's bytes and then the restore's, each phase's rate from its own start."""
    provider = KubernetesProvider(
        attrs.evolve(settings, progress_interval_seconds=0.01), api_client
    )
    fetching, restoring = threading.Event(), threading.Event()
    fake.job_rule = lambda job: JobOutcome(
        fetch_log="progress 1000 1000\n",
        hold=fetching,
        restore_log="progress 250 1000\n",
        restore_hold=restoring,
    )
    seen: list[tuple[int, int]] = []

    def record(p: RestoreProgress) -> None:
        seen.append((p.done_bytes, p.total_bytes))
        if p.done_bytes == 1000 and not fetching.is_set():
            fetching.set()
        elif p.done_bytes == 250:
            restoring.set()

    await provider.create_volume("v", {})
    await provider.restore("v", BACKUP, source, BUILTIN, record)  # type: ignore[arg-type]
    assert seen == [(0, 1000), (1000, 1000), (250, 1000), (1000, 1000)]


@pytest.mark.slow
def test_if_a_job_runs_an_aldaas_command_then_the_installed_program_has_it(
    settings: KubernetesSettings,
) -> None:
    """If a Job's container runs ``aldaas <command>`` (the download, the built-in restore), then
    the ``aldaas`` program this package installs knows that command (the helper image's)."""
    commands = {
        container["command"][1]
        for spec in pod_specs(built_objects(settings)).values()
        for container in [*spec.get("initContainers", []), *spec["containers"]]
        if container.get("command", [""])[0] == "aldaas"
    }
    assert commands == {"fetch-backup", "restore-backup"}
    program = pathlib.Path(sys.executable).parent / "aldaas"
    for command in sorted(commands):
        done = subprocess.run(
            [str(program), command, "--help"], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        assert f"aldaas {command}" in done.stdout
