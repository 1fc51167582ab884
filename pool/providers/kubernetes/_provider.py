"""The Kubernetes provider and Lease-based leader election: the only module that imports ``kubernetes``.

Object mapping (docs/kubernetes-provider.md has the full table):

- volume  = PVC ``<instance>-<name>`` + database pod of the same name;
- snapshot = VolumeSnapshot ``<instance>-<name>`` (snapshot.storage.k8s.io/v1);
- clone   = PVC with ``dataSource`` the snapshot + database pod;
- restore and check = batch/v1 Jobs running the configured command against the pod IP.

A resource's ``meta`` lives in labels (short values of :attr:`label_meta_keys`)
and annotations (everything else) of its PVC or VolumeSnapshot (or, for a
failed snapshot's record, a ConfigMap), and its ``version`` is that object's
resourceVersion. The PVC, not the pod, carries a clone's meta: the kubelet
rewrites pod status all the time, which would make a compare-and-set on the pod
lose for no reason.

The official client is synchronous. Every call runs in a worker thread behind a
:class:`trio.CapacityLimiter`; the client's connection pool is split between
watches and calls so that waits never starve a hand-out. Calls have a request
timeout; watches carry ``timeoutSeconds`` and, when cancelled, shut their
socket down so that no thread stays blocked on it.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import math
import re
import socket
import threading
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import attrs
import structlog
import trio
import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.utils.quantity import parse_quantity
from kubernetes.watch.watch import iter_resp_lines

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
    RestoreProgress,
    Source,
    TemporaryProviderError,
)
from ._settings import KubernetesSettings, ResourceSettings

log = structlog.get_logger()

Obj = dict[str, Any]
T = TypeVar("T")

PVCS = "persistentvolumeclaims"
PODS = "pods"
JOBS = "jobs"
SNAPSHOTS = "volumesnapshots"
LEASES = "leases"
CONFIGMAPS = "configmaps"
SNAPSHOT_GROUP = "snapshot.storage.k8s.io"
MERGE_PATCH = "application/merge-patch+json"

_SINGULAR = {
    PVCS: "persistent_volume_claim",
    PODS: "pod",
    JOBS: "job",
    LEASES: "lease",
    CONFIGMAPS: "config_map",
}
_WHAT = {
    PVCS: "PVC",
    PODS: "pod",
    JOBS: "Job",
    SNAPSHOTS: "VolumeSnapshot",
    LEASES: "Lease",
    CONFIGMAPS: "ConfigMap",
}
_LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_META_KEY = re.compile(r"^[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_DNS_NAME = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$")
_RESERVED_META = frozenset({"kind", "name", "instance", "created-by"})
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


RBAC_RULES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("", "persistentvolumeclaims", ("get", "list", "create", "patch", "delete")),
    ("", "pods", ("get", "list", "watch", "create", "delete")),
    ("", "pods/log", ("get",)),
    ("", "configmaps", ("get", "list", "create", "patch", "delete")),
    ("batch", "jobs", ("get", "list", "watch", "create", "delete")),
    (SNAPSHOT_GROUP, "volumesnapshots", ("get", "list", "watch", "create", "patch", "delete")),
    ("coordination.k8s.io", "leases", ("get", "create", "update")),
)
"""(apiGroup, resource, verbs) of every call this module makes: the Role the broker needs."""


class _Gone(Exception):
    """A watch's resourceVersion is too old (410 Gone): re-list, then watch again."""


class _PodFailed(Exception):
    def __init__(self, reason: str, container: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.container = container


# -- errors ------------------------------------------------------------------------------------


def _translate(
    exc: BaseException, verb: str, what: str, timeout: float, host: str = ""
) -> ProviderError:
    """Map a client exception to the provider's errors, in one sentence."""
    if isinstance(exc, ApiException):
        status = exc.status or 0
        message = _status_message(exc)
        if status == 404:
            return NotFoundError(f"{what} does not exist (HTTP 404 on {verb}).")
        if status == 409:
            return ConflictError(
                f"{what} was changed or created by someone else first (HTTP 409 on {verb}: "
                f"{message}); read it again before writing."
            )
        if status == 410:
            return TemporaryProviderError(
                f"the Kubernetes API expired the version of {what} (HTTP 410)."
            )
        if status == 429 or status >= 500 or status == 0:
            delay = 1.0
            retry_after = (exc.headers or {}).get("Retry-After") if exc.headers else None
            if retry_after and retry_after.isdigit():
                delay = float(retry_after)
            return TemporaryProviderError(
                f"the Kubernetes API answered HTTP {status} to {verb} {what} ({message}); retrying is safe.",
                delay=delay,
            )
        if status in (401, 403):
            return ProviderError(
                f"the broker's service account may not {verb} {what} (HTTP {status}); grant the verb "
                "in its Role as listed in docs/kubernetes-provider.md."
            )
        return ProviderError(
            f"the Kubernetes API refused to {verb} {what} (HTTP {status}: {message})."
        )
    reason = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) else exc
    if isinstance(reason, urllib3.exceptions.NewConnectionError) or (
        isinstance(exc, urllib3.exceptions.MaxRetryError)
        and not isinstance(reason, urllib3.exceptions.TimeoutError)
    ):
        # Checked before timeouts: urllib3's NewConnectionError (refused, no route, unknown
        # host) is a ConnectTimeoutError too, but nothing was slow, nobody listened.
        at = f" at {_shown_host(host)}" if host else ""
        return TemporaryProviderError(
            f"the Kubernetes API{at} could not be reached to {verb} {what} "
            f"({_cause_text(reason)}); retrying is safe."
        )
    if isinstance(exc, urllib3.exceptions.TimeoutError | urllib3.exceptions.MaxRetryError):
        return TemporaryProviderError(
            f"the Kubernetes API did not answer {verb} {what} within {timeout:g} s; retrying is safe."
        )
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        return TemporaryProviderError(
            f"the connection to the Kubernetes API broke during {verb} {what} ({exc!r}); retrying is safe."
        )
    raise exc


