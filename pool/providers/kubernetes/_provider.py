"""The Kubernetes provider: volumes, snapshots and clones as PVCs, VolumeSnapshots, pods and Jobs.

The objects it sends are built by :mod:`._manifests` (pure), its calls go
through :mod:`._client` (threads, retries, watches), and leader election lives
in :mod:`._leader`. A resource's ``meta`` lives in labels and annotations of its
PVC or VolumeSnapshot (or, for a failed snapshot's record, a ConfigMap), and its
``version`` is that object's resourceVersion. The PVC, not the pod, carries a
clone's meta: the kubelet rewrites pod status all the time, which would make a
compare-and-set on the pod lose for no reason.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import attrs
import structlog
import trio
from kubernetes.utils.quantity import parse_quantity

from ... import _roles as roles
from ..._meta import RESTORE_DATABASE, RESTORE_OUTCOME, STATUS
from ..._provider import (
    Backup,
    Command,
    ConflictError,
    Endpoint,
    Kind,
    Liveness,
    NotFoundError,
    ProgressCallback,
    Provider,
    ProviderError,
    Resource,
    Restartable,
    RestoreProgress,
    Source,
    TemporaryProviderError,
)
from ..._states import CloneState
from . import _manifests as manifests
from ._client import (
    BUDGETS,
    CONFIGMAPS,
    JOBS,
    MERGE_PATCH,
    PODS,
    PVCS,
    SECRETS,
    SNAPSHOTS,
    WHAT,
    Client,
    WatchGone,
)
from ._manifests import MetaCodec, Obj, label_value_ok
from ._settings import KubernetesSettings

log = structlog.get_logger()

LEGACY_SNAPSHOT_STATUS = "made-before-per-clone-credentials"
"""The status :meth:`KubernetesProvider.list` reports for such a snapshot (the pool deletes it)."""

T = TypeVar("T")

_FATAL_WAITING = frozenset(
    {
        "ImagePullBackOff",  # not ErrImagePull: the kubelet retries a first failed pull
        "InvalidImageName",
        "CrashLoopBackOff",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)


class _PodFailed(Exception):
    def __init__(self, reason: str, container: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.container = container


def _terminating(obj: Obj) -> bool:
    """Whether the object is being deleted: a DELETE only marks an object with finalizers, or a
    pod the kubelet must stop first; it lingers, under its name, until they are done."""
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def _live(listing: Obj) -> list[Obj]:
    """Items of a list answer that are not being deleted."""
    return [o for o in listing.get("items") or [] if not _terminating(o)]


def _ready_ip(pod: Obj) -> str | None:
    status = pod.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    ip = status.get("podIP")
    return str(ip) if ready and ip else None


def _restore_outcome(message: str) -> dict[str, str]:
    """The snapshot meta ``aldaas restore-backup`` wrote as its termination message (JSON)."""
    try:
        outcome = json.loads(message)
    except ValueError:
        outcome = None
    if not isinstance(outcome, dict) or not isinstance(outcome.get(RESTORE_DATABASE), str):
        shown = message if len(message) <= 120 else message[:120] + "…"
        raise ProviderError(
            f"the restore Job finished without reporting its outcome (termination message "
            f"{shown!r}); use a helper_image (or restore.image) with this aldaas version's "
            "restore-backup command"
        )
    return {k: v for k, v in outcome.items() if k in RESTORE_OUTCOME and isinstance(v, str)}


def _size(quantity: Any) -> int | None:
    if not quantity:
        return None
    try:
        return int(parse_quantity(str(quantity)))  # type: ignore[no-untyped-call]
    except ValueError:
        return None


class KubernetesProvider:
    """:class:`pool.Provider` on a Kubernetes cluster (PVCs, VolumeSnapshots, pods, Jobs)."""

    def __init__(
        self,
        settings: KubernetesSettings,
        api_client: Any | None = None,
        *,
        lease_superuser: bool = False,
    ) -> None:
        """``lease_superuser`` (setting ``lease.superuser``) makes every clone's login a superuser."""
        self._settings = settings
        self._lease_superuser = lease_superuser
        self._per_clone = manifests.per_clone(settings)
        self._client = Client(settings, api_client)
        self._codec = MetaCodec.of(settings)
        self._seen: dict[tuple[str, str], Obj] = {}
        """Last state seen of each meta-holding object, so a compare-and-set needs no read first."""
        self._endpoints: dict[str, Endpoint] = {}
        """Pod endpoints seen, by object name (a leased clone's pod started again replaces its)."""
        self._not_ready: frozenset[str] = frozenset()
        """Clones (object names) whose pod was not Ready at the last list, or destroyed since."""
        self._credentials: dict[str, dict[str, str]] = {}
        """The Secret of each volume and clone seen (per-clone credentials), by object name."""
        self._databases: dict[str, str] = {}
        """The database leases get, by object name, where the restore chose one other than
        ``application.database`` (a pg_dumpall backup's): a volume's from its restore's outcome,
        a clone's from its PVC's annotation."""

    @property
    def name(self) -> str:
        return "kubernetes"

    @property
    def watch_threads(self) -> int:
        """How many watch reader threads run now; 0 whenever no watch is in progress."""
        return self._client.watch_threads

    def _object_name(self, name: str, suffix: str = "") -> str:
        return manifests.object_name(self._settings, name, suffix)

    # waiting -----------------------------------------------------------------------------------
    async def _wait_for(
        self,
        plural: str,
        object_name: str,
        check: Callable[[Obj | None], T | None],
        *,
        timeout: float,  # noqa: ASYNC109 - a deadline for the whole wait, across re-watches
        waiting_for: str,
    ) -> T:
        """Until ``check(object or None)`` returns a value; re-lists after 410 Gone and watch timeouts."""
        selector = f"metadata.name={object_name}"
        with trio.move_on_after(timeout):
            while True:
                listed = await self._client.call("list", plural, field_selector=selector)
                items = listed.get("items") or []
                result = check(items[0] if items else None)
                if result is not None:
                    return result

                def handle(kind: str, obj: Obj) -> T | None:
                    return check(None if kind == "DELETED" else obj)

                try:
                    result = await self._client.watch(
                        plural,
                        handle,
                        resource_version=str(listed["metadata"]["resourceVersion"]),
                        timeout_seconds=self._settings.watch_timeout_seconds,
                        field_selector=selector,
                    )
                except WatchGone:
                    log.info("kubernetes.watch_expired", what=WHAT[plural], name=object_name)
                    await trio.sleep(self._settings.api_retry_delay_seconds)  # never a tight loop
                    continue
                except TemporaryProviderError as exc:
                    log.warning(
                        "kubernetes.watch_failed",
                        what=WHAT[plural],
                        name=object_name,
                        error=str(exc),
                    )
                    await trio.sleep(self._settings.api_retry_delay_seconds)
                    continue
                if result is not None:
                    return result
        raise ProviderError(
            f'{WHAT[plural]} "{object_name}" did not become {waiting_for} within {timeout:g} s; '
            "see `kubectl describe` for why, or raise the timeout."
        )

    async def _wait_pod_ready(self, object_name: str) -> str:
        def check(pod: Obj | None) -> str | None:
            if pod is None or _terminating(pod):  # it was created (or adopted) before this wait
                raise _PodFailed("it was deleted while starting", None)
            status = pod.get("status") or {}
            if status.get("phase") in ("Failed", "Succeeded"):
                raise _PodFailed(f"it stopped (phase {status['phase']})", "database")
            containers = [
                *(status.get("initContainerStatuses") or []),  # e.g. credentials, on a clone
                *(status.get("containerStatuses") or []),
            ]
            for container in containers:
                waiting = (container.get("state") or {}).get("waiting") or {}
                if waiting.get("reason") in _FATAL_WAITING:
                    raise _PodFailed(
                        f"{waiting['reason']}: {waiting.get('message', '')}".strip(),
                        container["name"],
                    )
            return _ready_ip(pod)

        try:
            return await self._wait_for(
                PODS,
                object_name,
                check,
                timeout=self._settings.ready_timeout_seconds,
                waiting_for="Ready",
            )
        except _PodFailed as exc:
            tail = await self._client.pod_log(
                object_name, exc.container or "database", self._settings.log_tail_lines
            )
            raise ProviderError(
                f'database pod "{object_name}" failed to start ({exc.reason}); log tail: {tail or "(empty)"}'
            ) from None

    async def _wait_pod_gone(self, object_name: str, grace: int) -> None:
        await self._wait_for(
            PODS,
            object_name,
            lambda pod: True if pod is None else None,
            timeout=grace + 60,
            waiting_for="deleted",
        )

    async def _create(self, plural: str, body: Obj) -> Obj:
        """Create ``body``; an object of that name already there is adopted (idempotent steps)
        if it is this instance's own, of the same kind and name, and refused otherwise.

        One that is being deleted is never adopted: it is waited out, then created anew.
        """
        name = body["metadata"]["name"]
        while True:
            try:
                return dict(await self._client.call("create", plural, body=body))
            except ConflictError:
                pass
            try:
                existing = dict(await self._client.call("read", plural, name))
            except NotFoundError:
                continue  # gone between the two calls: create it again
            prefix = self._settings.label_prefix
            labels = body["metadata"]["labels"]
            kind, pool_name = labels[f"{prefix}kind"], labels[f"{prefix}name"]
            if not manifests.is_ours(self._settings, existing, kind, pool_name):
                raise ProviderError(
                    f'{WHAT[plural]} "{name}" already exists but is not aldaas\'s {kind} of '
                    f'instance "{self._settings.instance}" (its labels do not say so); rename or '
                    "delete it, or give aldaas another kubernetes.instance."
                ) from None
            if not _terminating(existing):
                log.info("kubernetes.adopted", what=WHAT[plural], name=name)
                return existing
            log.info("kubernetes.waiting_for_deletion", what=WHAT[plural], name=name)
            await self._wait_gone(plural, name, existing["metadata"]["uid"])

    async def _wait_gone(self, plural: str, name: str, uid: str) -> None:
        """Until the object ``uid`` of that name no longer exists (a new one may, already)."""
        await self._wait_for(
            plural,
            name,
            lambda obj: True if obj is None or obj["metadata"]["uid"] != uid else None,
            timeout=max(self._settings.stop_grace_seconds, self._settings.ready_timeout_seconds),
            waiting_for="deleted (an earlier one of that name is still being deleted)",
        )

    async def _delete(self, plural: str, object_name: str, *, grace: int | None = None) -> None:
        """Delete an object of this instance; one without its labels is left alone (logged).

        The delete carries the uid that was read, so an object re-created under
        the same name meanwhile is not deleted in its place.
        """
        try:
            obj = await self._client.call("read", plural, object_name)
        except NotFoundError:
            return
        if not manifests.is_ours(self._settings, obj):
            log.warning("kubernetes.not_ours", what=WHAT[plural], name=object_name)
            return
        options: Obj = {
            "propagationPolicy": "Background",
            "preconditions": {"uid": obj["metadata"]["uid"]},
        }
        if grace is not None:
            options["gracePeriodSeconds"] = grace
        with contextlib.suppress(NotFoundError):
            await self._client.call("delete", plural, object_name, body=options)

    async def _endpoint(self, object_name: str) -> Endpoint:
        ip = await self._wait_pod_ready(object_name)
        self._endpoints[object_name] = self._endpoint_at(ip, object_name)
        return self._endpoints[object_name]

    def _endpoint_at(self, ip: str, object_name: str) -> Endpoint:
        """How to log in to ``object_name``'s database at ``ip``: a clone's lease login with the
        password of its Secret, a volume's admin (per-clone), or the static login."""
        app = self._settings.application
        database = self._databases.get(object_name, app.database)
        if not self._per_clone:
            return Endpoint(
                host=ip, port=app.port, user=app.user, database=database, password=app.password
            )
        secret = self._credentials.get(object_name, {})
        user, password = app.user, secret.get(manifests.LOGIN_PASSWORD)
        if password is None and manifests.ADMIN_PASSWORD in secret:  # a volume's
            user, password = roles.ADMIN, secret[manifests.ADMIN_PASSWORD]
        return Endpoint(host=ip, port=app.port, user=user, database=database, password=password)

    async def _make_secret(
        self, kind: Kind, name: str, pvc: Obj, keys: Sequence[tuple[str, str | None]]
    ) -> None:
        """Create ``name``'s Secret of fresh passwords (``(password key, verifier key or None)``),
        owned by its PVC; one made before (an interrupted step) is adopted as it is."""
        values: dict[str, str] = {}
        for password_key, verifier_key in keys:
            values[password_key] = roles.new_password()
            if verifier_key is not None:
                values[verifier_key] = roles.scram_verifier(values[password_key])
        body = manifests.credentials_secret(self._settings, kind, name, pvc, values)
        secret = manifests.secret_values(await self._create(SECRETS, body))
        missing = [key for pair in keys for key in pair if key and key not in secret]
        if missing:
            raise ProviderError(
                f'Secret "{body["metadata"]["name"]}" lacks {", ".join(missing)}; delete it '
                f"and destroy {kind.value} {name!r} so that both are made again."
            )
        self._credentials[body["metadata"]["name"]] = secret

    async def _read_credentials(self, object_name: str) -> None:
        """Learn ``object_name``'s Secret if not known yet (none: its clone predates it)."""
        if not self._per_clone or object_name in self._credentials:
            return
        try:
            secret = await self._client.call("read", SECRETS, object_name)
        except NotFoundError:
            return
        if manifests.is_ours(self._settings, secret):
            self._credentials[object_name] = manifests.secret_values(secret)

    # Provider ----------------------------------------------------------------------------------
    async def create_volume(self, name: str, meta: Mapping[str, str]) -> Endpoint:
        log.info("kubernetes.create_volume", volume=name)
        claim = await self._create(PVCS, manifests.pvc(self._settings, Kind.VOLUME, name, meta))
        if self._per_clone:
            await self._make_secret(Kind.VOLUME, name, claim, [(manifests.ADMIN_PASSWORD, None)])
        await self._create(PODS, manifests.database_pod(self._settings, Kind.VOLUME, name, claim))
        return await self._endpoint(self._object_name(name))

    async def restore(
        self,
        name: str,
        backup: Backup,
        source: Source,
        command: Command,
        progress: ProgressCallback,
    ) -> Mapping[str, str]:
        """Restore ``backup`` into volume ``name`` with a Job; returns what aldaas's restore engine
        reports for the snapshot (format, database, what it tolerated), or nothing for a
        configured command."""
        engine = manifests.uses_engine(self._settings, command)
        if not engine and not command.argv:
            raise ProviderError(
                f"backup {backup.key!r} has no known suffix (.sql, .sql.gz, .dump, .pgdump); "
                "rename it or set restore.argv."
            )
        volume_name = self._object_name(name)
        self._databases.pop(volume_name, None)
        endpoint = await self._endpoint(volume_name)
        body = manifests.restore_job(self._settings, name, backup, command, endpoint.environ())
        started = trio.current_time()
        log.info(
            "kubernetes.restore_started", volume=name, backup=backup.key, source=source.description
        )
        progress(RestoreProgress(done_bytes=0, total_bytes=backup.size, elapsed_seconds=0.0))
        failure: ProviderError | None = None
        message = ""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                self._report_download, body["metadata"]["name"], backup, started, progress
            )
            try:
                message = await self._run_job(body, "restore", command.timeout_seconds)
            except ProviderError as exc:
                failure = exc  # raised outside the nursery, so callers do not get an ExceptionGroup
            finally:
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        elapsed = trio.current_time() - started
        progress(
            RestoreProgress(
                done_bytes=backup.size, total_bytes=backup.size, elapsed_seconds=elapsed
            )
        )
        outcome = _restore_outcome(message) if engine else {}
        database = outcome.get(RESTORE_DATABASE)
        if database and database != self._settings.application.database:
            self._databases[volume_name] = database  # the masking step runs in it too
            self._endpoints.pop(volume_name, None)
        log.info(
            "kubernetes.restore_finished",
            volume=name,
            backup=backup.key,
            seconds=round(elapsed, 3),
            **outcome,
        )
        return outcome

    async def _report_download(
        self, job_name: str, backup: Backup, started: float, progress: ProgressCallback
    ) -> None:
        """Report the Job's progress from its running container's last log line.

        ``aldaas fetch-backup`` (the download) and ``aldaas restore-backup``
        (the built-in restore) print ``progress DONE TOTAL`` lines: the
        download's bytes are reported first, then the restore's, each phase
        with its own elapsed time so the rate is the phase's. A configured
        restore command prints none, so after the download nothing more is
        reported until the Job ends.
        """
        last = {"fetch": 0, "restore": 0}
        phase_started = {"fetch": started}
        while True:
            await trio.sleep(self._settings.progress_interval_seconds)
            try:
                pods = await self._client.call("list", PODS, label_selector=f"job-name={job_name}")
            except ProviderError:
                continue
            for pod in pods.get("items") or []:
                status = pod.get("status") or {}
                running = [
                    str(s.get("name"))
                    for key in ("initContainerStatuses", "containerStatuses")
                    for s in status.get(key) or []
                    if s.get("name") in last and "running" in (s.get("state") or {})
                ]
                if not running:
                    continue
                container = running[0]
                now = trio.current_time()
                phase_started.setdefault(container, now)
                line = await self._client.pod_log(pod["metadata"]["name"], container, 1)
                match = re.fullmatch(r"progress (\d+) (\d+)", line.strip())
                if match and int(match.group(1)) > last[container]:
                    last[container] = int(match.group(1))
                    total = int(match.group(2)) or backup.size
                    elapsed = now - phase_started[container]
                    progress(
                        RestoreProgress(
                            done_bytes=last[container], total_bytes=total, elapsed_seconds=elapsed
                        )
                    )

    async def _run_job(self, body: Obj, step: str, timeout: float) -> str:  # noqa: ASYNC109
        """Create (or adopt) a Job, wait until it completes, delete it; a failure quotes its log.

        Returns the termination message of the Job's container ``step`` ('' if none).
        """
        job = await self._create(JOBS, body)
        job_name = job["metadata"]["name"]

        def finished(obj: Obj | None) -> bool | None:
            if obj is None:
                raise _PodFailed("the Job was deleted before it finished")
            status = obj.get("status") or {}
            for condition in status.get("conditions") or []:
                if condition.get("status") == "True" and condition.get("type") == "Complete":
                    return True
                if condition.get("status") == "True" and condition.get("type") == "Failed":
                    raise _PodFailed(str(condition.get("reason") or "the command failed"))
            return True if status.get("succeeded") else None

        try:
            await self._wait_for(
                JOBS, job_name, finished, timeout=timeout + 60, waiting_for="complete"
            )
        except _PodFailed as exc:
            tail = await self._job_log(job_name, step)
            await self._delete(JOBS, job_name)
            raise ProviderError(
                f'{step} Job "{job_name}" failed ({exc.reason}); log tail: {tail or "(empty)"}'
            ) from None
        message = await self._job_message(job_name, step)
        await self._delete(JOBS, job_name)
        return message

    async def _job_message(self, job_name: str, step: str) -> str:
        """The termination message container ``step`` of the Job's pod left, '' if none."""
        pods = await self._client.call("list", PODS, label_selector=f"job-name={job_name}")
        for pod in _live(pods):
            for status in (pod.get("status") or {}).get("containerStatuses") or []:
                terminated = (status.get("state") or {}).get("terminated") or {}
                if status.get("name") == step and terminated.get("exitCode") == 0:
                    return str(terminated.get("message") or "")
        return ""

    async def _job_log(self, job_name: str, step: str) -> str:
        pods = await self._client.call("list", PODS, label_selector=f"job-name={job_name}")
        for pod in pods.get("items") or []:
            container = step
            for init in (pod.get("status") or {}).get("initContainerStatuses") or []:
                terminated = (init.get("state") or {}).get("terminated") or {}
                if terminated.get("exitCode"):
                    container = init["name"]
            return await self._client.pod_log(
                pod["metadata"]["name"], container, self._settings.log_tail_lines
            )
        return ""

    async def seal(self, volume: str, snapshot: str, meta: Mapping[str, str]) -> Resource:
        volume_name, snapshot_name = self._object_name(volume), self._object_name(snapshot)
        self._codec.check(meta)
        log.info("kubernetes.seal", volume=volume, snapshot=snapshot)
        try:
            await self._client.call("read", SNAPSHOTS, snapshot_name)
        except (
            NotFoundError
        ):  # not sealed before: the volume must exist (else it would never be ready)
            try:
                await self._read_kind(PVCS, Kind.VOLUME, volume_name)
            except NotFoundError:
                raise NotFoundError(
                    f"volume {volume!r} does not exist, so it cannot be sealed into {snapshot!r}."
                ) from None
        await self._delete(PODS, volume_name, grace=self._settings.stop_grace_seconds)
        await self._wait_pod_gone(volume_name, self._settings.stop_grace_seconds)
        body = manifests.volume_snapshot(self._settings, volume, snapshot, meta)
        await self._create(SNAPSHOTS, body)

        def ready(obj: Obj | None) -> Obj | None:
            if obj is None:
                raise _PodFailed("it was deleted while being taken")
            status = obj.get("status") or {}
            if (status.get("error") or {}).get("message"):
                raise _PodFailed(str(status["error"]["message"]))
            return obj if status.get("readyToUse") else None

        try:
            sealed = await self._wait_for(
                SNAPSHOTS,
                snapshot_name,
                ready,
                timeout=self._settings.snapshot_timeout_seconds,
                waiting_for="readyToUse",
            )
        except _PodFailed as exc:
            raise ProviderError(f'VolumeSnapshot "{snapshot_name}" failed: {exc.reason}.') from None
        await self._delete_secret(volume_name)
        await self._delete(PVCS, volume_name)
        return self._resource(Kind.SNAPSHOT, sealed, None)

    async def clone(self, snapshot: str, name: str, meta: Mapping[str, str]) -> Endpoint:
        snap = await self._client.call("read", SNAPSHOTS, self._object_name(snapshot))
        if _terminating(snap):  # the provisioner would refuse it: the PVC would stay Pending
            raise NotFoundError(
                f"snapshot {snapshot!r} is being deleted, so clone {name!r} cannot be made "
                "from it; clone a newer snapshot."
            )
        log.info("kubernetes.clone", snapshot=snapshot, clone=name)
        restore_size = (snap.get("status") or {}).get("restoreSize")
        database = self._codec.decode(snap).get(RESTORE_DATABASE)
        body = manifests.pvc(
            self._settings,
            Kind.CLONE,
            name,
            meta,
            snapshot=snap["metadata"]["name"],
            restore_size=str(restore_size) if restore_size else None,
            database=database if database != self._settings.application.database else None,
        )
        claim = await self._create(PVCS, body)
        self._note_database(claim)
        if self._per_clone:  # the pod's init container sets these passwords before it starts
            keys = [
                (manifests.LOGIN_PASSWORD, manifests.LOGIN_VERIFIER),
                (manifests.ADMIN_PASSWORD, manifests.ADMIN_VERIFIER),
            ]
            await self._make_secret(Kind.CLONE, name, claim, keys)
        pod = manifests.database_pod(
            self._settings, Kind.CLONE, name, claim, lease_superuser=self._lease_superuser
        )
        await self._create(PODS, pod)
        endpoint = await self._endpoint(self._object_name(name))
        self._not_ready -= {self._object_name(name)}
        return endpoint

    async def restart(self, name: str) -> Endpoint:
        """Give clone ``name`` a database pod again on its PVC, if its pod is gone or stopped.

        An evicted pod stays as phase ``Failed`` and a pod on a lost node is
        deleted: either way the PVC (the data) remains. A stopped pod is
        deleted and waited for; a pod still running is only waited for.
        """
        object_name = self._object_name(name)
        claim = await self._read_kind(PVCS, Kind.CLONE, object_name)  # NotFoundError: data gone
        try:
            pod: Obj | None = await self._client.call("read", PODS, object_name)
        except NotFoundError:
            pod = None
        if pod is not None and manifests.is_ours(self._settings, pod, Kind.CLONE.value):
            stopped = (pod.get("status") or {}).get("phase") in ("Failed", "Succeeded")
            if stopped:
                await self._delete(PODS, object_name)
            if stopped or pod["metadata"].get("deletionTimestamp"):
                await self._wait_pod_gone(object_name, self._settings.destroy_grace_seconds)
                pod = None
        if pod is None:
            log.info("kubernetes.restart", clone=name)
            body = manifests.database_pod(
                self._settings, Kind.CLONE, name, claim, lease_superuser=self._lease_superuser
            )
            await self._create(PODS, body)  # its init container sets the Secret's passwords again
        await self._read_credentials(object_name)
        endpoint = await self._endpoint(object_name)
        self._not_ready -= {object_name}
        return endpoint

    async def protect(self, name: str) -> None:
        """A PodDisruptionBudget for clone ``name``'s pod, so that drains do not evict it."""
        await self._create(BUDGETS, manifests.disruption_budget(self._settings, name))

    async def check(self, name: str, command: Command) -> None:
        endpoint = await self._endpoint(self._object_name(name))
        body = manifests.check_job(self._settings, name, command, endpoint.environ())
        await self._run_job(body, "check", command.timeout_seconds)

    async def is_healthy(self, name: str) -> bool:
        try:
            pod = await self._client.call("read", PODS, self._object_name(name))
        except NotFoundError:
            return False
        return not _terminating(pod) and _ready_ip(pod) is not None

    def alive(self, name: str) -> bool:
        """Whether clone ``name``'s pod was ready when this provider last saw it (no API call).

        The provider keeps no pod watch: it knows a pod's readiness from making
        the clone and from its last ``list()`` of clones (every
        ``pool.refresh_interval`` with several replicas). A pod that died since is
        only found by :meth:`is_healthy` (the health loop); the kubelet restarts a
        crashed database container in place (``restartPolicy: Always``), on the
        same data. A clone it has not seen counts as alive (it cannot know).
        """
        try:
            return self._object_name(name) not in self._not_ready
        except ProviderError:
            return False

    async def record_failed_snapshot(self, name: str, meta: Mapping[str, str]) -> Resource:
        """A ConfigMap that holds only the failed snapshot's meta (no data, nothing to clone)."""
        self._codec.check(meta)
        body = manifests.failed_snapshot_record(self._settings, name, meta)
        log.info("kubernetes.record_failed_snapshot", snapshot=name)
        record = await self._create(CONFIGMAPS, body)
        self._remember(CONFIGMAPS, record)
        return self._resource(Kind.SNAPSHOT, record, None)

    async def set_meta(
        self, kind: Kind, name: str, meta: Mapping[str, str], *, expect_version: str | None = None
    ) -> Resource:
        object_name = self._object_name(name)
        self._codec.check(meta)
        for _ in range(8):
            plural, obj = await self._meta_object(kind, object_name, expect_version)
            version = str(obj["metadata"]["resourceVersion"])
            if expect_version is not None and version != expect_version:
                raise ConflictError(
                    f"{kind.value} {name!r} changed since version {expect_version} (now {version}); "
                    "read it again before writing."
                )
            labels, annotations = self._codec.encode(meta, obj)
            if kind is Kind.SNAPSHOT and "status" in meta:
                labels["status"] = meta["status"] if label_value_ok(meta["status"]) else None
            patch = {
                "metadata": {
                    "resourceVersion": version,
                    "labels": labels,
                    "annotations": annotations,
                }
            }
            try:
                new = await self._client.call(
                    "patch", plural, object_name, body=patch, _content_type=MERGE_PATCH
                )
            except ConflictError:
                self._seen.pop((plural, object_name), None)
                current = await self._read_kind(plural, kind, object_name)
                if self._codec.decode(current) == dict(meta):
                    new = current  # our own write landed, its answer was lost and the retry saw 409
                elif expect_version is not None:
                    raise
                else:
                    continue
            except NotFoundError:
                self._seen.pop((plural, object_name), None)
                raise
            self._remember(plural, new)
            endpoint = None
            if kind is not Kind.SNAPSHOT:
                endpoint = self._endpoints.get(object_name) or await self._pod_endpoint(object_name)
            return self._resource(kind, new, endpoint)
        raise TemporaryProviderError(
            f"{kind.value} {name!r} kept changing while its meta was written; retry."
        )

    async def _meta_object(
        self, kind: Kind, object_name: str, expect_version: str | None
    ) -> tuple[str, Obj]:
        """The object holding ``kind``'s meta; the last one seen if it is at ``expect_version``.

        Skipping the read is safe: the patch carries the version, so the API
        server refuses it if the object changed since. It makes a hand-out one
        API call.
        """
        plurals = (SNAPSHOTS, CONFIGMAPS) if kind is Kind.SNAPSHOT else (PVCS,)
        if expect_version is not None:
            for plural in plurals:
                seen = self._seen.get((plural, object_name))
                if seen is not None and seen["metadata"]["resourceVersion"] == expect_version:
                    return plural, seen
        for plural in plurals:
            try:
                return plural, await self._read_kind(plural, kind, object_name)
            except NotFoundError:
                if plural == plurals[-1]:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _remember(self, plural: str, obj: Obj) -> None:
        self._seen[(plural, obj["metadata"]["name"])] = obj
        if plural == PVCS:
            self._note_database(obj)

    def _note_database(self, claim: Obj) -> None:
        """Remember the database a clone's leases get, from its PVC (:func:`database_annotation`)."""
        annotations = claim["metadata"].get("annotations") or {}
        database = annotations.get(manifests.database_annotation(self._settings))
        if database:
            self._databases[claim["metadata"]["name"]] = str(database)

    async def _read_kind(self, plural: str, kind: Kind, object_name: str) -> Obj:
        obj = dict(await self._client.call("read", plural, object_name))
        if not manifests.is_ours(self._settings, obj, kind.value):
            raise NotFoundError(f'{WHAT[plural]} "{object_name}" is not an aldaas {kind.value}.')
        if _terminating(obj):
            raise NotFoundError(f'{WHAT[plural]} "{object_name}" is being deleted.')
        self._remember(plural, obj)
        return obj

    async def _pod_endpoint(self, object_name: str) -> Endpoint | None:
        try:
            pod = await self._client.call("read", PODS, object_name)
        except NotFoundError:
            return None
        ip = None if _terminating(pod) else _ready_ip(pod)
        if not ip:
            return None
        await self._read_credentials(object_name)
        self._endpoints[object_name] = self._endpoint_at(ip, object_name)
        return self._endpoints[object_name]

    async def destroy(self, kind: Kind, name: str) -> None:
        object_name = self._object_name(name)
        log.info("kubernetes.destroy", kind=kind.value, name=name)
        if kind is Kind.SNAPSHOT:
            await self._check_not_restoring(object_name)
            for plural in (SNAPSHOTS, CONFIGMAPS):
                self._seen.pop((plural, object_name), None)
                await self._delete(plural, object_name)
            return
        self._seen.pop((PVCS, object_name), None)
        self._endpoints.pop(object_name, None)
        self._databases.pop(object_name, None)
        if kind is Kind.CLONE:
            self._not_ready |= {object_name}
        for step in ("restore", "check"):
            await self._delete(JOBS, self._object_name(name, f"-{step}"))
        await self._delete(PODS, object_name, grace=self._settings.destroy_grace_seconds)
        await self._delete_secret(object_name)
        await self._delete(PVCS, object_name)
        if kind is Kind.CLONE:
            await self._delete(BUDGETS, object_name)

    async def _delete_secret(self, object_name: str) -> None:
        """Delete a volume's or clone's Secret, before its PVC: the PVC owns it, so the garbage
        collector would delete it too, but only once the PVC is gone, at its own pace."""
        self._credentials.pop(object_name, None)
        if self._per_clone:
            await self._delete(SECRETS, object_name)

    async def _check_not_restoring(self, snapshot_name: str) -> None:
        """Refuse to delete a VolumeSnapshot a PVC is still being provisioned from."""
        pvcs = await self._client.call(
            "list", PVCS, label_selector=manifests.selector(self._settings)
        )
        for pvc in _live(pvcs):
            source = pvc["spec"].get("dataSource") or {}
            bound = (pvc.get("status") or {}).get("phase") == "Bound"
            if source.get("name") == snapshot_name and not bound:
                raise TemporaryProviderError(
                    f'VolumeSnapshot "{snapshot_name}" is still being restored into PVC '
                    f'"{pvc["metadata"]["name"]}"; it is deleted once that PVC is bound.',
                    delay=10.0,
                )

    async def list(self, kind: Kind | None = None) -> Sequence[Resource]:
        """Everything of this instance that is not being deleted (a deleted object may linger)."""
        resources: list[Resource] = []
        if kind is None:  # forget what others deleted; everything listed is remembered again
            self._seen.clear()
            self._endpoints.clear()
            self._credentials.clear()
        kind_label = f"{self._settings.label_prefix}kind"
        if kind in (None, Kind.VOLUME, Kind.CLONE):
            selector = manifests.selector(self._settings, kind.value if kind is not None else None)
            pvcs = await self._client.call("list", PVCS, label_selector=selector)
            pods = await self._client.call("list", PODS, label_selector=selector)
            ips = {p["metadata"]["name"]: _ready_ip(p) for p in _live(pods)}
            secrets: dict[str, dict[str, str]] = {}
            if self._per_clone:
                listed = await self._client.call("list", SECRETS, label_selector=selector)
                for secret in _live(listed):
                    secrets[secret["metadata"]["name"]] = manifests.secret_values(secret)
            not_ready: set[str] = set()
            for pvc in _live(pvcs):
                pvc_kind = (pvc["metadata"].get("labels") or {}).get(kind_label)
                if pvc_kind not in (Kind.VOLUME.value, Kind.CLONE.value):
                    continue
                object_name = pvc["metadata"]["name"]
                ip = ips.get(object_name)
                if object_name in secrets:
                    self._credentials[object_name] = secrets[object_name]
                else:
                    self._credentials.pop(object_name, None)
                if pvc_kind == Kind.CLONE.value and not ip:
                    not_ready.add(object_name)
                self._remember(PVCS, pvc)
                endpoint = self._endpoint_at(ip, object_name) if ip else None
                if endpoint is not None and endpoint.password is None and self._per_clone:
                    # A clone made before per-clone credentials (no Secret): a live lease keeps
                    # its address; as a warm clone it is not offered (replaced).
                    status = self._codec.decode(pvc).get(STATUS)
                    endpoint = endpoint if status == CloneState.LEASED.value else None
                if endpoint is not None:
                    self._endpoints[object_name] = endpoint
                resources.append(self._resource(Kind(pvc_kind), pvc, endpoint))
            if kind in (None, Kind.CLONE):  # every clone was listed: replace what alive() knows
                self._not_ready = frozenset(not_ready)
        if kind in (None, Kind.SNAPSHOT):
            selector = manifests.selector(self._settings, Kind.SNAPSHOT.value)
            records = {
                c["metadata"]["name"]: c
                for c in _live(await self._client.call("list", CONFIGMAPS, label_selector=selector))
            }
            for snapshot in _live(
                await self._client.call("list", SNAPSHOTS, label_selector=selector)
            ):
                if (
                    snapshot["metadata"]["name"] not in records
                ):  # a failed record wins over leftovers
                    self._remember(SNAPSHOTS, snapshot)
                    resources.append(self._snapshot_resource(snapshot))
            for record in records.values():
                self._remember(CONFIGMAPS, record)
                resources.append(self._resource(Kind.SNAPSHOT, record, None))
        return resources

    def _snapshot_resource(self, snapshot: Obj) -> Resource:
        """A listed VolumeSnapshot; one made before per-clone credentials gets a status the pool
        does not know, so that it is deleted and its backup restored again under the role model
        (its only login is the image's superuser, with the password every clone shared)."""
        resource = self._resource(Kind.SNAPSHOT, snapshot, None)
        annotations = snapshot["metadata"].get("annotations") or {}
        if not self._per_clone or manifests.credentials_annotation(self._settings) in annotations:
            return resource
        log.warning(
            "kubernetes.snapshot_before_per_clone_credentials",
            snapshot=resource.name,
            status=resource.meta.get(STATUS),
        )
        meta = {**resource.meta, STATUS: LEGACY_SNAPSHOT_STATUS}
        return attrs.evolve(resource, meta=meta)

    def _resource(self, kind: Kind, obj: Obj, endpoint: Endpoint | None) -> Resource:
        metadata = obj["metadata"]
        labels = metadata.get("labels") or {}
        status = obj.get("status") or {}
        if kind is Kind.SNAPSHOT:
            size = _size(status.get("restoreSize"))
        else:
            size = _size((status.get("capacity") or {}).get("storage"))
        return Resource(
            kind=kind,
            name=labels.get(f"{self._settings.label_prefix}name", metadata["name"]),
            meta=self._codec.decode(obj),
            version=str(metadata["resourceVersion"]),
            endpoint=endpoint,
            size_bytes=size,
        )

    async def aclose(self) -> None:
        self._client.close()


def _implements_provider(provider: KubernetesProvider) -> Provider:
    return provider  # mypy proves KubernetesProvider satisfies the Provider protocol


def _implements_liveness(provider: KubernetesProvider) -> Liveness:
    return provider  # ... and the optional Liveness one


def _implements_restartable(provider: KubernetesProvider) -> Restartable:
    return provider  # ... and Restartable: a leased clone's PVC outlives its pod
