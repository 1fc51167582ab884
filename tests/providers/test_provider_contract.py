"""What every :class:`pool.Provider` must do, written once and run against all three.

The fake (the pool's tests stand on it), the local provider (real PostgreSQL)
and the Kubernetes provider (on the fake API server) each run every case here;
see conftest.py for how each is set up. A case that fails for one provider
only is a drift between them: the pool, written against the Protocol, would
behave differently on it.
"""

from __future__ import annotations

import pytest
import trio
from provider_backends import BASELINE, SNAPSHOT, VOLUME, Backend, LiveProvider

from aldaas.pool import (
    ConflictError,
    Kind,
    NotFoundError,
    ProviderError,
    Resource,
    TemporaryProviderError,
)


def _by_key(resources: object) -> dict[tuple[Kind, str], Resource]:
    assert isinstance(resources, list | tuple)
    return {(r.kind, r.name): r for r in resources}


def _permanent(exc: BaseException) -> bool:
    return isinstance(exc, ProviderError) and not isinstance(exc, TemporaryProviderError)


async def test_if_a_new_provider_lists_then_it_adopts_everything_with_meta_endpoint_and_version(
    backend: Backend, provider: LiveProvider
) -> None:
    """If a restarted broker's provider lists, then it finds every resource as the last one left it."""
    endpoint = await provider.clone(SNAPSHOT, "adopt-c", {"state": "warm", "lease": "L1"})
    record = await provider.record_failed_snapshot("adopt-f", {"status": "failed", "why": "x"})
    before = _by_key(await provider.list())

    async with backend.provider() as restarted:
        found = _by_key(await restarted.list())
        assert set(found) == BASELINE | {(Kind.CLONE, "adopt-c"), (Kind.SNAPSHOT, "adopt-f")}
        assert found == before
        clone = found[Kind.CLONE, "adopt-c"]
        assert dict(clone.meta) == {"state": "warm", "lease": "L1"}
        assert clone.endpoint == endpoint
        assert found[Kind.SNAPSHOT, "adopt-f"].version == record.version
        assert dict(found[Kind.SNAPSHOT, SNAPSHOT].meta) == {
            "status": "ready",
            "backup_key": "base.sql",
        }
        assert found[Kind.SNAPSHOT, SNAPSHOT].endpoint is None
        assert found[Kind.VOLUME, VOLUME].endpoint is not None
        assert [r.name for r in await restarted.list(Kind.CLONE)] == ["adopt-c"]
        assert {r.name for r in await restarted.list(Kind.SNAPSHOT)} == {SNAPSHOT, "adopt-f"}
        assert [r.name for r in await restarted.list(Kind.VOLUME)] == [VOLUME]
        # What it adopted it can go on with: a claim at the listed version lands.
        claimed = await restarted.set_meta(
            Kind.CLONE, "adopt-c", {"state": "leased"}, expect_version=clone.version
        )
        assert dict(claimed.meta) == {"state": "leased"}


async def test_if_meta_is_compare_and_set_at_a_stale_version_then_it_conflicts_and_nothing_changes(
    provider: LiveProvider,
) -> None:
    """If set_meta carries a version someone else wrote over, then ConflictError and the winner stays."""
    (volume,) = await provider.list(Kind.VOLUME)
    first = await provider.set_meta(
        Kind.VOLUME, VOLUME, {"state": "a", "keep": "1"}, expect_version=volume.version
    )
    assert (first.kind, first.name, dict(first.meta)) == (
        Kind.VOLUME,
        VOLUME,
        {"state": "a", "keep": "1"},
    )
    assert first.version not in ("", volume.version)
    with pytest.raises(ConflictError) as caught:
        await provider.set_meta(Kind.VOLUME, VOLUME, {"state": "b"}, expect_version=volume.version)
    assert _permanent(caught.value)
    assert VOLUME in str(caught.value)
    (now,) = await provider.list(Kind.VOLUME)
    assert (dict(now.meta), now.version) == ({"state": "a", "keep": "1"}, first.version)
    blind = await provider.set_meta(Kind.VOLUME, VOLUME, {"state": "c"})  # no version: replace
    assert dict(blind.meta) == {"state": "c"}  # a key left out is gone
    (now,) = await provider.list(Kind.VOLUME)
    assert (dict(now.meta), now.version) == ({"state": "c"}, blind.version)


