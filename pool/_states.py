"""The life cycles of snapshots, clones and leases, written down once as tables.

Each table maps ``state -> {event: next state}``; anything not in the table
is illegal and :func:`transition` raises :class:`IllegalTransition` naming the
thing, its state and the event. The pool never assigns a state directly: it
asks this module for the next one. Plain data and functions, no I/O.

Snapshot::

    restoring --sealed--> verifying --verified--> ready --pruned--> pruned
    restoring|verifying --failed--> failed --pruned--> pruned   (after the grace period)

Clone::

    provisioning --provisioned--> warm --handed_out--> leased --retired--> destroying
    destroying --destroyed--> gone
    provisioning|warm|leased --broke--> broken --retired--> destroying
    provisioning|warm --retired--> destroying      (verify clone done, roll-over, drain)

Lease::

    idle <--attach/detach--> attached      (both "active"; the idle TTL runs only in idle)
    idle --expire_idle--> expired          (idle TTL passed with nobody attached)
    idle|attached --expire_lifetime--> expired
    idle|attached --release--> released    (release or admin kill)
    idle|attached --reset--> same state    (the clone is swapped, the lease id stays)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TypeVar


class IllegalTransition(RuntimeError):
    """A life-cycle event arrived in a state that does not allow it (a bug in the caller)."""

    def __init__(self, thing: str, name: str, state: enum.Enum, event: enum.Enum) -> None:
        super().__init__(
            f"{thing} {name!r} in state {state.value!r} cannot take event {event.value!r}."
        )
        self.thing = thing
        self.name = name
        self.state = state
        self.event = event


class SnapshotState(enum.Enum):
    RESTORING = "restoring"
    """A volume is being restored into (it is not yet a snapshot)."""
    VERIFYING = "verifying"
    """Sealed; a throwaway clone is running the check command."""
    READY = "ready"
    """Verified; warm clones are made from it."""
    FAILED = "failed"
    """Restore, seal or verification failed; only a record with the reason is left."""
    PRUNED = "pruned"
    """Deleted (newer ready snapshots exist, or a failed one outlived its grace period)."""


class SnapshotEvent(enum.Enum):
    SEALED = "sealed"
    VERIFIED = "verified"
    FAILED = "failed"
    PRUNED = "pruned"


class CloneState(enum.Enum):
    PROVISIONING = "provisioning"
    """Being cloned from a snapshot and started."""
    WARM = "warm"
    """Running, healthy, never handed out: ready for an acquire."""
    LEASED = "leased"
    """Handed out to exactly one lease (at most once, ever)."""
    DESTROYING = "destroying"
    """Being stopped and deleted."""
    GONE = "gone"
    """Deleted."""
    BROKEN = "broken"
    """Failed to start or found dead; will be destroyed."""


class CloneEvent(enum.Enum):
    PROVISIONED = "provisioned"
    HANDED_OUT = "handed_out"
    RETIRED = "retired"
    BROKE = "broke"
    DESTROYED = "destroyed"


class LeaseState(enum.Enum):
    IDLE = "idle"
    """Active, nobody attached: the idle TTL is running."""
    ATTACHED = "attached"
    """Active, at least one client attached: the idle TTL is paused."""
    EXPIRED = "expired"
    """Idle TTL or maximum lifetime passed; the clone is destroyed."""
    RELEASED = "released"
    """Released by its holder or killed by an admin; the clone is destroyed."""


class LeaseEvent(enum.Enum):
    ATTACH = "attach"
    DETACH = "detach"
    RESET = "reset"
    EXPIRE_IDLE = "expire_idle"
    EXPIRE_LIFETIME = "expire_lifetime"
    RELEASE = "release"


_S = SnapshotState
_SE = SnapshotEvent
SNAPSHOT_TRANSITIONS: Mapping[SnapshotState, Mapping[SnapshotEvent, SnapshotState]] = {
    _S.RESTORING: {_SE.SEALED: _S.VERIFYING, _SE.FAILED: _S.FAILED},
    _S.VERIFYING: {_SE.VERIFIED: _S.READY, _SE.FAILED: _S.FAILED},
    _S.READY: {_SE.PRUNED: _S.PRUNED},
    _S.FAILED: {_SE.PRUNED: _S.PRUNED},
    _S.PRUNED: {},
}

_C = CloneState
_CE = CloneEvent
CLONE_TRANSITIONS: Mapping[CloneState, Mapping[CloneEvent, CloneState]] = {
    _C.PROVISIONING: {_CE.PROVISIONED: _C.WARM, _CE.BROKE: _C.BROKEN, _CE.RETIRED: _C.DESTROYING},
    _C.WARM: {_CE.HANDED_OUT: _C.LEASED, _CE.BROKE: _C.BROKEN, _CE.RETIRED: _C.DESTROYING},
    _C.LEASED: {_CE.RETIRED: _C.DESTROYING, _CE.BROKE: _C.BROKEN},
    _C.BROKEN: {_CE.RETIRED: _C.DESTROYING},
    _C.DESTROYING: {_CE.DESTROYED: _C.GONE},
    _C.GONE: {},
}

_L = LeaseState
_LE = LeaseEvent
LEASE_TRANSITIONS: Mapping[LeaseState, Mapping[LeaseEvent, LeaseState]] = {
    _L.IDLE: {
        _LE.ATTACH: _L.ATTACHED,
        _LE.RESET: _L.IDLE,
        _LE.EXPIRE_IDLE: _L.EXPIRED,
        _LE.EXPIRE_LIFETIME: _L.EXPIRED,
        _LE.RELEASE: _L.RELEASED,
    },
    _L.ATTACHED: {
        _LE.DETACH: _L.IDLE,
        _LE.RESET: _L.ATTACHED,
        _LE.EXPIRE_LIFETIME: _L.EXPIRED,
        _LE.RELEASE: _L.RELEASED,
    },
    _L.EXPIRED: {},
    _L.RELEASED: {},
}

ACTIVE_LEASE_STATES = frozenset({LeaseState.IDLE, LeaseState.ATTACHED})
LIVE_CLONE_STATES = frozenset(
    {CloneState.PROVISIONING, CloneState.WARM, CloneState.LEASED, CloneState.BROKEN}
)
"""Clones that still exist (or are being made) and so pin their snapshot against pruning."""

_St = TypeVar("_St", bound=enum.Enum)
_Ev = TypeVar("_Ev", bound=enum.Enum)


def transition(
    table: Mapping[_St, Mapping[_Ev, _St]], thing: str, name: str, state: _St, event: _Ev
) -> _St:
    """The state after ``event``; raises :class:`IllegalTransition` if the table has no such move."""
    try:
        return table[state][event]
    except KeyError:
        raise IllegalTransition(thing, name, state, event) from None


def snapshot_transition(name: str, state: SnapshotState, event: SnapshotEvent) -> SnapshotState:
    return transition(SNAPSHOT_TRANSITIONS, "snapshot", name, state, event)


def clone_transition(name: str, state: CloneState, event: CloneEvent) -> CloneState:
    return transition(CLONE_TRANSITIONS, "clone", name, state, event)


def lease_transition(name: str, state: LeaseState, event: LeaseEvent) -> LeaseState:
    return transition(LEASE_TRANSITIONS, "lease", name, state, event)