def _cause_text(exc: BaseException | None) -> str:
    """Why a connection failed, without urllib3's ``<... object at 0x...>:`` prefix."""
    cause = exc.__cause__ or exc.__context__ if exc is not None else None
    if isinstance(cause, OSError) and cause.strerror:
        return str(cause.strerror)
    text = re.sub(r"^<[^>]*>: ", "", str(exc))
    return text.removeprefix("Failed to establish a new connection: ")[:200] or "no reason given"


def _shown_host(host: str) -> str:
    """The API server's URL as safe to show: any user:password@ part is dropped."""
    parts = urllib.parse.urlsplit(host)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/")


def _status_message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return str(message or exc.reason or "no message")


# -- settings that become names, label keys and selectors -----------------------------------

_SUBDOMAIN = re.compile(r"^[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?$")
_RULE_LABEL = (
    "at most 63 lower-case letters, digits and '-', starting and ending with a letter or digit"
)


def _check_names(settings: KubernetesSettings) -> None:
    """Refuse naming settings that are not valid Kubernetes names (they end up in URL paths,
    object names, label keys and label selectors, where a ',' or '=' would change a query)."""
    rules: list[tuple[str, str, bool, str]] = [
        ("namespace", settings.namespace, bool(_DNS_NAME.match(settings.namespace)), _RULE_LABEL),
        ("instance", settings.instance, bool(_DNS_NAME.match(settings.instance)), _RULE_LABEL),
        (
            "label_prefix",
            settings.label_prefix,
            settings.label_prefix == ""
            or (
                settings.label_prefix.endswith("/")
                and bool(_SUBDOMAIN.match(settings.label_prefix[:-1]))
            ),
            "'' or a DNS subdomain followed by '/', e.g. 'aldaas.io/'",
        ),
        (
            "leader_election.lease_name",
            settings.leader_election.lease_name,
            bool(_SUBDOMAIN.match(settings.leader_election.lease_name)),
            "lower-case letters, digits, '-' and '.'",
        ),
    ]
    rules += [
        (
            "label_meta_keys",
            key,
            bool(_META_KEY.match(key)),
            "1-63 letters, digits, '-', '_' or '.'",
        )
        for key in settings.label_meta_keys
    ]
    for setting, value, ok, rule in rules:
        if not ok:
            shown = value if len(value) <= 80 else value[:80] + "…"
            raise ProviderError(
                f"kubernetes setting {setting} is {shown!r}, which is not valid in Kubernetes "
                f"names and labels; use {rule}."
            )


# -- the thin, thread-offloading client ------------------------------------------------------