async def test_if_two_providers_claim_one_clone_at_the_same_version_then_exactly_one_wins(
    backend: Backend, provider: LiveProvider
) -> None:
    """If two replicas compare-and-set one warm clone with the version both listed, then one loses."""
    await provider.clone(SNAPSHOT, "claimed", {"state": "warm"})
    (warm,) = await provider.list(Kind.CLONE)
    outcomes: dict[str, str] = {}

    async def claim(replica: LiveProvider, lease: str) -> None:
        try:
            await replica.set_meta(
                Kind.CLONE,
                "claimed",
                {"state": "leased", "lease": lease},
                expect_version=warm.version,
            )
            outcomes[lease] = "won"
        except ConflictError:
            outcomes[lease] = "lost"

    async with backend.provider() as other, trio.open_nursery() as nursery:
        nursery.start_soon(claim, provider, "lease-a")
        nursery.start_soon(claim, other, "lease-b")
    assert sorted(outcomes.values()) == ["lost", "won"]
    (winner,) = (lease for lease, outcome in outcomes.items() if outcome == "won")
    (claimed,) = await provider.list(Kind.CLONE)
    assert dict(claimed.meta) == {"state": "leased", "lease": winner}


async def test_if_a_snapshot_is_cloned_then_each_clone_runs_apart_and_the_snapshot_stays(
    provider: LiveProvider,
) -> None:
    """If a snapshot is cloned twice, then two healthy clones with their meta; the snapshot is unchanged."""
    (snapshot,) = [r for r in await provider.list(Kind.SNAPSHOT) if r.name == SNAPSHOT]
    first = await provider.clone(SNAPSHOT, "twin-1", {"state": "warm", "n": "1"})
    second = await provider.clone(SNAPSHOT, "twin-2", {"state": "warm", "n": "2"})
    assert (first.host, first.port) != (second.host, second.port)
    clones = _by_key(await provider.list(Kind.CLONE))
    assert {name: dict(r.meta) for (_, name), r in clones.items()} == {
        "twin-1": {"state": "warm", "n": "1"},
        "twin-2": {"state": "warm", "n": "2"},
    }
    assert clones[Kind.CLONE, "twin-1"].endpoint == first
    for name in ("twin-1", "twin-2"):
        assert await provider.is_healthy(name) is True
        assert provider.alive(name) is True
    (after,) = [r for r in await provider.list(Kind.SNAPSHOT) if r.name == SNAPSHOT]
    assert after == snapshot
    # Made again under the same name (a retried step), it is the same clone, not a second one.
    again = await provider.clone(SNAPSHOT, "twin-1", {"state": "warm", "n": "1"})
    assert again == first
    assert sorted(r.name for r in await provider.list(Kind.CLONE)) == ["twin-1", "twin-2"]


async def test_if_seal_runs_again_after_it_finished_then_it_returns_the_snapshot(
    provider: LiveProvider,
) -> None:
    """If a restarted pipeline seals a volume again, then it gets the snapshot made the first time."""
    await provider.create_volume("resealed", {"status": "restoring"})
    first = await provider.seal("resealed", "resealed-snap", {"status": "verifying"})
    assert (first.kind, first.name, dict(first.meta)) == (
        Kind.SNAPSHOT,
        "resealed-snap",
        {"status": "verifying"},
    )
    assert (Kind.VOLUME, "resealed") not in _by_key(await provider.list())
    again = await provider.seal("resealed", "resealed-snap", {"status": "verifying"})
    assert (again.name, again.version, dict(again.meta)) == (
        first.name,
        first.version,
        dict(first.meta),
    )


async def test_if_destroy_is_repeated_or_names_nothing_then_it_succeeds(
    provider: LiveProvider,
) -> None:
    """If a resource is destroyed twice, or one that never was, then no error and it is gone."""
    await provider.clone(SNAPSHOT, "doomed", {"state": "warm"})
    await provider.record_failed_snapshot("doomed-record", {"status": "failed"})
    await provider.record_failed_snapshot("doomed-record", {"status": "failed"})  # idempotent too
    assert sum(r.name == "doomed-record" for r in await provider.list(Kind.SNAPSHOT)) == 1
    for _ in range(2):
        await provider.destroy(Kind.CLONE, "doomed")
        await provider.destroy(Kind.SNAPSHOT, "doomed-record")
    # Asked before the next list(): the Kubernetes provider forgets what it destroyed once a
    # list no longer shows it, and then answers "cannot know" (True) like for any unseen name.
    assert provider.alive("doomed") is False
    for kind in Kind:
        await provider.destroy(kind, "never-made")
    assert set(_by_key(await provider.list())) == BASELINE
    assert await provider.is_healthy("doomed") is False
    with pytest.raises(NotFoundError):
        await provider.set_meta(Kind.CLONE, "doomed", {"state": "leased"})


