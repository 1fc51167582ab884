"""One of every object the Kubernetes provider sends, and the pod specs inside manifests.

Shared by the provider's manifest tests (tests/k8s) and the chart's (tests/chart), so the
Pod Security check (``k8s_schemas.restricted_violations``) runs over the same pods in both:
what the provider builds from its own settings and from the settings the chart renders.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aldaas.pool import Backup, Command, Endpoint, Kind
from aldaas.pool.providers.kubernetes import _manifests as manifests
from aldaas.pool.providers.kubernetes._settings import KubernetesSettings

SNAPSHOT = "snap-20261126030000-a1b2c3"  # the pool's names: pool/_meta.py
VOLUME = SNAPSHOT
ENGINE_VOLUME = "snap-20261126040000-b2c3d4"
"""A volume whose restore Job runs the built-in restore (``aldaas restore-backup``)."""
CLONE = "clone-0123456789"
VERIFY = "verify-0123456789"


BUILTIN = Command(argv=(), builtin=True)
"""The pool's restore command when ``restore.argv`` is empty: the built-in restore."""


def _as_created(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` as the API server answers its create: with a uid."""
    return {**obj, "metadata": {**obj["metadata"], "uid": "5e1f2d3c-4b5a-4968-8776-a5b4c3d2e1f0"}}


def built_objects(settings: KubernetesSettings) -> list[dict[str, Any]]:
    """One of every object the provider sends, built by the same functions it calls."""
    address = Endpoint(host="10.0.0.7", port=5432, user="aldaas", database="app").environ()
    backup = Backup(key="logical/appdb/2026-11-26.sql.gz", etag="e", size=10, modified=0.0)
    snapshot_name = manifests.object_name(settings, SNAPSHOT)
    meta = {"status": "verifying", "deadline": "1764115200.0", "reason": "x" * 3000}
    volume_claim = manifests.pvc(settings, Kind.VOLUME, VOLUME, {"status": "restoring"})
    clone_claim = manifests.pvc(
        settings,
        Kind.CLONE,
        CLONE,
        {"state": "warm"},
        snapshot_name,
        restore_size="20Gi",
        database="app_production",
    )
    return [
        volume_claim,
        manifests.database_pod(settings, Kind.VOLUME, VOLUME, _as_created(volume_claim)),
        manifests.restore_job(settings, VOLUME, backup, Command(argv=["psql"]), address),
        manifests.restore_job(settings, ENGINE_VOLUME, backup, BUILTIN, address),
        manifests.volume_snapshot(settings, VOLUME, SNAPSHOT, meta),
        clone_claim,
        manifests.database_pod(settings, Kind.CLONE, CLONE, _as_created(clone_claim)),
        manifests.disruption_budget(settings, CLONE),
        manifests.check_job(settings, VERIFY, Command(argv=["psql", "-c", "select 1"]), address),
        manifests.failed_snapshot_record(settings, SNAPSHOT, {"status": "failed", **meta}),
        manifests.lease(
            settings.leader_election.lease_name,
            holder="broker-0",
            duration_seconds=15.0,
            renew_time="2026-11-26T03:00:00.000000Z",
            acquire_time="2026-11-26T03:00:00.000000Z",
            transitions=0,
        ),
    ]


def pod_specs(objects: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod spec among manifests, by ``"<Kind> <name>"``: Pods, the pod templates of
    Deployments, StatefulSets, DaemonSets, ReplicaSets and Jobs, and CronJobs' job templates."""
    specs: dict[str, dict[str, Any]] = {}
    for obj in objects:
        key = f"{obj['kind']} {obj['metadata']['name']}"
        spec = obj.get("spec") or {}
        if obj["kind"] == "Pod":
            specs[key] = spec
        elif obj["kind"] == "CronJob":
            specs[key] = spec["jobTemplate"]["spec"]["template"]["spec"]
        elif "template" in spec and "spec" in spec["template"]:
            specs[key] = spec["template"]["spec"]
    return specs
