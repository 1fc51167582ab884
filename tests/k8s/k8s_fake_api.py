"""A small, real-HTTP fake of the Kubernetes API server, plus simulated controllers.

The official ``kubernetes`` client talks to it over loopback exactly as it would
to a kube-apiserver: JSON objects, resourceVersion preconditions (409), 404s,
label and field selectors, merge patches, and chunked watch streams that honour
``timeoutSeconds`` and answer a too-old ``resourceVersion`` with 410 Gone.

A DELETE does what it does on a cluster: an object with finalizers only gets a
``deletionTimestamp`` (and can gain no new finalizer); a running pod terminates
gracefully (the kubelet stops it, then it goes); a PVC keeps
``kubernetes.io/pvc-protection`` while a pod uses it; a VolumeSnapshot keeps the
snapshot controller's finalizers while a PVC is provisioned from it (and the
source PVC keeps ``pvc-as-source-protection`` while it is being snapshotted);
the garbage collector deletes dependents by ``ownerReferences`` (Background),
after them (Foreground), or orphans them (the default for batch/v1 Jobs).

The store is generic over the resources aldaas uses (core/v1 pods, PVCs,
services, secrets; batch/v1 jobs; snapshot.storage.k8s.io/v1 volumesnapshots;
coordination.k8s.io/v1 leases; policy/v1 poddisruptionbudgets). A controller thread plays the cluster's part:
PVCs bind, snapshots become ``readyToUse``, pods become Running/Ready with a
127.0.0.x IP, Jobs run a pod that succeeds or fails by a rule the test sets.

Why not kmock: it is a fine HTTP mock, but its Kubernetes emulator keeps no
resourceVersions (no 409 on a stale update, no 410 on a watch), ignores label
selectors and watch timeouts, and runs on asyncio; the parts we need would have
been a rewrite, so this module is the compact version of just those parts.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import http.server
import itertools
import json
import re
import select
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import trio
from k8s_schemas import write_errors

Obj = dict[str, Any]

KINDS: dict[tuple[str, str], str] = {
    ("", "pods"): "Pod",
    ("", "persistentvolumeclaims"): "PersistentVolumeClaim",
    ("", "services"): "Service",
    ("", "secrets"): "Secret",
    ("", "configmaps"): "ConfigMap",
    ("batch", "jobs"): "Job",
    ("snapshot.storage.k8s.io", "volumesnapshots"): "VolumeSnapshot",
    ("coordination.k8s.io", "leases"): "Lease",
    ("policy", "poddisruptionbudgets"): "PodDisruptionBudget",
}
VERSIONS = {
    "": "v1",
    "batch": "v1",
    "snapshot.storage.k8s.io": "v1",
    "coordination.k8s.io": "v1",
    "policy": "v1",
}

PVC_PROTECTION = "kubernetes.io/pvc-protection"
"""Added to every PVC at creation (admission); the controller drops it once no pod uses the PVC."""
PVC_AS_SOURCE = "snapshot.storage.kubernetes.io/pvc-as-source-protection"
"""Kept on a PVC while a VolumeSnapshot of it is being taken (external-snapshotter)."""
SNAPSHOT_AS_SOURCE = "snapshot.storage.kubernetes.io/volumesnapshot-as-source-protection"
"""Kept on a VolumeSnapshot while a Pending PVC is being provisioned from it."""
SNAPSHOT_BOUND = "snapshot.storage.kubernetes.io/volumesnapshot-bound-protection"
"""Kept on a bound VolumeSnapshot until its content is deleted."""
JOB_TRACKING = "batch.kubernetes.io/job-tracking"
"""Kept on a Job's pod until the Job controller has counted it (finished or terminating)."""
FOREGROUND = "foregroundDeletion"
"""Kept on an owner deleted with propagationPolicy=Foreground until its dependents are gone."""
DEFAULT_POD_GRACE = 30

_PATH = re.compile(
    r"^/(?:api/v1|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$"
)


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> Obj:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


_SERVER_OWNED = (
    "uid",
    "creationTimestamp",
    "namespace",
    "generation",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)
_GROUPS = {plural: group for group, plural in KINDS}


def _now(later: int = 0) -> str:
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=later)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _with(finalizers: list[str] | None, finalizer: str) -> list[str]:
    return [*(f for f in finalizers or [] if f != finalizer), finalizer]


def _owned_by(obj: Obj, uid: str) -> bool:
    return any(o.get("uid") == uid for o in obj["metadata"].get("ownerReferences") or [])