async def test_if_a_clones_database_dies_then_is_healthy_says_so_and_alive_after_a_list(
    backend: Backend, provider: LiveProvider
) -> None:
    """If a clone's database dies, then is_healthy is False, and list() shows it down and tells alive()."""
    await provider.clone(SNAPSHOT, "victim", {"state": "warm"})
    await provider.clone(SNAPSHOT, "bystander", {"state": "warm"})
    assert provider.alive("victim") is True
    await backend.kill("victim")
    assert await provider.is_healthy("victim") is False
    listed = _by_key(await provider.list(Kind.CLONE))
    assert listed[Kind.CLONE, "victim"].endpoint is None
    assert listed[Kind.CLONE, "bystander"].endpoint is not None
    assert provider.alive("victim") is False
    assert provider.alive("bystander") is True
    assert await provider.is_healthy("bystander") is True


async def test_if_alive_is_asked_about_any_name_then_it_answers_at_once_without_raising(
    provider: LiveProvider,
) -> None:
    """If alive() gets a name never made or not even valid, then it answers a bool (never raises)."""
    assert isinstance(provider.alive("never-made"), bool)  # may be "cannot know cheaply"
    assert provider.alive("Not A/Name") is False


async def test_if_a_step_cannot_ever_succeed_then_its_error_is_permanent_and_leaves_nothing(
    provider: LiveProvider,
) -> None:
    """If a clone, seal or set_meta names what is missing, unclonable or invalid, then a permanent error."""
    await provider.record_failed_snapshot("failed-snap", {"status": "failed"})
    before = await provider.list()
    with pytest.raises(NotFoundError) as missing_snapshot:
        await provider.clone("no-such-snap", "orphan", {})
    with pytest.raises(ProviderError) as record_clone:
        await provider.clone("failed-snap", "orphan", {})
    with pytest.raises(NotFoundError) as missing_volume:
        await provider.seal("no-such-volume", "orphan-snap", {})
    with pytest.raises(NotFoundError) as missing_clone:
        await provider.set_meta(Kind.CLONE, "no-such-clone", {"state": "leased"})
    with pytest.raises(NotFoundError) as wrong_kind:
        await provider.set_meta(Kind.CLONE, VOLUME, {"state": "leased"})  # a volume, not a clone
    with pytest.raises(ProviderError) as bad_name:
        await provider.clone(SNAPSHOT, "Not A/Name", {})
    errors = [missing_snapshot, record_clone, missing_volume, missing_clone, wrong_kind, bad_name]
    assert [_permanent(e.value) for e in errors] == [True] * len(errors)
    assert "failed-snap" in str(record_clone.value)
    assert "Not A/Name" in str(bad_name.value)
    assert await provider.list() == before


@pytest.mark.parametrize("backend", ["kubernetes"], indirect=True)
async def test_if_the_service_behind_the_provider_is_briefly_down_then_errors_are_temporary(
    backend: Backend, provider: LiveProvider
) -> None:
    """If the API fails for a while, then calls raise TemporaryProviderError with a delay, and work after.

    Only for providers that talk to a service (the local one and the fake have
    none: nothing they do can fail for a while and then work by itself).
    """
    assert backend.outage is not None
    (volume,) = await provider.list(Kind.VOLUME)
    with backend.outage():
        with pytest.raises(TemporaryProviderError) as listing:
            await provider.list()
        with pytest.raises(TemporaryProviderError) as writing:
            await provider.set_meta(Kind.VOLUME, VOLUME, {"state": "x"})
        with pytest.raises(TemporaryProviderError) as cloning:
            await provider.clone(SNAPSHOT, "during-outage", {})
    assert [e.value.delay > 0 for e in (listing, writing, cloning)] == [True] * 3
    assert set(_by_key(await provider.list())) == BASELINE
    written = await provider.set_meta(
        Kind.VOLUME, VOLUME, {"state": "x"}, expect_version=volume.version
    )
    assert dict(written.meta) == {"state": "x"}
