"""``aldaas serve``: the pool, the gateway and the admin listener in one trio process.

The broker is the only place that knows both the pool and the tunnel. It
turns a gateway *session* into a pool *lease* (same id; the session secret is
the lease secret) and a lease into an address:

================================  =============================================
gateway hook                      pool call
================================  =============================================
``open_session`` (token checked)  ``acquire`` (queue position sent as PROGRESS)
``verify_session``                ``verify_secret``
``resolve`` (per new stream)      the lease's current clone address (a reset
                                  swaps the clone, the local port stays)
``attached`` / ``detached``       ``attached`` / ``detached`` (idle TTL pauses
                                  while a client is attached)
``traffic``                       ``traffic`` (idle TTL counts from real use)
``control``                       ``reset`` / ``release`` / ``extend`` /
                                  status / snapshots
pool event ``LeaseEnded``         ``Gateway.close_session`` (client told why)
================================  =============================================

Every long-lived part runs under one nursery through
:func:`broker._supervise.supervised`. SIGTERM and SIGINT drain: the pool
stops handing out, the gateway closes its websockets with "going away"
(clients resume against the next broker), leases and their databases keep
running, and the process exits 0.
"""

from __future__ import annotations

import collections
import hmac
import math
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any, Protocol

import attrs
import structlog
import trio

from aldaas import pool, tunnel

from ._admin import AdminApp, StartupError, serve_admin
from ._metrics import Metrics, Readings
from ._settings import Settings
from ._supervise import supervised

log = structlog.get_logger("aldaas.broker")

TASKS = ("pool", "leader", "gateway", "admin")
COMPONENTS = ("adopt", "destroy", "health", "lease", "pipeline", "provision", "prune", "source")
"""The pool's background steps (``PoolErrorEvent.component``), pre-created as 0 in the metrics."""

_ENDED = {
    "released": "the lease was released",
    "killed": "the lease was killed by an administrator",
    "expired_idle": "the lease expired after its idle TTL with no client attached",
    "expired_lifetime": "the lease reached its maximum lifetime",
    "lost": "the lease's database was lost",
}
_ENDED_REMEMBERED = 4096
"""Ended leases whose reason the broker keeps for returning clients (about 100 bytes each)."""


def trio_tasks() -> int:
    """Trio tasks alive in this run (0 outside one): the load benchmarks look for leaks with it."""
    try:
        root = trio.lowlevel.current_root_task()
    except RuntimeError:
        return 0

    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(t) for n in task.child_nurseries for t in n.child_tasks)

    return count(root) if root is not None else 0