class _Client:
    """Runs official-client calls in threads, with retries, error translation and raw JSON."""

    def __init__(self, settings: KubernetesSettings, api_client: Any | None) -> None:
        _check_names(settings)  # before any request, and before any client is built
        self._settings = settings
        self._owned = api_client is None
        if api_client is None:
            configuration = k8s.Configuration()
            if settings.kubeconfig:
                k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=settings.kubeconfig, client_configuration=configuration
                )
            else:
                try:
                    k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
                except k8s_config.ConfigException:
                    k8s_config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            configuration.connection_pool_maxsize = settings.api_connections
            configuration.retries = False  # retried here, with back-off and a log line per retry
            api_client = k8s.ApiClient(configuration)
        self.api_client = api_client
        self.host = str(getattr(api_client.configuration, "host", "") or "")
        pool_size = getattr(api_client.configuration, "connection_pool_maxsize", None)
        # The connection pool is shared: half of it for watches (each holds a connection and a
        # thread for up to watch_timeout_seconds), half for calls, so that waits for pods never
        # starve a hand-out's single PATCH.
        size = max(2, int(pool_size or settings.api_connections))
        self.watch_limiter = trio.CapacityLimiter(size // 2)
        self.limiter = trio.CapacityLimiter(size - size // 2)
        self._in_slot = trio.CapacityLimiter(math.inf)  # threads of a watch already holding a slot
        self.core = k8s.CoreV1Api(api_client)
        self.batch = k8s.BatchV1Api(api_client)
        self.custom = k8s.CustomObjectsApi(api_client)
        self.coordination = k8s.CoordinationV1Api(api_client)
        self.namespace = settings.namespace
        self.watch_threads = 0
        """Watch reader threads running now (0 once every watch has been stopped)."""

    def close(self) -> None:
        if self._owned:
            self.api_client.close()

    def _method(self, verb: str, plural: str) -> tuple[Callable[..., Any], dict[str, Any]]:
        if plural == SNAPSHOTS:
            name = {"read": "get", "replace": "replace"}.get(verb, verb)
            fn = getattr(self.custom, f"{name}_namespaced_custom_object")
            return fn, {
                "group": SNAPSHOT_GROUP,
                "version": "v1",
                "namespace": self.namespace,
                "plural": plural,
            }
        api = {
            PODS: self.core,
            PVCS: self.core,
            CONFIGMAPS: self.core,
            JOBS: self.batch,
            LEASES: self.coordination,
        }[plural]
        return getattr(api, f"{verb}_namespaced_{_SINGULAR[plural]}"), {"namespace": self.namespace}

    def _invoke(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        response = fn(
            **kwargs,
            _preload_content=False,
            _request_timeout=self._settings.request_timeout_seconds,
        )
        try:
            data = response.data
        finally:
            response.release_conn()
        return data

    async def call(self, verb: str, plural: str, name: str | None = None, **kwargs: Any) -> Any:
        """One API call; JSON-decoded result (text for logs). Retries temporary failures."""
        fn, base = self._method(verb, plural)
        if name is not None:
            base["name"] = name
        what = f'{_WHAT[plural]} "{name}"' if name else f"{_WHAT[plural]}s"
        data = await self._retrying(
            verb, what, functools.partial(self._invoke, fn, {**base, **kwargs})
        )
        return json.loads(data) if data else {}

    async def pod_log(self, name: str, container: str, tail: int) -> str:
        """The last ``tail`` lines of a container's log, or an empty string if there is none."""

        def read() -> Any:
            return self._invoke(
                self.core.read_namespaced_pod_log,
                {
                    "name": name,
                    "namespace": self.namespace,
                    "container": container,
                    "tail_lines": tail,
                },
            )

        try:
            data = await self._retrying("read the log of", f'pod "{name}"', read)
        except ProviderError:
            return ""
        lines = data.decode("utf-8", "replace").strip().splitlines()
        return " | ".join(line.strip() for line in lines if line.strip())

    async def _retrying(
        self,
        verb: str,
        what: str,
        job: Callable[[], T],
        limiter: trio.CapacityLimiter | None = None,
    ) -> T:
        timeout = self._settings.request_timeout_seconds
        for attempt in range(1, self._settings.api_retries + 1):
            try:
                try:
                    # Abandoned on cancellation: a call hung in the API (no answer, no error)
                    # must not hold up a cancelled pool or a leader stepping down for
                    # request_timeout_seconds. The thread ends by itself at that timeout and
                    # only then gives its limiter slot back.
                    return await trio.to_thread.run_sync(
                        job, limiter=limiter or self.limiter, abandon_on_cancel=True
                    )
                except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
                    raise _translate(exc, verb, what, timeout, self.host) from exc
            except TemporaryProviderError as exc:
                if attempt >= self._settings.api_retries:
                    log.warning(
                        "kubernetes.api_gave_up",
                        verb=verb,
                        what=what,
                        attempts=attempt,
                        error=str(exc),
                    )
                    raise
                delay = min(self._settings.api_retry_delay_seconds * 2 ** (attempt - 1), 10.0)
                log.warning(
                    "kubernetes.api_retry", verb=verb, what=what, attempt=attempt, error=str(exc)
                )
                await trio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def watch(
        self,
        plural: str,
        handle: Callable[[str, Obj], T | None],
        *,
        resource_version: str,
        timeout_seconds: int,
        field_selector: str | None = None,
        label_selector: str | None = None,
    ) -> T | None:
        """One watch, holding one of the watch slots (a connection and a thread) throughout."""
        async with self.watch_limiter:
            return await self._watch(
                plural,
                handle,
                resource_version=resource_version,
                timeout_seconds=timeout_seconds,
                field_selector=field_selector,
                label_selector=label_selector,
            )

    async def _watch(
        self,
        plural: str,
        handle: Callable[[str, Obj], T | None],
        *,
        resource_version: str,
        timeout_seconds: int,
        field_selector: str | None = None,
        label_selector: str | None = None,
    ) -> T | None:
        """One watch request: the first non-None ``handle(type, object)``, or None when it times out.

        Raises :class:`_Gone` on 410 Gone. Cancelling it shuts the socket down
        so the reader thread returns at once.
        """
        fn, kwargs = self._method("list", plural)
        kwargs.update(
            watch=True,
            resource_version=resource_version,
            timeout_seconds=timeout_seconds,
            allow_watch_bookmarks=True,
            _preload_content=False,
            _request_timeout=(self._settings.request_timeout_seconds, timeout_seconds + 30),
        )
        if field_selector:
            kwargs["field_selector"] = field_selector
        if label_selector:
            kwargs["label_selector"] = label_selector
        what = f"{_WHAT[plural]}s"

        def open_watch() -> Any:
            try:
                return fn(**kwargs)
            except ApiException as exc:
                if exc.status == 410:  # some servers refuse an expired version before streaming
                    return None
                raise

        response = await self._retrying("watch", what, open_watch, limiter=self._in_slot)
        if response is None:
            raise _Gone()
        send, receive = trio.open_memory_channel[Obj](math.inf)
        stopped = threading.Event()
        timeout = timeout_seconds + 30.0

        def pump() -> None:
            try:
                for line in iter_resp_lines(response):  # type: ignore[no-untyped-call]
                    if line:
                        trio.from_thread.run_sync(send.send_nowait, json.loads(line))
            except (urllib3.exceptions.HTTPError, OSError, ValueError, trio.BrokenResourceError):
                if not stopped.is_set():
                    raise
            finally:
                trio.from_thread.run_sync(send.close)

        failures: list[Exception] = []

        async def run_pump() -> None:
            self.watch_threads += 1
            try:
                await trio.to_thread.run_sync(pump, limiter=self._in_slot)
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                failures.append(_translate(exc, "watch", what, timeout, self.host))
            finally:
                self.watch_threads -= 1

        result: T | None = None
        try:
            # Nothing is raised inside the nursery (it would arrive wrapped in an
            # ExceptionGroup): failures are collected and raised once it has closed.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_pump)
                try:
                    async with receive:
                        async for event in receive:
                            kind, obj = event.get("type", ""), event.get("object") or {}
                            if kind == "ERROR":
                                failures.append(_watch_error(obj, what))
                                break
                            if kind == "BOOKMARK":
                                continue
                            try:
                                result = handle(kind, obj)
                            except Exception as exc:
                                failures.append(exc)
                                break
                            if result is not None:
                                break
                finally:
                    stopped.set()
                    _shutdown(response)
        finally:
            response.close()
            response.release_conn()
        if failures:
            raise failures[0]
        return result


def _watch_error(status: Obj, what: str) -> Exception:
    if status.get("code") == 410:
        return _Gone()
    return TemporaryProviderError(
        f"a watch on {what} failed ({status.get('message', 'no message')}); it is retried."
    )


def _shutdown(response: Any) -> None:
    """Unblock a thread reading ``response`` (urllib3 >= 2.3 has ``shutdown``; else the socket)."""
    try:
        response.shutdown()
        return
    except (AttributeError, ValueError, RuntimeError, OSError):
        pass
    sock = getattr(getattr(response, "connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


# -- meta <-> labels/annotations -------------------------------------------------------------


def _label_value_ok(value: str) -> bool:
    return len(value) <= 63 and _LABEL_VALUE.match(value) is not None


@attrs.frozen
class _Codec:
    """Where each meta key lives: a label (short, selectable) or an annotation (anything)."""

    prefix: str
    label_keys: frozenset[str]

    def check(self, meta: Mapping[str, str]) -> None:
        for key in meta:
            if key in _RESERVED_META or not _META_KEY.match(key):
                raise ProviderError(
                    f"meta key {key!r} cannot be stored on Kubernetes objects; use 1-63 letters, digits, "
                    f"'-', '_' or '.', not one of {sorted(_RESERVED_META)}."
                )

    def encode(self, meta: Mapping[str, str], old: Obj | None = None) -> tuple[Obj, Obj]:
        """Labels and annotations for ``meta``; keys of ``old`` no longer present are set to None."""
        self.check(meta)
        labels: Obj = {}
        annotations: Obj = {}
        if old is not None:
            for key in self.decode(old):
                labels[self.prefix + key] = None
                annotations[self.prefix + key] = None
        for key, value in meta.items():
            if key in self.label_keys and _label_value_ok(value):
                labels[self.prefix + key] = value
                annotations[self.prefix + key] = None
            else:
                annotations[self.prefix + key] = value
                labels[self.prefix + key] = None
        if old is None:
            labels = {k: v for k, v in labels.items() if v is not None}
            annotations = {k: v for k, v in annotations.items() if v is not None}
        return labels, annotations

    def decode(self, obj: Obj) -> dict[str, str]:
        metadata = obj.get("metadata") or {}
        meta: dict[str, str] = {}
        for source in (metadata.get("annotations") or {}, metadata.get("labels") or {}):
            for key, value in source.items():
                if key.startswith(self.prefix) and key[len(self.prefix) :] not in _RESERVED_META:
                    meta.setdefault(key[len(self.prefix) :], str(value))
        return meta


def _resources(settings: ResourceSettings) -> Obj:
    return {"requests": dict(settings.requests), "limits": dict(settings.limits)}


def _live(listing: Obj) -> list[Obj]:
    """Items of a list answer that are not being deleted."""
    return [o for o in listing.get("items") or [] if not o["metadata"].get("deletionTimestamp")]


def _ready_ip(pod: Obj) -> str | None:
    status = pod.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    ip = status.get("podIP")
    return str(ip) if ready and ip else None


def _size(quantity: Any) -> int | None:
    if not quantity:
        return None
    try:
        return int(parse_quantity(str(quantity)))  # type: ignore[no-untyped-call]
    except ValueError:
        return None


def _utcnow_micro() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- the provider ----------------------------------------------------------------------------


class KubernetesProvider:
    """:class:`pool.Provider` on a Kubernetes cluster (PVCs, VolumeSnapshots, pods, Jobs)."""

    def __init__(self, settings: KubernetesSettings, api_client: Any | None = None) -> None:
        self._settings = settings
        self._client = _Client(settings, api_client)
        self._codec = _Codec(settings.label_prefix, frozenset(settings.label_meta_keys))
        self._seen: dict[tuple[str, str], Obj] = {}
        """Last state seen of each meta-holding object, so a compare-and-set needs no read first."""
        self._endpoints: dict[str, Endpoint] = {}
        """Pod endpoints seen, by object name (pods are never re-created under the same name)."""
        self._not_ready: frozenset[str] = frozenset()
        """Clones (object names) whose pod was not Ready at the last list, or destroyed since."""

    @property
    def name(self) -> str:
        return "kubernetes"

    @property
    def watch_threads(self) -> int:
        """How many watch reader threads run now; 0 whenever no watch is in progress."""
        return self._client.watch_threads

    # names and labels ------------------------------------------------------------------------
    def _object_name(self, name: str, suffix: str = "") -> str:
        full = f"{self._settings.instance}-{name}{suffix}"
        if not _DNS_NAME.match(full):
            raise ProviderError(
                f"{full!r} is not a valid Kubernetes object name; use lower-case letters, digits and "
                "'-', at most 63 characters including the instance prefix."
            )
        return full

    def _system_labels(self, kind: str, name: str) -> dict[str, str]:
        prefix = self._settings.label_prefix
        return {
            "app.kubernetes.io/managed-by": "aldaas",
            "aldaas": self._settings.instance,
            f"{prefix}instance": self._settings.instance,
            f"{prefix}kind": kind,
            f"{prefix}name": name,
        }

    def _selector(self, kind: str | None = None) -> str:
        prefix = self._settings.label_prefix
        parts = [
            "app.kubernetes.io/managed-by=aldaas",
            f"{prefix}instance={self._settings.instance}",
        ]
        if kind is not None:
            parts.append(f"{prefix}kind={kind}")
        return ",".join(parts)

    def _metadata(self, kind: str, name: str, meta: Mapping[str, str], suffix: str = "") -> Obj:
        labels, annotations = self._codec.encode(meta)
        status = meta.get("status")
        if kind == Kind.SNAPSHOT.value and status is not None and _label_value_ok(status):
            labels["status"] = status  # the original's `status=ready` label on snapshots
        annotations[f"{self._settings.label_prefix}created-by"] = self._settings.identity
        return {
            "name": self._object_name(name, suffix),
            "labels": {**labels, **self._system_labels(kind, name)},
            "annotations": annotations,
        }

    # object bodies -----------------------------------------------------------------------------
    def _pvc(self, kind: Kind, name: str, meta: Mapping[str, str], snapshot: Obj | None) -> Obj:
        size = self._settings.storage_size
        spec: Obj = {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": size}},
        }
        if self._settings.storage_class:
            spec["storageClassName"] = self._settings.storage_class
        if snapshot is not None:
            restore_size = (snapshot.get("status") or {}).get("restoreSize")
            if (_size(restore_size) or 0) > (_size(size) or 0):
                spec["resources"]["requests"]["storage"] = restore_size
            spec["dataSource"] = {
                "apiGroup": SNAPSHOT_GROUP,
                "kind": "VolumeSnapshot",
                "name": snapshot["metadata"]["name"],
            }
        return {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": self._metadata(kind.value, name, meta),
            "spec": spec,
        }

    def _database_pod(self, kind: Kind, name: str) -> Obj:
        app = self._settings.application
        if app.readiness_command:
            probe: Obj = {"exec": {"command": list(app.readiness_command)}}
        else:
            probe = {"tcpSocket": {"port": app.port}}
        probe.update(periodSeconds=2, failureThreshold=3, timeoutSeconds=2)
        container: Obj = {
            "name": "database",
            "image": app.image,
            "ports": [{"name": "database", "containerPort": app.port}],
            "env": [{"name": k, "value": v} for k, v in sorted(app.env.items())],
            "volumeMounts": [{"name": "data", "mountPath": app.mount, "subPath": app.sub_path}],
            "resources": _resources(app.resources),
            "readinessProbe": probe,
        }
        if app.pull_policy:
            container["imagePullPolicy"] = app.pull_policy
        if not app.sub_path:
            del container["volumeMounts"][0]["subPath"]
        if app.command:
            container["command"] = list(app.command)
        if app.args:
            container["args"] = list(app.args)
        if app.env_from_secret:
            container["envFrom"] = [{"secretRef": {"name": app.env_from_secret}}]
        spec: Obj = {
            "restartPolicy": "Always",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": self._settings.stop_grace_seconds,
            "containers": [container],
            "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": self._object_name(name)}}
            ],
        }
        if app.service_account:
            spec["serviceAccountName"] = app.service_account
        metadata = self._metadata(kind.value, name, {})
        return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}

    def _job(
        self, step: str, name: str, container: Obj, extra: Obj, deadline: float, meta: Obj
    ) -> Obj:
        settings = self._settings.restore if step == "restore" else self._settings.check
        container.update(
            name=step,
            image=settings.image or self._settings.application.image,
            resources=_resources(settings.resources),
        )
        if settings.command or settings.args:  # the original's values: run exactly as given
            container["command"] = [*settings.command, *settings.args]
        if self._settings.application.pull_policy and not settings.image:
            container["imagePullPolicy"] = self._settings.application.pull_policy
        if settings.env_from_secret:
            container["envFrom"] = [{"secretRef": {"name": settings.env_from_secret}}]
        metadata = self._metadata(step, name, {}, suffix=f"-{step}")
        metadata["annotations"].update(meta)
        pod_spec: Obj = {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "containers": [container],
            **extra,
        }
        labels = self._system_labels(step, name)
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": metadata,
            "spec": {
                "backoffLimit": 0,
                "activeDeadlineSeconds": max(1, math.ceil(deadline)),
                "ttlSecondsAfterFinished": 3600,
                "template": {"metadata": {"labels": labels}, "spec": pod_spec},
            },
        }

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
                except _Gone:
                    log.info("kubernetes.watch_expired", what=_WHAT[plural], name=object_name)
                    await trio.sleep(self._settings.api_retry_delay_seconds)  # never a tight loop
                    continue
                except TemporaryProviderError as exc:
                    log.warning(
                        "kubernetes.watch_failed",
                        what=_WHAT[plural],
                        name=object_name,
                        error=str(exc),
                    )
                    await trio.sleep(self._settings.api_retry_delay_seconds)
                    continue
                if result is not None:
                    return result
        raise ProviderError(
            f'{_WHAT[plural]} "{object_name}" did not become {waiting_for} within {timeout:g} s; '
            "see `kubectl describe` for why, or raise the timeout."
        )

    async def _wait_pod_ready(self, object_name: str) -> str:
        def check(pod: Obj | None) -> str | None:
            if pod is None:  # it was created (or adopted) before this wait began
                raise _PodFailed("it was deleted while starting", None)
            status = pod.get("status") or {}
            if status.get("phase") in ("Failed", "Succeeded"):
                raise _PodFailed(f"it stopped (phase {status['phase']})", "database")
            for container in status.get("containerStatuses") or []:
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

    async def _create(self, plural: str, body: Obj) -> Obj:
        """Create ``body``; an object of that name already there is adopted (idempotent steps)."""
        try:
            return dict(await self._client.call("create", plural, body=body))
        except ConflictError:
            name = body["metadata"]["name"]
            log.info("kubernetes.adopted", what=_WHAT[plural], name=name)
            return dict(await self._client.call("read", plural, name))

    async def _delete(self, plural: str, object_name: str, *, grace: int | None = None) -> None:
        kwargs: Obj = {"propagation_policy": "Background"}
        if grace is not None:
            kwargs["grace_period_seconds"] = grace
        with contextlib.suppress(NotFoundError):
            await self._client.call("delete", plural, object_name, **kwargs)

    async def _endpoint(self, object_name: str) -> Endpoint:
        ip = await self._wait_pod_ready(object_name)
        self._endpoints[object_name] = self._endpoint_at(ip)
        return self._endpoints[object_name]

    def _endpoint_at(self, ip: str) -> Endpoint:
        app = self._settings.application
        return Endpoint(
            host=ip, port=app.port, user=app.user, database=app.database, password=app.password
        )

    # Provider ----------------------------------------------------------------------------------
    async def create_volume(self, name: str, meta: Mapping[str, str]) -> Endpoint:
        log.info("kubernetes.create_volume", volume=name)
        await self._create(PVCS, self._pvc(Kind.VOLUME, name, meta, None))
        await self._create(PODS, self._database_pod(Kind.VOLUME, name))
        return await self._endpoint(self._object_name(name))

    async def restore(
        self,
        name: str,
        backup: Backup,
        source: Source,
        command: Command,
        progress: ProgressCallback,
    ) -> None:
        settings = self._settings.restore
        endpoint = await self._endpoint(self._object_name(name))
        if settings.backup_path:
            basename = settings.backup_path.rstrip("/").rsplit("/", 1)[-1]
        else:
            basename = re.sub(r"[^A-Za-z0-9._-]", "_", backup.key.rsplit("/", 1)[-1]) or "backup"
        fetched = f"{settings.backup_dir.rstrip('/')}/{basename}"
        path = settings.backup_path or fetched
        argv = list(command.argv)
        if settings.stdin_from_backup:
            argv = ["sh", "-c", 'exec "$@" < "$ALDAAS_BACKUP_FILE"', "aldaas-restore", *argv]
        env = {**endpoint.environ(), **settings.env, **command.env, "ALDAAS_BACKUP_FILE": path}
        mount: Obj = {"name": "backup", "mountPath": settings.backup_dir}
        fetch: Obj = {
            "name": "fetch",
            "image": self._settings.helper_image,
            "command": [*settings.fetch_command, "--key", backup.key, "--to", fetched],
            "env": [{"name": k, "value": v} for k, v in sorted(settings.fetch_env.items())],
            "volumeMounts": [mount],
            "resources": _resources(settings.resources),
        }
        secret = self._settings.s3_credentials_secret
        if secret and self._settings.s3_credentials_env:  # key names differ from the AWS_* names
            fetch["env"] += [
                {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
                for name, key in sorted(self._settings.s3_credentials_env.items())
            ]
        elif secret:
            fetch["envFrom"] = [{"secretRef": {"name": secret}}]
        if settings.backup_path:  # the one file, at the fixed path the original used
            mount = {"name": "backup", "mountPath": settings.backup_path, "subPath": basename}
        container: Obj = {
            "command": argv,
            "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
            "volumeMounts": [{**mount, "readOnly": True}],
        }
        extra = {"initContainers": [fetch], "volumes": [{"name": "backup", "emptyDir": {}}]}
        prefix = self._settings.label_prefix
        annotations = {f"{prefix}backup-key": backup.key, f"{prefix}backup-etag": backup.etag}
        body = self._job("restore", name, container, extra, command.timeout_seconds, annotations)
        started = trio.current_time()
        log.info(
            "kubernetes.restore_started", volume=name, backup=backup.key, source=source.description
        )
        progress(RestoreProgress(done_bytes=0, total_bytes=backup.size, elapsed_seconds=0.0))
        failure: ProviderError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                self._report_download, body["metadata"]["name"], backup, started, progress
            )
            try:
                await self._run_job(body, "restore", command.timeout_seconds)
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
        log.info(
            "kubernetes.restore_finished", volume=name, backup=backup.key, seconds=round(elapsed, 3)
        )

    async def _report_download(
        self, job_name: str, backup: Backup, started: float, progress: ProgressCallback
    ) -> None:
        """Report the download's progress from the fetch container's last log line, while it runs.

        ``aldaas fetch-backup`` prints ``progress DONE TOTAL`` lines; once the
        download is over, the restore command's own progress is not visible
        from outside the pod, so nothing more is reported until the Job ends.
        """
        last = 0
        while True:
            await trio.sleep(self._settings.progress_interval_seconds)
            try:
                pods = await self._client.call("list", PODS, label_selector=f"job-name={job_name}")
            except ProviderError:
                continue
            for pod in pods.get("items") or []:
                statuses = (pod.get("status") or {}).get("initContainerStatuses") or []
                running = any(
                    s.get("name") == "fetch" and "running" in (s.get("state") or {})
                    for s in statuses
                )
                if not running:
                    continue
                line = await self._client.pod_log(pod["metadata"]["name"], "fetch", 1)
                match = re.fullmatch(r"progress (\d+) (\d+)", line.strip())
                if match and int(match.group(1)) > last:
                    last = int(match.group(1))
                    total = int(match.group(2)) or backup.size
                    elapsed = trio.current_time() - started
                    progress(
                        RestoreProgress(done_bytes=last, total_bytes=total, elapsed_seconds=elapsed)
                    )

    async def _run_job(self, body: Obj, step: str, timeout: float) -> None:  # noqa: ASYNC109
        """Create (or adopt) a Job, wait until it completes, delete it; a failure quotes its log."""
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
        await self._delete(JOBS, job_name)

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
        await self._wait_for(
            PODS,
            volume_name,
            lambda pod: True if pod is None else None,
            timeout=self._settings.stop_grace_seconds + 60,
            waiting_for="deleted",
        )
        spec: Obj = {"source": {"persistentVolumeClaimName": volume_name}}
        if self._settings.snapshot_class:
            spec["volumeSnapshotClassName"] = self._settings.snapshot_class
        body = {
            "apiVersion": f"{SNAPSHOT_GROUP}/v1",
            "kind": "VolumeSnapshot",
            "metadata": self._metadata(Kind.SNAPSHOT.value, snapshot, meta),
            "spec": spec,
        }
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
        await self._delete(PVCS, volume_name)
        return self._resource(Kind.SNAPSHOT, sealed, None)

    async def clone(self, snapshot: str, name: str, meta: Mapping[str, str]) -> Endpoint:
        snap = await self._client.call("read", SNAPSHOTS, self._object_name(snapshot))
        log.info("kubernetes.clone", snapshot=snapshot, clone=name)
        await self._create(PVCS, self._pvc(Kind.CLONE, name, meta, snap))
        await self._create(PODS, self._database_pod(Kind.CLONE, name))
        endpoint = await self._endpoint(self._object_name(name))
        self._not_ready -= {self._object_name(name)}
        return endpoint

    async def check(self, name: str, command: Command) -> None:
        endpoint = await self._endpoint(self._object_name(name))
        env = {**endpoint.environ(), **self._settings.check.env, **command.env}
        container: Obj = {
            "command": list(command.argv),
            "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
        }
        body = self._job("check", name, container, {}, command.timeout_seconds, {})
        await self._run_job(body, "check", command.timeout_seconds)

    async def is_healthy(self, name: str) -> bool:
        try:
            pod = await self._client.call("read", PODS, self._object_name(name))
        except NotFoundError:
            return False
        return _ready_ip(pod) is not None

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
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": self._metadata(Kind.SNAPSHOT.value, name, meta),
            "data": {},
        }
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
                labels["status"] = meta["status"] if _label_value_ok(meta["status"]) else None
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

    async def _read_kind(self, plural: str, kind: Kind, object_name: str) -> Obj:
        obj = dict(await self._client.call("read", plural, object_name))
        metadata = obj.get("metadata") or {}
        labels = metadata.get("labels") or {}
        if labels.get(f"{self._settings.label_prefix}kind") != kind.value:
            raise NotFoundError(f'{_WHAT[plural]} "{object_name}" is not an aldaas {kind.value}.')
        if metadata.get("deletionTimestamp"):
            raise NotFoundError(f'{_WHAT[plural]} "{object_name}" is being deleted.')
        self._remember(plural, obj)
        return obj

    async def _pod_endpoint(self, object_name: str) -> Endpoint | None:
        try:
            pod = await self._client.call("read", PODS, object_name)
        except NotFoundError:
            return None
        ip = _ready_ip(pod)
        if not ip:
            return None
        self._endpoints[object_name] = self._endpoint_at(ip)
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
        if kind is Kind.CLONE:
            self._not_ready |= {object_name}
        for step in ("restore", "check"):
            await self._delete(JOBS, f"{object_name}-{step}")
        await self._delete(PODS, object_name, grace=self._settings.destroy_grace_seconds)
        await self._delete(PVCS, object_name)

    async def _check_not_restoring(self, snapshot_name: str) -> None:
        """Refuse to delete a VolumeSnapshot a PVC is still being provisioned from."""
        pvcs = await self._client.call("list", PVCS, label_selector=self._selector())
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
        kind_label = f"{self._settings.label_prefix}kind"
        if kind in (None, Kind.VOLUME, Kind.CLONE):
            selector = self._selector(kind.value if kind is not None else None)
            pvcs = await self._client.call("list", PVCS, label_selector=selector)
            pods = await self._client.call("list", PODS, label_selector=selector)
            ips = {p["metadata"]["name"]: _ready_ip(p) for p in _live(pods)}
            not_ready: set[str] = set()
            for pvc in _live(pvcs):
                pvc_kind = (pvc["metadata"].get("labels") or {}).get(kind_label)
                if pvc_kind not in (Kind.VOLUME.value, Kind.CLONE.value):
                    continue
                object_name = pvc["metadata"]["name"]
                ip = ips.get(object_name)
                if pvc_kind == Kind.CLONE.value and not ip:
                    not_ready.add(object_name)
                endpoint = self._endpoint_at(ip) if ip else None
                if endpoint is not None:
                    self._endpoints[object_name] = endpoint
                self._remember(PVCS, pvc)
                resources.append(self._resource(Kind(pvc_kind), pvc, endpoint))
            if kind in (None, Kind.CLONE):  # every clone was listed: replace what alive() knows
                self._not_ready = frozenset(not_ready)
        if kind in (None, Kind.SNAPSHOT):
            selector = self._selector(Kind.SNAPSHOT.value)
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
                    resources.append(self._resource(Kind.SNAPSHOT, snapshot, None))
            for record in records.values():
                self._remember(CONFIGMAPS, record)
                resources.append(self._resource(Kind.SNAPSHOT, record, None))
        return resources

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