def _claims(pod: Obj) -> set[str]:
    return {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"].get("volumes") or []
        if v.get("persistentVolumeClaim")
    }


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also used for strategic merge: enough for what aldaas sends)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _split_requirements(selector: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in selector:
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        depth += {"(": 1, ")": -1}.get(char, 0)
        current += char
    if current.strip():
        parts.append(current.strip())
    return parts


def label_selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for req in _split_requirements(selector):
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", req):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if (labels.get(key) in values) != (op == "in"):
                return False
        elif m := re.fullmatch(r"([^!=\s]+)\s*(==|=|!=)\s*(\S*)", req):
            key, op, value = m.groups()
            if (labels.get(key) == value) != (op != "!="):
                return False
        elif req.startswith("!"):
            if req[1:] in labels:
                return False
        elif req not in labels:
            return False
    return True


def _ready(pod: Obj) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def field_selector_matches(selector: str, obj: Obj) -> bool:
    for req in _split_requirements(selector):
        m = re.fullmatch(r"([^!=]+)(==|=|!=)(.*)", req)
        if m is None or m.group(1) not in ("metadata.name", "metadata.namespace"):
            raise ApiError(400, "BadRequest", f"field selector {req!r} is not supported")
        actual = obj["metadata"].get(m.group(1).split(".")[1])
        if (actual == m.group(3)) != (m.group(2) != "!="):
            return False
    return True


@attrs.define
class Fault:
    """Answer the next ``times`` matching requests with ``code`` (or delay them by ``delay`` s).

    Reliability modes: ``drop="before"`` closes the connection without an answer
    and without doing the request; ``drop="after"`` does it, then closes without
    an answer (the reply is lost). ``hold`` keeps the request hanging until the
    event is set (or the fake stops). ``every`` hits only every n-th matching
    request; ``body_contains`` matches on the request body.
    """

    method: str | None
    path_contains: str
    code: int | None = 500
    times: int = 1
    delay: float = 0.0
    watch: bool | None = None
    drop: str | None = None
    hold: threading.Event | None = None
    every: int = 1
    body_contains: bytes | None = None
    retry_after: str | None = None
    """A ``Retry-After`` header on the answer (429/503 ask clients to wait this long)."""
    seen: int = 0
    hits: int = 0


@attrs.define
class PodOutcome:
    """What the simulated kubelet does with a database pod."""

    ready: bool = True
    waiting_reason: str | None = None
    ip: str | None = None


@attrs.define
class JobOutcome:
    """What a simulated Job's pod does: exit status and the log it leaves."""

    succeeded: bool = True
    log: str = ""
    message: str | None = None
    """What the main container wrote to its terminationMessagePath (the kubelet reports at most
    4096 bytes of it as ``state.terminated.message``). None: what the program would write on
    success: ``aldaas restore-backup`` its outcome (the database of its PGDATABASE), others nothing."""
    fetch_log: str = ""
    """What the init container "fetch" has printed while the Job is held."""
    fetch_failed: bool = False
    """The download fails (init container exits 1 with ``fetch_log``); the command never runs."""
    hold: threading.Event | None = None
    """When set, the Job's pod stays in its init container until the event is set."""
    restore_log: str = ""
    """What the main container has printed while ``restore_hold`` holds it."""
    restore_hold: threading.Event | None = None
    """When set, the Job's pod then stays in its main container until the event is set."""


class FakeKubernetes:
    """The store, the HTTP server and the controllers; start with ``start()``, stop with ``stop()``."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.objects: dict[tuple[str, str, str], Obj] = {}  # (plural, namespace, name) -> object
        self.rv = 100
        self.events: list[tuple[int, str, str, Obj]] = []  # (rv, plural, type, object)
        self.compacted_rv = 0
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        self.calls: list[tuple[str, str, bool]] = []  # (method, path, is a watch)
        self.created: list[tuple[str, Obj]] = []  # (plural, object) in creation order
        self.logs: dict[tuple[str, str, str], str] = {}
        self.open_watches = 0
        self.watch_requests = 0
        self.compact_on_next_watch = False
        self.watch_epoch = 0
        """Bumped by expire_watches(): open watches answer 410 Gone and end."""
        self.stopping = False
        self._ips = itertools.count(2)
        # Rules the tests change: what the simulated cluster does with new objects.
        self.pod_rule: Callable[[Obj], PodOutcome] = lambda pod: PodOutcome()
        self.job_rule: Callable[[Obj], JobOutcome] = lambda job: JobOutcome()
        self.snapshot_ready: Callable[[Obj], bool] = lambda snap: True
        self.controllers_enabled = True
        self.kubelet: Any = None
        """A LocalKubelet (k8s_local_kubelet.py) makes pods, snapshots and Jobs real, or None."""
        # (plural, ns, name, uid) started by a controller: an object made again under the same
        # name (a database pod started again on its PVC) is a new object, acted on again.
        self._done: set[tuple[str, str, str, str]] = set()
        self._queue: list[tuple[str, str, Obj, int]] = []  # (plural, type, object, watch mark)
        self.watches_by_plural: dict[str, int] = {}
        self.act_when_watched = False
        """Controllers act on a new pod, Job or snapshot only once a watch on its kind has begun
        after it was created: every wait then deterministically goes through a watch."""
        self.kubelet_stops_pods = True
        """False: pods being deleted stay Terminating (a kubelet slow to stop them, a lost node);
        set it back to True and the next change anywhere lets the kubelet finish them."""
        self.sweeps = 0
        """How many times the finalizer controllers and the garbage collector have looked."""
        self.crashes: list[Exception] = []
        """Exceptions the controllers and the kubelet raised; :meth:`stop` raises them."""
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        for target in (self._serve, self._control_loop):
            thread = threading.Thread(
                target=target, name=f"fake-k8s-{target.__name__}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _serve(self) -> None:
        self._server.serve_forever(poll_interval=0.02)

    def stop(self) -> None:
        """Stop serving; raise what crashed in the simulated cluster meanwhile (a bug in a fake
        must fail the test that was running, not turn into a timeout or another, passing path)."""
        with self.lock:
            self.stopping = True
            self.lock.notify_all()
        self._server.shutdown()
        self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        if self.crashes:
            raise ExceptionGroup("the fake Kubernetes API's controllers crashed", self.crashes)

    def _crashed(self, where: str, exc: Exception) -> None:
        """Keep ``exc`` for :meth:`stop`, unless the test had already switched the cluster off
        (a kubelet call then finds its trio run gone: teardown, not a bug)."""
        if self.controllers_enabled and not self.stopping:
            exc.add_note(f"raised in the fake Kubernetes API's {where}")
            with self.lock:
                self.crashes.append(exc)

    # -- store (callers hold no lock; every method takes it) ---------------------------------
    def _emit(self, plural: str, type_: str, obj: Obj) -> None:
        self.events.append(
            (int(obj["metadata"]["resourceVersion"]), plural, type_, copy.deepcopy(obj))
        )
        del self.events[:-2000]
        mark = self.watches_by_plural.get(plural, 0)
        self._queue.append((plural, type_, copy.deepcopy(obj), mark))
        self.lock.notify_all()

    def _bump(self, obj: Obj) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)

    def get(self, plural: str, namespace: str, name: str) -> Obj | None:
        with self.lock:
            obj = self.objects.get((plural, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def all(self, plural: str) -> list[Obj]:
        with self.lock:
            return [
                copy.deepcopy(o) for (p, _, _), o in sorted(self.objects.items()) if p == plural
            ]

    def put(self, group: str, plural: str, namespace: str, obj: Obj) -> Obj:
        """Create an object directly (as another client would)."""
        with self.lock:
            return self._create(group, plural, namespace, copy.deepcopy(obj))

    def update_status(self, plural: str, namespace: str, name: str, status: Obj) -> None:
        """Merge ``status`` into an object as its controller would (bumps resourceVersion)."""
        with self.lock:
            obj = self.objects.get((plural, namespace, name))
            if obj is None:
                return
            obj["status"] = merge_patch(obj.get("status", {}), status)
            self._bump(obj)
            self._emit(plural, "MODIFIED", obj)

    def remove(self, plural: str, namespace: str, name: str, *, grace: int | None = None) -> None:
        """Delete an object as another client would (``kubectl delete``, an eviction): a pod
        terminates gracefully, an object with finalizers stays until they are removed."""
        with self.lock:
            self._delete(plural, namespace, name, None, grace)

    def kick(self) -> None:
        """Let the controllers look at everything again (after a test changed a rule)."""
        with self.lock:
            self._queue.append(("", "SYNC", {}, 0))
            self.lock.notify_all()

    def compact(self) -> None:
        """Forget the event history, so a watch from any older resourceVersion gets 410 Gone."""
        with self.lock:
            self.compacted_rv = self.rv
            self.events.clear()

    def _create(self, group: str, plural: str, namespace: str, obj: Obj) -> Obj:
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        name = meta.get("name")
        if not name:
            raise ApiError(422, "Invalid", f"{plural} must have metadata.name")
        key = (plural, namespace, name)
        if key in self.objects:
            raise ApiError(409, "AlreadyExists", f'{plural} "{name}" already exists')
        meta.pop("deletionTimestamp", None)  # the server owns these two
        meta.pop("deletionGracePeriodSeconds", None)
        if plural == "persistentvolumeclaims":  # the StorageObjectInUseProtection admission plugin
            meta["finalizers"] = _with(meta.get("finalizers"), PVC_PROTECTION)
        meta.update(
            namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1
        )
        obj["apiVersion"] = f"{group}/{VERSIONS[group]}" if group else "v1"
        obj["kind"] = KINDS[(group, plural)]
        self._bump(obj)
        self.objects[key] = obj
        self.created.append((plural, copy.deepcopy(obj)))
        self._emit(plural, "ADDED", obj)
        return copy.deepcopy(obj)

    def _delete(
        self,
        plural: str,
        namespace: str,
        name: str,
        propagation: str | None,
        grace: int | None = None,
    ) -> Obj:
        """DELETE as kube-apiserver does it: an object with finalizers (or a running pod, which
        the kubelet must stop first) only gets a deletionTimestamp; dependents are collected
        later by the garbage collector (Background), kept (Orphan) or first (Foreground)."""
        key = (plural, namespace, name)
        obj = self.objects.get(key)
        if obj is None:
            raise ApiError(404, "NotFound", f'{plural} "{name}" not found')
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):  # already being deleted: a pod may only shorten its grace
            if (
                plural == "pods"
                and grace is not None
                and grace < meta["deletionGracePeriodSeconds"]
            ):
                meta["deletionGracePeriodSeconds"] = grace
                self._bump(obj)
                self._emit(plural, "MODIFIED", obj)
            return copy.deepcopy(obj)
        if propagation is None:  # batch/v1 Jobs still default to orphaning their pods
            propagation = "Orphan" if plural == "jobs" else "Background"
        uid = meta["uid"]
        dependents = [k for k, o in self.objects.items() if k[1] == namespace and _owned_by(o, uid)]
        if propagation == "Orphan":
            for dep in dependents:
                child = self.objects[dep]
                child["metadata"]["ownerReferences"] = [
                    o for o in child["metadata"]["ownerReferences"] if o.get("uid") != uid
                ]
                self._bump(child)
                self._emit(dep[0], "MODIFIED", child)
        elif propagation == "Foreground" and dependents:
            meta["finalizers"] = _with(meta.get("finalizers"), FOREGROUND)
        pod_grace = self._pod_grace(obj, grace) if plural == "pods" else 0
        if not meta.get("finalizers") and pod_grace == 0:
            return self._remove(key)
        meta["deletionTimestamp"] = _now(pod_grace)
        meta["deletionGracePeriodSeconds"] = pod_grace
        self._bump(obj)
        self._emit(plural, "MODIFIED", obj)
        return copy.deepcopy(obj)

    @staticmethod
    def _pod_grace(pod: Obj, grace: int | None) -> int:
        """A pod no kubelet runs (unscheduled, or finished) goes at once; else after its grace."""
        if (pod.get("status") or {}).get("phase") in (None, "Succeeded", "Failed"):
            return 0
        if grace is not None:
            return grace
        return int(pod["spec"].get("terminationGracePeriodSeconds", DEFAULT_POD_GRACE))

    def _remove(self, key: tuple[str, str, str]) -> Obj:
        obj = self.objects.pop(key)
        self._bump(obj)
        self._emit(key[0], "DELETED", obj)
        return copy.deepcopy(obj)

    def _drop_finalizer(self, plural: str, namespace: str, name: str, finalizer: str) -> None:
        """A controller removes its finalizer; the last one gone completes a deletion."""
        with self.lock:
            key = (plural, namespace, name)
            obj = self.objects.get(key)
            if obj is None or finalizer not in (obj["metadata"].get("finalizers") or []):
                return
            obj["metadata"]["finalizers"].remove(finalizer)
            self._bump(obj)
            self._emit(plural, "MODIFIED", obj)
            self._remove_if_done(key)

    def _add_finalizer(self, plural: str, namespace: str, name: str, finalizer: str) -> None:
        with self.lock:
            obj = self.objects.get((plural, namespace, name))
            meta = (obj or {}).get("metadata") or {}
            if (
                obj is None
                or meta.get("deletionTimestamp")
                or finalizer in meta.get("finalizers", [])
            ):
                return
            meta["finalizers"] = _with(meta.get("finalizers"), finalizer)
            self._bump(obj)
            self._emit(plural, "MODIFIED", obj)

    def _remove_if_done(self, key: tuple[str, str, str]) -> None:
        meta = self.objects[key]["metadata"]
        stopped = key[0] != "pods" or meta.get("deletionGracePeriodSeconds") == 0
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and stopped:
            self._remove(key)

    def _patch(self, plural: str, namespace: str, name: str, patch: Obj, replace: bool) -> Obj:
        obj = self.objects.get((plural, namespace, name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{plural} "{name}" not found')
        expected = (patch.get("metadata") or {}).get("resourceVersion")
        if expected is not None and expected != obj["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {plural} "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again",
            )
        if replace:
            new = copy.deepcopy(patch)
            if "status" in obj:
                new["status"] = obj["status"]
            new["apiVersion"], new["kind"] = obj["apiVersion"], obj["kind"]
        else:
            new = merge_patch(obj, patch)
        for field in _SERVER_OWNED:  # a client cannot set, change or clear these
            new["metadata"].pop(field, None)
            if field in obj["metadata"]:
                new["metadata"][field] = obj["metadata"][field]
        added = set(new["metadata"].get("finalizers") or []) - set(
            obj["metadata"].get("finalizers") or []
        )
        if obj["metadata"].get("deletionTimestamp") and added:
            raise ApiError(
                422,
                "Invalid",
                f'{KINDS[(_GROUPS[plural], plural)]} "{name}" is invalid: metadata.finalizers: '
                f"Forbidden: no new finalizers can be added if the object is being deleted, "
                f"found new finalizers {sorted(added)!r}",
            )
        self._bump(new)
        self.objects[(plural, namespace, name)] = new
        self._emit(plural, "MODIFIED", new)
        self._remove_if_done((plural, namespace, name))
        return copy.deepcopy(new)

    # -- HTTP ---------------------------------------------------------------------------------
    def take_fault(self, method: str, path: str, watch: bool, body: bytes = b"") -> Fault | None:
        with self.lock:
            self.requests.append((method, path))
            self.calls.append((method, path, watch))
            for fault in self.faults:
                if fault.times <= 0 or (fault.method and fault.method != method):
                    continue
                if fault.body_contains is not None and fault.body_contains not in body:
                    continue
                if fault.path_contains in path and (fault.watch is None or fault.watch == watch):
                    fault.seen += 1
                    if fault.seen % fault.every:
                        continue
                    fault.times -= 1
                    fault.hits += 1
                    return fault
        return None

    def expire_watches(self) -> None:
        """End every open watch with an ERROR 410 Gone event (etcd compacted under them)."""
        with self.lock:
            self.watch_epoch += 1
            self.lock.notify_all()

    def handle(self, method: str, path: str, query: dict[str, str], body: Any) -> Obj:
        m = _PATH.match(path)
        if m is None:
            raise ApiError(
                404, "NotFound", f"the server could not find the requested resource {path}"
            )
        group, plural, namespace = m.group("group") or "", m.group("plural"), m.group("ns")
        name, sub = m.group("name"), m.group("sub")
        if (group, plural) not in KINDS:
            raise ApiError(
                404, "NotFound", f"the server could not find the requested resource {plural}"
            )
        if (plural, sub, method) == ("pods", "eviction", "POST"):
            return self._evict(namespace, str(name), body)
        if method in ("POST", "PUT", "PATCH"):
            self._validate(group, plural, body, patch=method == "PATCH")
        with self.lock:
            if name is None and method == "GET":
                return self._list(group, plural, namespace, query)
            if name is None and method == "POST":
                return self._create(group, plural, namespace, body)
            if name is not None and sub is None and method == "GET":
                obj = self.objects.get((plural, namespace, name))
                if obj is None:
                    raise ApiError(404, "NotFound", f'{plural} "{name}" not found')
                return copy.deepcopy(obj)
            if name is not None and sub is None and method == "PATCH":
                return self._patch(plural, namespace, name, body, replace=False)
            if name is not None and sub is None and method == "PUT":
                return self._patch(plural, namespace, name, body, replace=True)
            if name is not None and sub is None and method == "DELETE":
                propagation = (body or {}).get("propagationPolicy") or query.get(
                    "propagationPolicy"
                )
                uid = ((body or {}).get("preconditions") or {}).get("uid")
                found = self.objects.get((plural, namespace, name))
                if uid is not None and found is not None and found["metadata"]["uid"] != uid:
                    raise ApiError(
                        409,
                        "Conflict",
                        f"Precondition failed: UID in precondition: {uid}, "
                        f"UID in object meta: {found['metadata']['uid']}",
                    )
                grace = (body or {}).get("gracePeriodSeconds", query.get("gracePeriodSeconds"))
                return self._delete(
                    plural, namespace, name, propagation, None if grace is None else int(grace)
                )
        raise ApiError(405, "MethodNotAllowed", f"{method} {path} is not supported by the fake")

    def _evict(self, namespace: str, name: str, body: Any) -> Obj:
        """The Eviction API (what ``kubectl drain`` calls): 429 while a PodDisruptionBudget over
        the pod allows no disruption (an integer ``minAvailable``, counting Ready pods, as the
        disruption controller does for pods of any controller), else the pod is deleted."""
        sent = {"apiVersion": "policy/v1", "kind": "Eviction", **(body or {})}
        errors = write_errors(sent)
        if errors or sent["kind"] != "Eviction":
            raise ApiError(422, "Invalid", f"Eviction is invalid: {'; '.join(errors)}")
        with self.lock:
            pod = self.objects.get(("pods", namespace, name))
            if pod is None:
                raise ApiError(404, "NotFound", f'pods "{name}" not found')
            pods = [o for (p, ns, _), o in self.objects.items() if p == "pods" and ns == namespace]
            for (p, ns, _), budget in list(self.objects.items()):
                if (p, ns) != ("poddisruptionbudgets", namespace):
                    continue
                spec = budget["spec"]
                wanted = spec["selector"]["matchLabels"].items()
                if not wanted <= (pod["metadata"].get("labels") or {}).items():
                    continue
                if not _ready(pod) and spec.get("unhealthyPodEvictionPolicy") == "AlwaysAllow":
                    continue
                healthy = sum(
                    1
                    for o in pods
                    if wanted <= (o["metadata"].get("labels") or {}).items() and _ready(o)
                )
                if healthy - 1 < spec["minAvailable"]:
                    raise ApiError(
                        429,
                        "TooManyRequests",
                        "Cannot evict pod as it would violate the pod's disruption budget.",
                    )
            self._delete("pods", namespace, name, None)
        return {"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201}

    @staticmethod
    def _validate(group: str, plural: str, body: Any, *, patch: bool) -> None:
        """Refuse what kube-apiserver refuses with strict field validation: unknown fields, bad
        values, invalid names and labels (422), in the client's body before it is stored."""
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", f"the body of a {plural} request is not an object")
        api_version = f"{group}/{VERSIONS[group]}" if group else "v1"
        sent = {**body, "apiVersion": api_version, "kind": KINDS[(group, plural)]}
        errors = write_errors(sent, patch=patch)
        if errors:
            raise ApiError(
                422, "Invalid", f"{KINDS[(group, plural)]} is invalid: {'; '.join(errors)}"
            )

    def _list(self, group: str, plural: str, namespace: str, query: dict[str, str]) -> Obj:
        items = [
            copy.deepcopy(o)
            for (p, ns, _), o in sorted(self.objects.items())
            if p == plural and ns == namespace and self._matches(o, query)
        ]
        kind = KINDS[(group, plural)] + "List"
        api_version = f"{group}/{VERSIONS[group]}" if group else "v1"
        meta = {"resourceVersion": str(self.rv)}
        return {"kind": kind, "apiVersion": api_version, "metadata": meta, "items": items}

    @staticmethod
    def _matches(obj: Obj, query: dict[str, str]) -> bool:
        labels = obj["metadata"].get("labels") or {}
        if query.get("labelSelector") and not label_selector_matches(
            query["labelSelector"], labels
        ):
            return False
        return not query.get("fieldSelector") or field_selector_matches(query["fieldSelector"], obj)

    def stream_watch(
        self,
        path: str,
        query: dict[str, str],
        write: Callable[[Obj], None],
        closed: Callable[[], bool],
    ) -> None:
        m = _PATH.match(path)
        assert m is not None
        assert m.group("name") is None
        plural, namespace = m.group("plural"), m.group("ns")
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        since = query.get("resourceVersion") or ""
        with self.lock:
            epoch = self.watch_epoch
            self.open_watches += 1
            self.watch_requests += 1
            self.watches_by_plural[plural] = self.watches_by_plural.get(plural, 0) + 1
            self.lock.notify_all()
            if self.compact_on_next_watch:  # as if etcd compacted between the list and this watch
                self.compact_on_next_watch = False
                self.rv += 1
                self.compacted_rv = self.rv
                self.events.clear()
        try:
            with self.lock:
                if since in ("", "0"):
                    pending: list[Obj] = [
                        {"type": "ADDED", "object": copy.deepcopy(o)}
                        for (p, ns, _), o in sorted(self.objects.items())
                        if p == plural and ns == namespace and self._matches(o, query)
                    ]
                    last = self.rv
                elif int(since) < self.compacted_rv:
                    gone = ApiError(
                        410, "Expired", f"too old resource version: {since} ({self.rv})"
                    )
                    pending, last = [{"type": "ERROR", "object": gone.status()}], -1
                else:
                    pending, last = [], int(since)
            for event in pending:
                write(event)
            if last < 0:
                return
            while True:
                with self.lock:
                    fresh = [
                        {"type": type_, "object": copy.deepcopy(o)}
                        for rv, p, type_, o in self.events
                        if rv > last
                        and p == plural
                        and o["metadata"]["namespace"] == namespace
                        and self._matches(o, query)
                    ]
                    last = self.rv
                    if not fresh and not self.stopping and self.watch_epoch == epoch:
                        self.lock.wait(timeout=0.05)
                    expired = self.watch_epoch != epoch
                for event in fresh:
                    write(event)
                if expired:
                    gone = ApiError(410, "Expired", f"too old resource version: {since}")
                    write({"type": "ERROR", "object": gone.status()})
                    return
                if self.stopping or time.monotonic() >= deadline or closed():
                    return
        finally:
            with self.lock:
                self.open_watches -= 1
                self.lock.notify_all()

    # -- simulated controllers ----------------------------------------------------------------
    def _control_loop(self) -> None:
        while True:
            with self.lock:
                while not self._queue and not self.stopping:
                    self.lock.wait(timeout=0.5)
                if self.stopping:
                    return
                batch, self._queue = self._queue, []
            if not self.controllers_enabled:
                continue
            for plural, type_, obj, mark in batch:
                if type_ == "DELETED":
                    if self.kubelet is not None:
                        self._kubelet_deleted(plural, obj)
                    continue
                if type_ == "SYNC" or obj["metadata"].get("deletionTimestamp"):
                    continue
                if self.act_when_watched and type_ == "ADDED" and self._watched_kind(plural, obj):
                    with self.lock:
                        deadline = time.monotonic() + 2.0
                        while self.watches_by_plural.get(plural, 0) <= mark and not self.stopping:
                            if time.monotonic() > deadline:
                                break
                            self.lock.wait(timeout=0.05)
                try:
                    self._reconcile(plural, obj)
                except Exception as exc:  # a bug in the fake: fail the test (see stop())
                    self._crashed(f"controller, on {plural}", exc)
            try:
                self._sweep()
            except Exception as exc:  # a bug in the fake: fail the test (see stop())
                self._crashed("finalizer controllers and garbage collector", exc)
            with self.lock:
                self.sweeps += 1

    def _sweep(self) -> None:
        """What the kubelet, the PVC-protection, snapshot and Job controllers and the garbage
        collector do with objects being deleted. Each change queues an event, so the sweep
        runs again until nothing is left to do; it changes nothing it has nothing to do for."""
        with self.lock:
            objects = {k: copy.deepcopy(o) for k, o in self.objects.items()}
        by_uid = {o["metadata"]["uid"]: o for o in objects.values()}

        def collectable(owner_uid: str) -> bool:
            owner = by_uid.get(owner_uid)
            return owner is None or FOREGROUND in (owner["metadata"].get("finalizers") or [])

        for (plural, ns, name), obj in objects.items():
            meta = obj["metadata"]
            finalizers = meta.get("finalizers") or []
            owners = [o.get("uid") for o in meta.get("ownerReferences") or []]
            if owners and not meta.get("deletionTimestamp") and all(map(collectable, owners)):
                with self.lock, contextlib.suppress(ApiError):
                    self._delete(plural, ns, name, "Background")
            if PVC_AS_SOURCE in finalizers and not self._being_snapshotted(objects, ns, name):
                self._drop_finalizer(plural, ns, name, PVC_AS_SOURCE)
            if not meta.get("deletionTimestamp"):
                continue
            if plural == "pods" and self.kubelet_stops_pods:
                self._terminate_pod(obj)
            elif plural == "persistentvolumeclaims" and PVC_PROTECTION in finalizers:
                if not self._in_use(objects, ns, name):
                    self._drop_finalizer(plural, ns, name, PVC_PROTECTION)
            elif plural == "volumesnapshots" and not self._restoring(objects, ns, name):
                for finalizer in (SNAPSHOT_AS_SOURCE, SNAPSHOT_BOUND):  # content deleted first
                    self._drop_finalizer(plural, ns, name, finalizer)
            if FOREGROUND in finalizers and not any(
                _owned_by(o, meta["uid"]) for o in objects.values()
            ):
                self._drop_finalizer(plural, ns, name, FOREGROUND)

    @staticmethod
    def _in_use(objects: dict[tuple[str, str, str], Obj], ns: str, claim: str) -> bool:
        """Whether a pod that has not finished uses the PVC (a Terminating pod still does)."""
        return any(
            p == "pods"
            and n == ns
            and claim in _claims(pod)
            and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
            for (p, n, _), pod in objects.items()
        )

    @staticmethod
    def _restoring(objects: dict[tuple[str, str, str], Obj], ns: str, snapshot: str) -> bool:
        """Whether a Pending PVC is being provisioned from the snapshot."""
        return any(
            p == "persistentvolumeclaims"
            and n == ns
            and (pvc["spec"].get("dataSource") or {}).get("name") == snapshot
            and (pvc.get("status") or {}).get("phase") != "Bound"
            for (p, n, _), pvc in objects.items()
        )

    @staticmethod
    def _being_snapshotted(objects: dict[tuple[str, str, str], Obj], ns: str, pvc: str) -> bool:
        """Whether a VolumeSnapshot of the PVC is still being taken."""
        return any(
            p == "volumesnapshots"
            and n == ns
            and snap["spec"]["source"].get("persistentVolumeClaimName") == pvc
            and not (snap.get("status") or {}).get("readyToUse")
            and not (snap.get("status") or {}).get("error")
            for (p, n, _), snap in objects.items()
        )

    def _terminate_pod(self, pod: Obj) -> None:
        """The kubelet stops a Terminating pod's containers, then deletes it with grace 0."""
        meta = pod["metadata"]
        if meta.get("deletionGracePeriodSeconds") == 0:
            return  # stopped already; it waits for its finalizers
        if self.kubelet is not None and "job-name" not in (meta.get("labels") or {}):
            try:
                self.kubelet.stop_pod(pod)
            except Exception as exc:  # a bug in the fake: fail the test (see stop())
                self._crashed("kubelet, stopping a pod", exc)
        key = ("pods", meta["namespace"], meta["name"])
        with self.lock:
            current = self.objects.get(key)
            if current is None or current["metadata"]["uid"] != meta["uid"]:
                return
            current_meta = current["metadata"]
            if JOB_TRACKING in (current_meta.get("finalizers") or []):  # the Job controller
                current_meta["finalizers"].remove(JOB_TRACKING)  # counts a terminated pod
            current_meta["deletionGracePeriodSeconds"] = 0
            if current_meta.get("finalizers"):
                self._bump(current)
                self._emit("pods", "MODIFIED", current)
            else:
                self._remove(key)

    @staticmethod
    def _watched_kind(plural: str, obj: Obj) -> bool:
        if plural == "pods":
            return "job-name" not in obj["metadata"].get("labels", {})
        return plural in ("jobs", "volumesnapshots")

    def _reconcile(self, plural: str, obj: Obj) -> None:
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        status = obj.get("status") or {}
        if plural == "persistentvolumeclaims" and status.get("phase") != "Bound":
            source = obj["spec"].get("dataSource")
            if source and source.get("kind") == "VolumeSnapshot":
                snap = self.get("volumesnapshots", ns, source["name"])
                if snap is None or not (snap.get("status") or {}).get("readyToUse"):
                    return
                if snap["metadata"].get("deletionTimestamp"):
                    return  # the provisioner refuses: "snapshot is currently being deleted"
            size = ((obj["spec"].get("resources") or {}).get("requests") or {}).get(
                "storage", "1Gi"
            )
            self.update_status(plural, ns, name, {"phase": "Bound", "capacity": {"storage": size}})
            for pod in self.all("pods") if not self.act_when_watched else []:
                if pod["metadata"]["namespace"] == ns:
                    self._reconcile("pods", pod)
        elif plural == "volumesnapshots" and not status.get("readyToUse"):
            pvc = self.get(
                "persistentvolumeclaims", ns, obj["spec"]["source"]["persistentVolumeClaimName"]
            )
            if pvc is None or not self.snapshot_ready(obj) or not self._first_time(plural, obj):
                return
            self._add_finalizer(plural, ns, name, SNAPSHOT_AS_SOURCE)
            self._add_finalizer(plural, ns, name, SNAPSHOT_BOUND)
            self._add_finalizer(
                "persistentvolumeclaims", ns, pvc["metadata"]["name"], PVC_AS_SOURCE
            )
            if self.kubelet is not None:
                try:
                    self.kubelet.take_snapshot(obj)
                except Exception as exc:
                    self.update_status(plural, ns, name, {"error": {"message": str(exc)}})
                    return
            self.update_status(
                plural,
                ns,
                name,
                {
                    "readyToUse": True,
                    "restoreSize": pvc["spec"]["resources"]["requests"]["storage"],
                    "boundVolumeSnapshotContentName": f"snapcontent-{obj['metadata']['uid']}",
                },
            )
            for pvc in self.all("persistentvolumeclaims"):
                if (pvc["spec"].get("dataSource") or {}).get("name") == name:
                    self._reconcile("persistentvolumeclaims", pvc)
        elif plural == "jobs" and not status:
            self._run_job(obj)
        elif (
            plural == "pods"
            and not status.get("phase")
            and "job-name" not in obj["metadata"].get("labels", {})
        ):
            self._run_pod(obj)

    def _claims_bound(self, pod: Obj) -> bool:
        ns = pod["metadata"]["namespace"]
        for volume in pod["spec"].get("volumes", []):
            claim = volume.get("persistentVolumeClaim")
            if claim:
                pvc = self.get("persistentvolumeclaims", ns, claim["claimName"])
                if pvc is None or (pvc.get("status") or {}).get("phase") != "Bound":
                    return False
                if pvc["metadata"].get("deletionTimestamp"):
                    return False  # the kubelet will not mount a PVC that is being deleted
        return True

    def _kubelet_deleted(self, plural: str, obj: Obj) -> None:
        labels = obj["metadata"].get("labels") or {}
        try:
            if plural == "pods" and "job-name" not in labels:
                self.kubelet.stop_pod(obj)
            elif plural == "persistentvolumeclaims" and labels.get("aldaas.io/kind"):
                self.kubelet.deleted_pvc(obj)
            elif plural == "volumesnapshots":
                self.kubelet.deleted_snapshot(obj)
        except Exception as exc:  # a bug in the fake: fail the test (see stop())
            self._crashed(f"kubelet, on deleted {plural}", exc)

    def _first_time(self, plural: str, obj: Obj) -> bool:
        metadata = obj["metadata"]
        key = (plural, metadata["namespace"], metadata["name"], metadata.get("uid", ""))
        if key in self._done:
            return False
        self._done.add(key)
        return True

    def _run_pod(self, pod: Obj) -> None:
        if not self._claims_bound(pod) or not self._first_time("pods", pod):
            return
        outcome = self.pod_rule(pod)
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        ip = outcome.ip or f"127.0.0.{next(self._ips) % 250 + 2}"
        container = pod["spec"]["containers"][0]["name"]
        failed = container  # the container the waiting reason is about (an init one, or main)
        if self.kubelet is not None:
            claim = pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
            try:
                self.kubelet.start_pod(pod, self.get("persistentvolumeclaims", ns, claim), ip)
            except Exception as exc:
                failed = getattr(exc, "container", container)
                with self.lock:
                    self.logs[(ns, name, failed)] = f"{exc}\n"
                reason = getattr(exc, "reason", "CrashLoopBackOff")
                outcome = PodOutcome(waiting_reason=reason)
        if outcome.waiting_reason:
            state: Obj = {"waiting": {"reason": outcome.waiting_reason, "message": "simulated"}}
        else:
            state = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
        ready = "True" if outcome.ready and not outcome.waiting_reason else "False"
        status: Obj = {
            "phase": "Running" if not outcome.waiting_reason else "Pending",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": ready}],
            "containerStatuses": [
                {
                    "name": container,
                    "image": pod["spec"]["containers"][0].get("image", ""),
                    "imageID": "",
                    "ready": ready == "True",
                    "restartCount": 0,
                    "state": state,
                }
            ],
        }
        if failed != container:  # an init container failed: the database never started
            initializing = {"waiting": {"reason": "PodInitializing"}}
            status["containerStatuses"][0]["state"] = initializing
            status["initContainerStatuses"] = [
                {"name": failed, "ready": False, "restartCount": 1, "state": state}
            ]
        self.update_status("pods", ns, name, status)

    def _run_job(self, job: Obj) -> None:
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        template = copy.deepcopy(job["spec"]["template"])
        labels = {**template["metadata"].get("labels", {}), "job-name": name}
        labels["batch.kubernetes.io/job-name"] = name
        pod_meta = {
            "generateName": f"{name}-",
            "labels": labels,
            "ownerReferences": [{"kind": "Job", "name": name, "uid": job["metadata"]["uid"]}],
            "finalizers": [JOB_TRACKING],
        }
        with self.lock:
            pod = self._create("", "pods", ns, {"metadata": pod_meta, "spec": template["spec"]})
        outcome = self.kubelet.run_job(job) if self.kubelet is not None else self.job_rule(job)
        if outcome.hold is not None:
            hold = outcome.hold
            threading.Thread(
                target=self._finish_job, args=(job, pod, outcome, hold), daemon=True
            ).start()
        else:
            self._finish_job(job, pod, outcome, None)

    def _finish_job(
        self, job: Obj, pod: Obj, outcome: JobOutcome, hold: threading.Event | None
    ) -> None:
        try:
            self._finish_job_now(job, pod, outcome, hold)
        except Exception as exc:  # in its own thread when held: fail the test (see stop())
            self._crashed("job runner", exc)

    def _finish_job_now(
        self, job: Obj, pod: Obj, outcome: JobOutcome, hold: threading.Event | None
    ) -> None:
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        pod_name = pod["metadata"]["name"]
        if hold is not None:
            with self.lock:
                self.logs[(ns, pod_name, "fetch")] = outcome.fetch_log
            running = {"name": "fetch", "state": {"running": {}}}
            self.update_status(
                "pods", ns, pod_name, {"phase": "Pending", "initContainerStatuses": [running]}
            )
            while not hold.wait(timeout=0.05):
                if self.stopping:
                    return
        if outcome.fetch_failed:
            with self.lock:
                self.logs[(ns, pod_name, "fetch")] = outcome.fetch_log
            failed = {"name": "fetch", "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}
            self.update_status(
                "pods", ns, pod_name, {"phase": "Failed", "initContainerStatuses": [failed]}
            )
            self._drop_finalizer("pods", ns, pod_name, JOB_TRACKING)
            conditions = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]
            self.update_status("jobs", ns, name, {"failed": 1, "conditions": conditions})
            return
        main = pod["spec"]["containers"][0]["name"]
        if outcome.restore_hold is not None:
            with self.lock:
                self.logs[(ns, pod_name, main)] = outcome.restore_log
            fetched = {"name": "fetch", "state": {"terminated": {"exitCode": 0}}}
            running = {"name": main, "ready": True, "state": {"running": {}}}
            status = {"initContainerStatuses": [fetched], "containerStatuses": [running]}
            self.update_status("pods", ns, pod_name, {"phase": "Running", **status})
            while not outcome.restore_hold.wait(timeout=0.05):
                if self.stopping:
                    return
        with self.lock:
            self.logs[(ns, pod_name, main)] = outcome.log
        phase = "Succeeded" if outcome.succeeded else "Failed"
        code = 0 if outcome.succeeded else 1
        terminated: Obj = {
            "terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}
        }
        message = outcome.message
        if message is None and outcome.succeeded:
            message = _default_message(pod["spec"]["containers"][0])
        if message:  # as a kubelet: the file's first 4096 bytes
            cut = message.encode()[:4096].decode("utf-8", "ignore")
            terminated["terminated"]["message"] = cut
        self.update_status(
            "pods",
            ns,
            pod_name,
            {
                "phase": phase,
                "containerStatuses": [{"name": main, "ready": False, "state": terminated}],
            },
        )
        self._drop_finalizer("pods", ns, pod_name, JOB_TRACKING)
        condition = "Complete" if outcome.succeeded else "Failed"
        counts = {"succeeded": 1} if outcome.succeeded else {"failed": 1}
        self.update_status(
            "jobs", ns, name, {**counts, "conditions": [{"type": condition, "status": "True"}]}
        )


def _default_message(container: Obj) -> str:
    """The termination message a successful main container leaves when a test names none."""
    if "restore-backup" not in container.get("command", []):
        return ""
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    return json.dumps({"restore_format": "script+gzip", "restore_database": env["PGDATABASE"]})


def rbac_verbs(calls: list[tuple[str, str, bool]]) -> set[tuple[str, str, str]]:
    """The (apiGroup, resource, verb) an RBAC Role must grant for these requests."""
    used = set()
    for method, path, watch in calls:
        sub = path.endswith("/log")
        m = _PATH.match(path.removesuffix("/log") if sub else path)
        assert m is not None, path
        group, plural, name = m.group("group") or "", m.group("plural"), m.group("name")
        resource = f"{plural}/log" if sub else plural
        if method == "GET":
            verb = "watch" if watch else ("get" if name else "list")
        else:
            verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]
        used.add((group, resource, verb))
    return used