class Elector(Protocol):
    """What the broker needs of leader election (``pool.LeaderElector``)."""

    @property
    def is_leader(self) -> bool: ...

    async def serve(
        self,
        while_leader: Callable[[], Awaitable[None]] | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None: ...


@attrs.frozen(kw_only=True)
class Running:
    """What ``serve`` reports once every listener is up."""

    gateway_port: int
    admin_port: int
    stop: Callable[[], None] = attrs.field(eq=False, repr=False)
    """Begin the same graceful stop as SIGTERM (for embedding and tests)."""


def _refusal(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text[0].upper() + text[1:]


class Broker:
    """Implements the gateway hooks and the admin backend over one :class:`pool.Pool`."""

    def __init__(
        self,
        settings: Settings,
        the_pool: pool.Pool,
        metrics: Metrics | None = None,
        *,
        elector: Elector | None = None,
    ):
        self.settings = settings
        self.pool = the_pool
        self.elector = elector
        """With several replicas (Kubernetes): every replica hands out and answers for leases,
        only the elected one runs the pool's background work (pipeline, keeper, TTL, pruning)."""
        self.metrics = metrics or Metrics(self.readings, tasks=TASKS, components=COMPONENTS)
        self.gateway: tunnel.Gateway | None = None
        self.draining = False
        self._attached: set[str] = set()
        self._closing_self: set[str] = set()
        """Leases released over their own session: the session ends when its client hangs up
        (ending it at once would cut the answer to the release; left alone, it would wait out
        the gateway's grace period)."""
        self._admin_failures = 0
        self._admin_locked_until = -math.inf
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()
        """Why recent leases ended (newest last, at most ``_ENDED_REMEMBERED``): a client that
        comes back after a long disconnect learns that its lease expired, not "unknown"."""
        self._unsubscribe = the_pool.add_observer(self.on_pool_event)

    # -- metrics ---------------------------------------------------------------------------

    def readings(self) -> Readings:
        stats = self.pool.statistics()
        restore = stats.restore
        gw = self.gateway.statistics() if self.gateway is not None else None
        return Readings(
            clones=stats.clones,
            queue_length=stats.queue_length,
            restore_done_bytes=restore.progress.done_bytes if restore else 0,
            restore_total_bytes=restore.progress.total_bytes if restore else 0,
            snapshots=stats.snapshots_by_status,
            snapshot_age_seconds=stats.snapshot_age_seconds,
            source_last_success=stats.source.last_success_at,
            leases_active=stats.leases_active,
            leases_max_active=stats.leases_max_active,
            gateway_sessions=gw.sessions if gw else 0,
            gateway_streams=gw.streams if gw else 0,
            gateway_bytes_up=gw.bytes_up_total if gw else 0,
            gateway_bytes_down=gw.bytes_down_total if gw else 0,
            gateway_auth_failures=gw.auth_failures_total if gw else 0,
            gateway_refused=gw.refused_total if gw else 0,
            gateway_handshakes=gw.handshakes if gw else 0,
            gateway_memory_held_bytes=gw.memory_held_bytes if gw else 0,
            trio_tasks=trio_tasks(),
        )

    def on_pool_event(self, event: pool.PoolEvent) -> None:
        m = self.metrics
        match event:
            case pool.LeaseHandedOut(seconds=seconds):
                m.observe_handout(seconds)
            case pool.QueueLeft(seconds=seconds):
                m.observe_queue_wait(seconds)
            case pool.CloneProvisioned(seconds=seconds):
                m.observe_provision(seconds)
            case pool.RestoreFinished(seconds=seconds, bytes=n):
                m.observe_restore(seconds)
                m.add_restore_bytes(n)
            case pool.LeaseReset():
                m.lease_reset()
            case pool.LeaseRefused():
                m.lease_refused()
            case pool.LeaseEnded(lease_id=lease_id, reason=reason):
                if reason in ("expired_idle", "expired_lifetime"):
                    m.lease_expired()
                self._ended[lease_id] = reason
                while len(self._ended) > _ENDED_REMEMBERED:
                    self._ended.popitem(last=False)
                self._attached.discard(lease_id)
                if lease_id not in self._closing_self and self.gateway is not None:
                    self.gateway.close_session(lease_id, _ENDED.get(reason, reason) + ".")
            case pool.PoolErrorEvent(component=component):
                m.error(component)
            case _:
                pass

    # -- admin backend ---------------------------------------------------------------------

    def is_ready(self) -> tuple[bool, str]:
        stats = self.pool.statistics()
        if self.draining or stats.draining:
            return False, "The broker is draining and hands out no new databases."
        if self.gateway is None:
            return False, "The gateway is not listening yet."
        if stats.newest_ready_snapshot is None:
            if stats.restore is not None:
                return False, "No snapshot is ready yet; the first restore is in progress."
            return False, _not_ready_reason(stats)
        return True, ""

    def status(self, you: str | None = None, *, every_lease: bool = True) -> dict[str, Any]:
        """The pool's state; ``every_lease=False`` lists only the lease ``you`` (a lease
        holder sees the totals and its own lease, never another's id)."""
        stats = self.pool.statistics()
        ready, reason = self.is_ready()
        restore = stats.restore
        out: dict[str, Any] = {
            "ready": ready,
            "reason": reason,
            "draining": self.draining or stats.draining,
            "leader": self.elector.is_leader if self.elector is not None else True,
            "pool": {
                "size": self.pool.settings.pool.size,
                "clones": dict(stats.clones),
                "queue_length": stats.queue_length,
                "leases_active": stats.leases_active,
                "leases_max_active": stats.leases_max_active,
            },
            "snapshots": [_snapshot_json(s) for s in stats.snapshots],
            "leases": [
                _lease_json(lease)
                for lease in stats.leases
                if every_lease or (you is not None and lease.id == you)
            ],
            "source": {
                "description": stats.source.description,
                "last_success_at": stats.source.last_success_at,
                "last_error": stats.source.last_error,
                "last_error_at": stats.source.last_error_at,
                "backups_found": stats.source.backups_found,
            },
            "restore": None
            if restore is None
            else {
                "snapshot": restore.snapshot,
                "backup": restore.backup_key,
                "done_bytes": restore.progress.done_bytes,
                "total_bytes": restore.progress.total_bytes,
                "rate_bytes_per_second": restore.progress.rate_bytes_per_second,
                "eta_seconds": restore.progress.eta_seconds,
                "stalled_seconds": restore.stalled_seconds,
            },
        }
        if you is not None:
            out["you"] = you
        return out

    async def kill_lease(self, lease_id: str) -> bool:
        try:
            await self.pool.kill(lease_id)
        except pool.LeaseNotFoundError:
            return False
        return True

    async def refresh(self) -> None:
        self.pool.trigger_refresh()

    async def drain(self) -> None:
        if not self.draining:
            log.info("broker.draining")
        self.draining = True
        self.pool.drain()

    # -- gateway hooks ---------------------------------------------------------------------

    async def open_session(
        self, params: tunnel.JSONObject, progress: tunnel.ProgressCallback
    ) -> tunnel.SessionGrant:
        ttl = params.get("ttl")
        if ttl is not None and not (
            isinstance(ttl, int | float) and not isinstance(ttl, bool) and math.isfinite(ttl)
        ):
            raise tunnel.SessionRefused(f"The TTL must be a number of seconds, got {ttl!r}.")
        labels = {"name": str(params["name"])[:63]} if isinstance(params.get("name"), str) else {}

        def on_progress(p: pool.QueueProgress) -> None:
            progress(
                {
                    "queue_position": p.position,
                    "queue_length": p.queue_length,
                    "eta_seconds": p.eta_seconds,
                }
            )

        try:
            lease = await self.pool.acquire(
                ttl=float(ttl) if ttl is not None else None, labels=labels, on_progress=on_progress
            )
        except pool.PoolError as exc:
            raise tunnel.SessionRefused(_refusal(exc)) from None
        assert lease.secret is not None
        return tunnel.SessionGrant(
            session_id=lease.id, secret=lease.secret, info=_lease_info(lease)
        )

    async def verify_session(self, session_id: str, secret: str) -> bool:
        if self.pool.verify_secret(session_id, secret):
            return True
        reason = self._ended.get(session_id)
        if reason is not None:
            # Only that it ended and why: what `aldaas status` showed every token holder.
            raise tunnel.SessionRefused(
                f"your lease {session_id} has ended: {_ENDED.get(reason, reason)}"
            )
        return False

    def resolve(self, session_id: str) -> tuple[str, int]:
        endpoint = _running(self.pool.lease(session_id))
        return endpoint.host, endpoint.port

    async def resolve_legacy(self, name: str, session: str) -> tunnel.LegacyRoute:
        try:
            endpoint = _running(self.pool.lease(session))
        except pool.LeaseNotFoundError:
            raise tunnel.SessionRefused(
                f"There is no active lease {session!r}; acquire one with aldaas connect."
            ) from None
        return tunnel.LegacyRoute(session_id=session, host=endpoint.host, port=endpoint.port)

    def attached(self, session_id: str) -> None:
        if session_id in self._attached:
            return
        try:
            self.pool.attached(session_id)
        except pool.LeaseNotFoundError:
            return
        self._attached.add(session_id)

    def detached(self, session_id: str) -> None:
        if session_id in self._closing_self:
            self._closing_self.discard(session_id)
            if self.gateway is not None:
                self.gateway.close_session(session_id, _ENDED["released"] + ".")
            return
        if session_id in self._attached:
            self._attached.discard(session_id)
            self.pool.detached(session_id)

    def traffic(self, session_id: str, bytes_up: int, bytes_down: int) -> None:
        if bytes_up or bytes_down:
            self.pool.traffic(session_id)

    def session_ended(self, session_id: str, reason: str) -> None:
        self._closing_self.discard(session_id)
        self.detached(session_id)

    async def control(
        self, session_id: str | None, name: str, args: tunnel.JSONObject
    ) -> tunnel.JSONValue:
        if name == "status":
            you = session_id or self._verified_or_none(args)
            return _json(self.status(you, every_lease=self._admin(args)))
        if name == "snapshots":
            return [_snapshot_json(s) for s in self.pool.statistics().snapshots]
        if name not in ("reset", "release", "extend", "takeover"):
            raise tunnel.ControlError(
                f"Unknown request {name!r}; use status, snapshots, reset, release, extend "
                "or takeover."
            )
        lease_id = session_id or self._verified(args)
        if name == "takeover":
            # A restarted client takes its lease back: the gateway forgets the stale session
            # (its streams died with the old process), so the new process attaches afresh.
            closed = self.gateway is not None and self.gateway.close_session(
                lease_id, "another aldaas connect took over this lease."
            )
            return {"taken_over": bool(closed)}
        try:
            if name == "reset":
                lease = await self.pool.reset(lease_id)
                return _json(_lease_info(lease))
            if name == "release":
                if session_id is not None:
                    self._closing_self.add(lease_id)
                try:
                    await self.pool.release(lease_id)
                except BaseException:
                    self._closing_self.discard(lease_id)
                    raise
                return {"released": lease_id}
            ttl = args.get("ttl")
            if ttl is not None and (not isinstance(ttl, int | float) or isinstance(ttl, bool)):
                raise tunnel.ControlError(f"The TTL must be a number of seconds, got {ttl!r}.")
            lease = await self.pool.extend(lease_id, ttl=float(ttl) if ttl is not None else None)
            return _json(_lease_info(lease))
        except pool.LeaseNotFoundError:
            raise tunnel.ControlError(
                f"The lease {lease_id!r} has ended (released or expired); "
                "run aldaas connect to get a new one."
            ) from None
        except pool.PoolError as exc:
            raise tunnel.ControlError(_refusal(exc)) from None

    def _admin(self, args: tunnel.JSONObject) -> bool:
        """Whether a control request carries the admin token (``admin_token``): it sees every
        lease, as the admin API does. A wrong one is refused, and after a failure further
        tries wait (0.1 s doubling, at most 5 s) so that the token cannot be guessed over an
        instance-token connection."""
        given = args.get("admin_token")
        if given is None:
            return False
        now = trio.current_time()
        if now < self._admin_locked_until:
            raise tunnel.ControlError(
                "An admin token was wrong moments ago; retry in a few seconds "
                "(without one, status shows your own lease only)."
            )
        expected = self.settings.admin.token
        if not (
            isinstance(given, str)
            and expected
            and hmac.compare_digest(given.encode(), expected.encode())
        ):
            if now - self._admin_locked_until > 600:
                self._admin_failures = 0
            self._admin_failures += 1
            self._admin_locked_until = now + min(5.0, 0.1 * 2 ** min(self._admin_failures - 1, 16))
            log.warning("broker.admin_token_refused", via="control", failures=self._admin_failures)
            raise tunnel.ControlError(
                "The admin token is wrong; check ALDAAS_ADMIN_TOKEN "
                "(without one, status shows your own lease only)."
            )
        return True

    def _verified_or_none(self, args: tunnel.JSONObject) -> str | None:
        lease_id, secret = args.get("lease"), args.get("secret")
        valid = isinstance(lease_id, str) and isinstance(secret, str)
        if valid and self.pool.verify_secret(str(lease_id), str(secret)):
            return str(lease_id)
        return None

    def _verified(self, args: tunnel.JSONObject) -> str:
        lease_id = self._verified_or_none(args)
        if lease_id is None:
            shown = args.get("lease")
            raise tunnel.ControlError(
                f"The lease {shown!r} is unknown, ended, or its secret does not match; "
                "run aldaas connect to get a new one."
            )
        return lease_id

    # -- running ---------------------------------------------------------------------------

    async def run_gateway(self, *, task_status: trio.TaskStatus[int]) -> None:
        s = self.settings.gateway
        try:
            async with trio.open_nursery() as nursery:
                try:
                    gateway: tunnel.Gateway = await nursery.start(
                        partial(tunnel.serve_gateway, s, self)
                    )
                except OSError as exc:
                    raise StartupError(
                        f"The gateway cannot listen on {s.host}:{s.port} ({exc.strerror or exc}); "
                        "set gateway.host/gateway.port to a free address."
                    ) from None
                self.gateway = gateway
                task_status.started(gateway.port)
        finally:
            self.gateway = None


def _running(lease: pool.Lease) -> pool.Endpoint:
    """The lease's database address; refused while its database is being started again."""
    if lease.endpoint is None:
        raise tunnel.SessionRefused(
            f"the database of lease {lease.id} is being started again on its data after its "
            "server was lost (an eviction, a node failure); connect again in a few seconds."
        )
    return lease.endpoint


def _lease_info(lease: pool.Lease) -> dict[str, tunnel.JSONValue]:
    e = _running(lease)  # a hand-out's clone is always running
    return {
        "lease": lease.id,
        "user": e.user,
        "database": e.database,
        "password": e.password,
        "snapshot": lease.snapshot,
        "ttl": lease.ttl,
        "expires_at": lease.expires_at,
        "resets": lease.resets,
    }


def _lease_json(lease: pool.LeaseInfo) -> dict[str, Any]:
    return {
        "id": lease.id,
        "state": lease.state,
        "attached": lease.attached,
        "clone": lease.clone,
        "snapshot": lease.snapshot,
        "ttl": lease.ttl,
        "labels": dict(lease.labels),
        "created_at": lease.created_at,
        "expires_at": lease.expires_at,
        "idle_deadline": lease.idle_deadline,
        "resets": lease.resets,
    }


def _failed_newest(snapshots: Sequence[pool.SnapshotInfo]) -> pool.SnapshotInfo | None:
    """The newest snapshot if its restore failed (the backup people expect to see is broken)."""
    newest = max(snapshots, key=lambda s: s.created_at, default=None)
    return newest if newest is not None and newest.status == "failed" else None


def _not_ready_reason(stats: pool.PoolStatistics) -> str:
    """Why no snapshot is ready (none is restoring): the source, the last restore, or waiting."""
    source = stats.source
    if source.last_error is not None:
        return (
            f"No snapshot is ready yet; the backup source fails: {source.last_error.rstrip('.')}."
        )
    failed = _failed_newest(stats.snapshots)
    if failed is not None:
        return (
            f"No snapshot is ready yet; the last restore of {failed.backup_key} failed "
            f"({failed.reason}); fix the backup and trigger a refresh."
        )
    if source.backups_found == 0:
        return (
            f"No snapshot is ready yet; there is no backup in {source.description}; "
            "put one there or fix the source's prefix and suffix."
        )
    return "No snapshot is ready yet; the broker is waiting for a backup."


def _snapshot_json(s: pool.SnapshotInfo) -> dict[str, Any]:
    return {
        "name": s.name,
        "status": s.status,
        "backup": s.backup_key,
        "created_at": s.created_at,
        "ready_at": s.ready_at,
        "age_seconds": s.age_seconds,
        "reason": s.reason,
        "database": s.database,
        "tolerated": s.tolerated,
    }


def _json(value: Mapping[str, Any]) -> tunnel.JSONObject:
    """Plain JSON (tuples → lists, mappings → dicts) for a control answer."""

    def conv(v: Any) -> tunnel.JSONValue:
        if isinstance(v, Mapping):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [conv(x) for x in v]
        if v is None or isinstance(v, str | int | float | bool):
            return v
        return str(v)

    return {str(k): conv(v) for k, v in value.items()}


def make_pool(settings: Settings) -> tuple[pool.Pool, pool.Provider]:
    """The pool over the configured provider and source, and the provider (to close it)."""
    provider: pool.Provider
    if settings.provider == "kubernetes":
        if settings.source.kind != "s3":
            raise StartupError(
                "The kubernetes provider restores backups from S3 (its restore Job downloads "
                f"them), but source.kind is {settings.source.kind!r}; set source.kind: s3."
            )
        provider = pool.KubernetesProvider(
            settings.kubernetes, lease_superuser=settings.lease.superuser
        )
    else:
        provider = pool.LocalProvider(settings.local, lease_superuser=settings.lease.superuser)
    source: pool.Source
    if settings.source.kind == "s3":
        source = pool.S3Source(settings.s3)
    else:
        source = pool.DirectorySource(settings.directory)
    return pool.Pool(settings.pool_settings(), provider, source), provider


async def serve(
    settings: Settings,
    *,
    parts: tuple[pool.Pool, pool.Provider] | None = None,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the broker until SIGTERM/SIGINT (or cancellation); drain, then return.

    ``parts`` replaces the pool and provider built from ``settings`` (tests).
    """
    folder_lock: pool.DataFolderLock | None = None
    if parts is None and settings.provider != "kubernetes":
        folder_lock = pool.DataFolderLock(settings.local.data_dir)
    the_pool, provider = parts if parts is not None else make_pool(settings)
    elector: Elector | None = None
    if settings.provider == "kubernetes" and parts is None:
        elector = pool.LeaderElector(settings.kubernetes)
    broker = Broker(settings, the_pool, elector=elector)
    app = AdminApp(broker, broker.metrics.exposition, token=settings.admin.token)
    restart = broker.metrics.task_restarted
    stopping = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, stopping)
            admin_port = await nursery.start(
                partial(
                    supervised,
                    "admin",
                    partial(serve_admin, app, host=settings.admin.listen, port=settings.admin.port),
                    on_restart=restart,
                )
            )
            pool_scope = trio.CancelScope()
            gateway_scope = trio.CancelScope()

            async def run_pool(task_status: trio.TaskStatus[None]) -> None:
                with pool_scope:
                    if elector is None:
                        await supervised(
                            "pool", the_pool.run, on_restart=restart, task_status=task_status
                        )
                        return
                    # Several replicas: every one serves hand-outs and leases; the elected one
                    # also leads (pipeline, keeper, health, TTL, pruning). Losing the election
                    # cancels lead(); winning it again starts it anew.
                    async with trio.open_nursery() as inner:
                        await inner.start(
                            partial(supervised, "pool", the_pool.serve, on_restart=restart)
                        )
                        inner.start_soon(
                            partial(
                                supervised,
                                "leader",
                                partial(elector.serve, the_pool.lead),
                                on_restart=restart,
                            )
                        )
                        task_status.started()

            async def run_gateway(task_status: trio.TaskStatus[int]) -> None:
                with gateway_scope:
                    await supervised(
                        "gateway", broker.run_gateway, on_restart=restart, task_status=task_status
                    )

            await nursery.start(run_pool)
            gateway_port = await nursery.start(run_gateway)
            log.info("broker.serving", gateway_port=gateway_port, admin_port=admin_port)
            task_status.started(
                Running(gateway_port=gateway_port, admin_port=admin_port, stop=stopping.set)
            )
            await stopping.wait()
            await broker.drain()
            gateway_scope.cancel()  # websockets close with 1001: clients resume elsewhere
            pool_scope.cancel()  # leases and clones keep running; the next broker adopts them
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(30):
            await provider.aclose()
        if folder_lock is not None:
            folder_lock.release()
    log.info("broker.stopped", leases=the_pool.statistics().leases_active)


async def _watch_signals(stopping: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("broker.stopping", signal=signal.Signals(signum).name)
            stopping.set()
