"""The thin client of the Kubernetes API: official-client calls in worker threads, retries, watches, and errors translated to the provider's.

The official client is synchronous. Every call runs in a worker thread behind a
:class:`trio.CapacityLimiter`; the client's connection pool is split between
watches and calls so that waits never starve a hand-out. Calls have a request
timeout; watches carry ``timeoutSeconds`` and, when cancelled, shut their
socket down so that no thread stays blocked on it. This module and
:mod:`._provider`/:mod:`._leader` through it are the only ones that import ``kubernetes``.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import functools
import json
import math
import re
import socket
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import structlog
import trio
import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from ..._provider import ConflictError, NotFoundError, ProviderError, TemporaryProviderError
from ._manifests import SNAPSHOT_GROUP, Obj, check_settings
from ._settings import KubernetesSettings

log = structlog.get_logger()

T = TypeVar("T")

PVCS = "persistentvolumeclaims"
PODS = "pods"
JOBS = "jobs"
SNAPSHOTS = "volumesnapshots"
LEASES = "leases"
CONFIGMAPS = "configmaps"
BUDGETS = "poddisruptionbudgets"
SECRETS = "secrets"
MERGE_PATCH = "application/merge-patch+json"

_SINGULAR = {
    PVCS: "persistent_volume_claim",
    PODS: "pod",
    JOBS: "job",
    LEASES: "lease",
    CONFIGMAPS: "config_map",
    BUDGETS: "pod_disruption_budget",
    SECRETS: "secret",
}
WHAT = {
    PVCS: "PVC",
    PODS: "pod",
    JOBS: "Job",
    SNAPSHOTS: "VolumeSnapshot",
    LEASES: "Lease",
    CONFIGMAPS: "ConfigMap",
    BUDGETS: "PodDisruptionBudget",
    SECRETS: "Secret",
}


RBAC_RULES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("", "persistentvolumeclaims", ("get", "list", "create", "patch", "delete")),
    ("", "pods", ("get", "list", "watch", "create", "delete")),
    ("", "pods/log", ("get",)),
    ("", "configmaps", ("get", "list", "create", "patch", "delete")),
    ("", "secrets", ("get", "list", "create", "delete")),
    ("batch", "jobs", ("get", "list", "watch", "create", "delete")),
    (SNAPSHOT_GROUP, "volumesnapshots", ("get", "list", "watch", "create", "patch", "delete")),
    ("coordination.k8s.io", "leases", ("get", "create", "patch")),
    ("policy", "poddisruptionbudgets", ("get", "create", "delete")),
)
"""(apiGroup, resource, verbs) of every call this module makes: the Role the broker needs."""


class WatchGone(Exception):
    """A watch's resourceVersion is too old (410 Gone): re-list, then watch again."""


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
            delay = retry_after(exc)
            return TemporaryProviderError(
                f"the Kubernetes API answered HTTP {status} to {verb} {what} ({message}); retrying is safe.",
                delay=1.0 if delay is None else delay,
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


MAX_RETRY_AFTER = 60.0
"""A Retry-After above this is capped: the server asked for a pause, not to stall the pool."""


def retry_after(exc: ApiException) -> float | None:
    """The pause a 429/503 answer's ``Retry-After`` asks for (seconds or an HTTP date), capped."""
    value = str((exc.headers or {}).get("Retry-After") or "").strip()
    if not value:
        return None
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = (when - datetime.datetime.now(datetime.UTC)).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


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


# -- the thin, thread-offloading client ------------------------------------------------------


class Client:
    """Runs official-client calls in threads, with retries, error translation and raw JSON."""

    def __init__(self, settings: KubernetesSettings, api_client: Any | None) -> None:
        check_settings(settings)  # before any request, and before any client is built
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
        self.policy = k8s.PolicyV1Api(api_client)
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
            SECRETS: self.core,
            JOBS: self.batch,
            LEASES: self.coordination,
            BUDGETS: self.policy,
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
        what = f'{WHAT[plural]} "{name}"' if name else f"{WHAT[plural]}s"
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
                cause = exc.__cause__
                asked = retry_after(cause) if isinstance(cause, ApiException) else None
                if asked is not None:
                    delay = max(delay, asked)  # the server said when: never sooner
                log.warning(
                    "kubernetes.api_retry",
                    verb=verb,
                    what=what,
                    attempt=attempt,
                    error=str(exc),
                    retry_in=round(delay, 3),
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

        Raises :class:`WatchGone` on 410 Gone. Cancelling it shuts the socket down
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
        what = f"{WHAT[plural]}s"

        def open_watch() -> Any:
            try:
                return fn(**kwargs)
            except ApiException as exc:
                if exc.status == 410:  # some servers refuse an expired version before streaming
                    return None
                raise

        response = await self._retrying("watch", what, open_watch, limiter=self._in_slot)
        if response is None:
            raise WatchGone()
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
        return WatchGone()
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