# -- leader election -------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class LeaseRecord:
    """What a coordination.k8s.io/v1 Lease says about its holder."""

    holder: str
    duration_seconds: float
    renew_time: str
    transitions: int
    version: str


def may_take_lease(
    record: LeaseRecord | None,
    identity: str,
    observed_at: float,
    now: float,
    default_duration: float,
) -> bool:
    """Whether ``identity`` may write itself into the Lease now (client-go's rule).

    Expiry is judged by when *this* process last saw the record change (local
    monotonic time), never by comparing the holder's wall clock with ours.
    """
    if record is None or not record.holder or record.holder == identity:
        return True
    duration = record.duration_seconds or default_duration
    return observed_at + duration <= now


class LeaderElector:
    """Lease-based leader election among broker replicas.

    ``serve()`` acquires and renews the Lease and runs ``while_leader`` only
    while this replica holds it; ``is_leader`` and ``wait_elected()`` expose
    the state. On a clean exit a held Lease is released so a follower takes
    over at its next retry instead of waiting for the lease to expire.
    """

    def __init__(
        self,
        settings: KubernetesSettings,
        api_client: Any | None = None,
        *,
        identity: str | None = None,
        release_on_exit: bool = True,
    ) -> None:
        self._settings = settings
        self._election = settings.leader_election
        self._client = _Client(settings, api_client)
        self.identity = identity or settings.identity
        self._release_on_exit = release_on_exit
        self._observed: tuple[LeaseRecord | None, float] = (None, -math.inf)
        self._lease: Obj | None = None
        self.is_leader = False
        self._elected = trio.Event()
        self.transitions = 0
        """How many times this replica became leader."""

    async def wait_elected(self) -> None:
        """Return once this replica is the leader (at once if it already is)."""
        while not self.is_leader:
            await self._elected.wait()
            if not self.is_leader:
                self._elected = trio.Event()

    async def serve(
        self,
        while_leader: Callable[[], Awaitable[None]] | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        try:
            while True:
                await self._acquire()
                self._set_leader(True)
                try:
                    async with trio.open_nursery() as nursery:
                        if while_leader is not None:
                            nursery.start_soon(while_leader)
                        await self._renew_until_lost()
                        self._set_leader(False)  # stop claiming leadership before the work stops
                        nursery.cancel_scope.cancel()
                finally:
                    self._set_leader(False)
        finally:
            if self._release_on_exit:
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(self._election.retry_period_seconds),
                ):
                    await self._release()
            self._client.close()

    def _set_leader(self, leader: bool) -> None:
        if leader and not self.is_leader:
            self.transitions += 1
            log.info(
                "kubernetes.leader_elected", identity=self.identity, lease=self._election.lease_name
            )
        elif not leader and self.is_leader:
            log.warning(
                "kubernetes.leader_lost", identity=self.identity, lease=self._election.lease_name
            )
        self.is_leader = leader
        if leader:
            self._elected.set()
        elif self._elected.is_set():
            self._elected = trio.Event()

    async def _acquire(self) -> None:
        while not await self._try_take():  # noqa: ASYNC110 - polling the API is the point
            await trio.sleep(self._election.retry_period_seconds)

    async def _renew_until_lost(self) -> None:
        last_renewed = trio.current_time()
        while True:
            await trio.sleep(self._election.retry_period_seconds)
            # A renewal that hangs must not outlive the renew deadline: past it another
            # replica may take the Lease, and two leaders would run the pipeline at once.
            with trio.move_on_at(last_renewed + self._election.renew_deadline_seconds):
                if await self._try_take(renewing=True):
                    last_renewed = trio.current_time()
                    continue
            if self._observed[0] is not None and self._observed[0].holder not in (
                "",
                self.identity,
            ):
                return  # someone else holds it: step down at once
            if trio.current_time() - last_renewed >= self._election.renew_deadline_seconds:
                log.warning(
                    "kubernetes.leader_renew_timeout",
                    identity=self.identity,
                    seconds=self._election.renew_deadline_seconds,
                )
                return

    def _record(self, lease: Obj) -> LeaseRecord:
        spec = lease.get("spec") or {}
        return LeaseRecord(
            holder=str(spec.get("holderIdentity") or ""),
            duration_seconds=float(spec.get("leaseDurationSeconds") or 0),
            renew_time=str(spec.get("renewTime") or ""),
            transitions=int(spec.get("leaseTransitions") or 0),
            version=str(lease["metadata"]["resourceVersion"]),
        )

    def _spec(self, record: LeaseRecord | None) -> Obj:
        now = _utcnow_micro()
        duration = max(1, math.ceil(self._election.lease_duration_seconds))
        spec: Obj = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": duration,
            "renewTime": now,
        }
        if record is None or record.holder != self.identity:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = (record.transitions + 1) if record is not None else 0
        return spec

    async def _try_take(self, renewing: bool = False) -> bool:
        """Create, take over or renew the Lease; every write is an update carrying its resourceVersion."""
        name = self._election.lease_name
        try:
            try:
                lease = await self._client.call("read", LEASES, name)
            except NotFoundError:
                body = {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": name},
                    "spec": self._spec(None),
                }
                self._lease = await self._client.call("create", LEASES, body=body)
                self._observed = (self._record(self._lease), trio.current_time())
                return True
            record = self._record(lease)
            now = trio.current_time()
            if self._observed[0] is None or self._observed[0] != record:
                self._observed = (record, now)
            if not may_take_lease(
                record, self.identity, self._observed[1], now, self._election.lease_duration_seconds
            ):
                return False
            body = {**lease, "spec": {**(lease.get("spec") or {}), **self._spec(record)}}
            self._lease = await self._client.call("replace", LEASES, name, body=body)
            self._observed = (self._record(self._lease), trio.current_time())
            return True
        except ConflictError:
            return False  # another replica wrote first; look again at the next retry
        except ProviderError as exc:
            log.warning(
                "kubernetes.leader_election_failed",
                identity=self.identity,
                error=str(exc),
                renewing=renewing,
            )
            return False

    async def _release(self) -> None:
        record, lease = self._observed[0], self._lease
        if record is None or lease is None or record.holder != self.identity:
            return
        spec = {"holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": _utcnow_micro()}
        body = {**lease, "spec": {**(lease.get("spec") or {}), **spec}}
        try:
            await self._client.call("replace", LEASES, self._election.lease_name, body=body)
            log.info("kubernetes.leader_released", identity=self.identity)
        except ProviderError as exc:
            log.warning("kubernetes.leader_release_failed", identity=self.identity, error=str(exc))
