"""The life-cycle tables: legal moves, and illegal ones that say state and event."""

from __future__ import annotations

import pytest

from aldaas.pool import CloneState, IllegalTransition, LeaseState, SnapshotState
from aldaas.pool._states import (
    CLONE_TRANSITIONS,
    LEASE_TRANSITIONS,
    SNAPSHOT_TRANSITIONS,
    CloneEvent,
    LeaseEvent,
    SnapshotEvent,
    clone_transition,
    lease_transition,
    snapshot_transition,
)


def test_if_a_snapshot_goes_the_happy_path_then_it_ends_pruned() -> None:
    """If a snapshot is sealed, verified and pruned, then it passes restoring→verifying→ready→pruned."""
    state = SnapshotState.RESTORING
    seen = [state]
    for event in (SnapshotEvent.SEALED, SnapshotEvent.VERIFIED, SnapshotEvent.PRUNED):
        state = snapshot_transition("snap-1", state, event)
        seen.append(state)
    assert [s.value for s in seen] == ["restoring", "verifying", "ready", "pruned"]


@pytest.mark.parametrize("start", [SnapshotState.RESTORING, SnapshotState.VERIFYING])
def test_if_a_pipeline_step_fails_then_the_snapshot_is_failed(start: SnapshotState) -> None:
    """If restoring or verifying fails, then the snapshot becomes failed."""
    assert snapshot_transition("s", start, SnapshotEvent.FAILED) is SnapshotState.FAILED


def test_if_a_ready_snapshot_fails_then_the_error_names_state_and_event() -> None:
    """If a ready snapshot gets `failed`, then IllegalTransition names the snapshot, state and event."""
    with pytest.raises(IllegalTransition) as info:
        snapshot_transition("snap-7", SnapshotState.READY, SnapshotEvent.FAILED)
    assert str(info.value) == "snapshot 'snap-7' in state 'ready' cannot take event 'failed'."


def test_if_a_clone_was_leased_then_no_event_makes_it_warm_again() -> None:
    """If a clone was handed out, then no path in the table leads back to warm (at most once, ever)."""
    reachable = {CloneState.LEASED}
    frontier = [CloneState.LEASED]
    while frontier:
        for nxt in CLONE_TRANSITIONS[frontier.pop()].values():
            if nxt not in reachable:
                reachable.add(nxt)
                frontier.append(nxt)
    assert CloneState.WARM not in reachable
    assert reachable == {
        CloneState.LEASED,
        CloneState.DESTROYING,
        CloneState.GONE,
        CloneState.BROKEN,
    }


def test_if_a_clone_is_handed_out_twice_then_the_second_raises() -> None:
    """If a leased clone gets handed_out again, then IllegalTransition says so."""
    state = clone_transition("c", CloneState.PROVISIONING, CloneEvent.PROVISIONED)
    state = clone_transition("c", state, CloneEvent.HANDED_OUT)
    with pytest.raises(
        IllegalTransition, match="clone 'c' in state 'leased' cannot take event 'handed_out'"
    ):
        clone_transition("c", state, CloneEvent.HANDED_OUT)


def test_if_a_lease_is_attached_then_only_lifetime_expires_it() -> None:
    """If a client is attached, then the idle TTL cannot expire the lease, the lifetime can."""
    with pytest.raises(IllegalTransition, match="'attached' cannot take event 'expire_idle'"):
        lease_transition("l", LeaseState.ATTACHED, LeaseEvent.EXPIRE_IDLE)
    assert (
        lease_transition("l", LeaseState.ATTACHED, LeaseEvent.EXPIRE_LIFETIME) is LeaseState.EXPIRED
    )


def test_if_a_lease_ended_then_it_takes_no_more_events() -> None:
    """If a lease expired or was released, then every event on it is illegal."""
    for state in (LeaseState.EXPIRED, LeaseState.RELEASED):
        for event in LeaseEvent:
            with pytest.raises(IllegalTransition):
                lease_transition("l", state, event)


def test_if_the_tables_are_read_then_every_state_has_a_row() -> None:
    """If any state is looked up, then its table has a row for it (final states: empty rows)."""
    assert set(SNAPSHOT_TRANSITIONS) == set(SnapshotState)
    assert set(CLONE_TRANSITIONS) == set(CloneState)
    assert set(LEASE_TRANSITIONS) == set(LeaseState)