async def wait_until(predicate: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll a condition of the fake (it changes in other threads: no Event to wait on)."""
    with trio.fail_after(seconds):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)


def _make_handler(fake: FakeKubernetes) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            parsed = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(parsed.query))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            watch = query.get("watch") in ("true", "1", "True")
            fault = fake.take_fault(self.command, parsed.path, watch, raw)
            headers: dict[str, str] = {}
            if fault is not None and fault.delay:
                time.sleep(fault.delay)
            if fault is not None and fault.hold is not None:
                while not fault.hold.wait(timeout=0.05) and not fake.stopping:
                    pass
            if fault is not None and fault.drop is not None:
                if fault.drop == "after":
                    with contextlib.suppress(ApiError):
                        fake.handle(self.command, parsed.path, query, json.loads(raw or b"null"))
                self.close_connection = True  # no answer at all: the client sees the link break
                return
            try:
                if fault is not None and fault.code is not None:
                    if fault.retry_after is not None:
                        headers["Retry-After"] = fault.retry_after
                    raise ApiError(fault.code, "InternalError", "simulated failure")
                if parsed.path.endswith("/log") and self.command == "GET":
                    self._send_log(parsed.path, query)
                    return
                body = json.loads(raw) if raw else None
                if watch:
                    self._watch(parsed.path, query)
                    return
                result, code = fake.handle(self.command, parsed.path, query, body), 200
                if self.command == "POST":
                    code = 201
            except ApiError as exc:
                result, code = exc.status(), exc.code
            self._send_json(code, result, headers)

        def _send_json(
            self, code: int, payload: Obj, headers: dict[str, str] | None = None
        ) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except OSError:  # the client gave up waiting (a request timeout test)
                self.close_connection = True

        def _send_log(self, path: str, query: dict[str, str]) -> None:
            m = _PATH.match(path.removesuffix("/log"))
            assert m is not None
            ns, name = m.group("ns"), m.group("name")
            if fake.get("pods", ns, name) is None:
                self._send_json(404, ApiError(404, "NotFound", f'pods "{name}" not found').status())
                return
            text = fake.logs.get((ns, name, query.get("container", "")), "")
            if not query.get("container"):
                text = next((v for (n, p, _), v in fake.logs.items() if (n, p) == (ns, name)), "")
            lines = text.splitlines(keepends=True)
            if query.get("tailLines"):
                lines = lines[-int(query["tailLines"]) :]
            data = "".join(lines).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _watch(self, path: str, query: dict[str, str]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            conn: socket.socket = self.connection

            def write(event: Obj) -> None:
                line = json.dumps(event).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()

            def closed() -> bool:
                readable, _, _ = select.select([conn], [], [], 0)
                return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""

            try:
                fake.stream_watch(path, query, write, closed)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:  # the client hung up: what a cancelled watch does
                self.close_connection = True

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

    return Handler
