"""Lease-based leader election among broker replicas (coordination.k8s.io/v1), client-go's rules.

Only the leader runs the background work (snapshot pipeline, warm keeper,
pruning); followers serve hand-outs from the state on the objects. Expiry is
judged on the local monotonic clock, never by comparing wall clocks.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import structlog
import trio

from ..._provider import ConflictError, NotFoundError, ProviderError
from . import _manifests as manifests
from ._client import LEASES, MERGE_PATCH, Client
from ._manifests import Obj
from ._settings import KubernetesSettings

log = structlog.get_logger()


def _utcnow_micro() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
        self._client = Client(settings, api_client)
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
        """What the Lease says; a field of the wrong type counts as absent (never a crash)."""
        spec = lease.get("spec") or {}
        return LeaseRecord(
            holder=str(spec.get("holderIdentity") or ""),
            duration_seconds=_number(spec.get("leaseDurationSeconds")),
            renew_time=str(spec.get("renewTime") or ""),
            transitions=int(_number(spec.get("leaseTransitions"))),
            version=str((lease.get("metadata") or {}).get("resourceVersion") or ""),
        )

    def _holding(self, record: LeaseRecord | None) -> Obj:
        """The Lease naming this replica as holder (a new term when ``record`` names another)."""
        now = _utcnow_micro()
        new_term = record is None or record.holder != self.identity
        return manifests.lease(
            self._election.lease_name,
            holder=self.identity,
            duration_seconds=self._election.lease_duration_seconds,
            renew_time=now,
            acquire_time=now if new_term else None,
            transitions=(record.transitions + 1 if record is not None else 0) if new_term else None,
        )

    async def _try_take(self, renewing: bool = False) -> bool:
        """Create, take over or renew the Lease; every write is an update carrying its resourceVersion."""
        name = self._election.lease_name
        try:
            try:
                lease = await self._client.call("read", LEASES, name)
            except NotFoundError:
                self._lease = await self._client.call("create", LEASES, body=self._holding(None))
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
            self._lease = await self._write(self._holding(record), record.version)
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

    async def _write(self, lease: Obj, version: str) -> Obj:
        """Merge-patch our spec fields over the Lease at ``version`` (409 if it changed since).

        Only the fields election owns are sent, never what was read: fields this
        client does not know (a newer server, a webhook) stay as they are.
        """
        patch = {"metadata": {"resourceVersion": version}, "spec": lease["spec"]}
        name = self._election.lease_name
        return dict(
            await self._client.call("patch", LEASES, name, body=patch, _content_type=MERGE_PATCH)
        )

    async def _release(self) -> None:
        record, lease = self._observed[0], self._lease
        if record is None or lease is None or record.holder != self.identity:
            return
        released = manifests.lease(
            self._election.lease_name,
            holder="",
            duration_seconds=1,
            renew_time=_utcnow_micro(),
            acquire_time=None,
            transitions=None,
        )
        try:
            await self._write(released, record.version)
            log.info("kubernetes.leader_released", identity=self.identity)
        except ProviderError as exc:
            log.warning("kubernetes.leader_release_failed", identity=self.identity, error=str(exc))


def _number(value: Any) -> float:
    """A Lease's numeric field as a float; anything else (a newer server's form) counts as 0."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return 0.0
