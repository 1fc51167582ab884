"""How the Kubernetes provider survives API errors: retries, 410 Gone, timeouts, cancelled watches."""

from __future__ import annotations

import attrs
import pytest
import trio
from k8s_fake_api import FakeKubernetes, Fault, PodOutcome, wait_until
from kubernetes import client
from structlog.testing import capture_logs

from aldaas.pool import ConflictError, Kind, ProviderError, TemporaryProviderError
from aldaas.pool.providers.kubernetes._provider import KubernetesProvider
from aldaas.pool.providers.kubernetes._settings import KubernetesSettings

NS = "test"


def make_ready(fake: FakeKubernetes, name: str) -> None:
    fake.update_status(
        "pods",
        NS,
        name,
        {
            "phase": "Running",
            "podIP": "127.0.0.9",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    )


async def test_if_the_api_answers_500_once_then_the_call_is_retried_and_logged(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If one request gets HTTP 500, then the provider retries it and logs the retry."""
    await provider.create_volume("v", {})
    fake.faults.append(Fault("GET", "/persistentvolumeclaims", code=500, times=1))
    with capture_logs() as logs:
        (volume,) = await provider.list(Kind.VOLUME)
    assert volume.name == "v"
    retries = [e for e in logs if e["event"] == "kubernetes.api_retry"]
    assert len(retries) == 1
    assert retries[0]["attempt"] == 1
    assert "HTTP 500" in retries[0]["error"]


async def test_if_the_api_keeps_failing_then_a_temporary_error_reaches_the_caller(
    provider: KubernetesProvider, fake: FakeKubernetes, settings: KubernetesSettings
) -> None:
    """If every attempt gets HTTP 503, then TemporaryProviderError after api_retries attempts."""
    fake.faults.append(Fault("GET", "/pods/aldaas-c", code=503, times=100))
    before = len(fake.requests)
    with capture_logs() as logs, pytest.raises(TemporaryProviderError) as caught:
        await provider.is_healthy("c")
    assert str(caught.value) == (
        'the Kubernetes API answered HTTP 503 to read pod "aldaas-c" (simulated failure); '
        "retrying is safe."
    )
    assert len(fake.requests) - before == settings.api_retries
    assert [e["event"] for e in logs][-1] == "kubernetes.api_gave_up"


@pytest.mark.slow
async def test_if_a_request_times_out_then_it_is_retried(
    settings: KubernetesSettings, fake: FakeKubernetes, api_client: client.ApiClient
) -> None:
    """If the API does not answer within request_timeout_seconds, then the call is retried."""
    provider = KubernetesProvider(attrs.evolve(settings, request_timeout_seconds=0.2), api_client)
    await provider.create_volume("v", {})
    fake.faults.append(Fault("GET", "/pods/aldaas-v", code=None, delay=0.6, times=1))
    with capture_logs() as logs:
        assert await provider.is_healthy("v") is True
    retries = [e["error"] for e in logs if e["event"] == "kubernetes.api_retry"]
    assert any("did not answer read pod" in error for error in retries)


async def test_if_the_object_already_exists_then_create_adopts_it(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If create_volume runs again after a restart, then the 409 AlreadyExists adopts the objects
    (the volume's Secret too: the endpoint keeps its admin password)."""
    first = await provider.create_volume("v", {"status": "restoring"})
    with capture_logs() as logs:
        again = await provider.create_volume("v", {"status": "restoring"})
    assert again == first
    assert [e["what"] for e in logs if e["event"] == "kubernetes.adopted"] == [
        "PVC",
        "Secret",
        "pod",
    ]


async def test_if_a_conflict_answer_was_for_our_own_lost_write_then_set_meta_succeeds(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If a claim's reply is lost and the retry sees 409, then set_meta checks the object and succeeds."""
    await provider.create_volume("v", {})
    (volume,) = await provider.list(Kind.VOLUME)
    # The PATCH lands, but its answer is an error; the retry then conflicts with our own write.
    original = fake._patch

    def patch_then_fail(*args: object, **kwargs: object) -> object:
        original(*args, **kwargs)  # type: ignore[arg-type]
        fake._patch = original  # type: ignore[method-assign]
        from k8s_fake_api import ApiError

        raise ApiError(504, "Timeout", "the reply was lost")

    fake._patch = patch_then_fail  # type: ignore[method-assign]
    claimed = await provider.set_meta(
        Kind.VOLUME, "v", {"lease": "l1"}, expect_version=volume.version
    )
    assert dict(claimed.meta) == {"lease": "l1"}
    with pytest.raises(ConflictError):
        await provider.set_meta(Kind.VOLUME, "v", {"lease": "l2"}, expect_version=volume.version)


async def test_if_a_watch_gets_410_gone_then_the_provider_relists_and_watches_again(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If the history was compacted before the watch, then 410 Gone leads to a re-list and a new watch."""
    fake.pod_rule = lambda pod: PodOutcome(ready=False)
    fake.compact_on_next_watch = True
    endpoints = []
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:

            async def create() -> None:
                endpoints.append(await provider.create_volume("v", {}))

            nursery.start_soon(create)
            await wait_until(lambda: fake.watch_requests >= 2 and fake.open_watches == 1)
            make_ready(fake, "aldaas-v")
    assert endpoints[0].host == "127.0.0.9"
    assert [e["event"] for e in logs].count("kubernetes.watch_expired") == 1


async def test_if_opening_a_watch_answers_http_410_then_the_provider_relists(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If the server refuses the watch's version with HTTP 410, then the provider re-lists too."""
    fake.pod_rule = lambda pod: PodOutcome(ready=False)
    fake.faults.append(Fault("GET", "/pods", code=410, times=1, watch=True))
    endpoints = []
    async with trio.open_nursery() as nursery:

        async def create() -> None:
            endpoints.append(await provider.create_volume("v", {}))

        nursery.start_soon(create)
        await wait_until(lambda: fake.open_watches == 1)
        make_ready(fake, "aldaas-v")
    assert endpoints[0].host == "127.0.0.9"


async def test_if_a_waiting_call_is_cancelled_then_no_watch_thread_stays_blocked(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If a create waiting on a watch is cancelled, then its reader thread ends and the socket closes."""
    fake.pod_rule = lambda pod: PodOutcome(ready=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(provider.create_volume, "v", {})
        await wait_until(lambda: fake.open_watches == 1 and provider.watch_threads == 1)
        nursery.cancel_scope.cancel()
    assert provider.watch_threads == 0
    # The server sees the client hang up, long before the watch's own timeout (5 s here).
    await wait_until(lambda: fake.open_watches == 0)


@pytest.mark.slow
async def test_if_the_watch_times_out_on_the_server_then_the_wait_continues(
    settings: KubernetesSettings, fake: FakeKubernetes, api_client: client.ApiClient
) -> None:
    """If the server ends a watch at timeoutSeconds, then the provider lists and watches again."""
    provider = KubernetesProvider(attrs.evolve(settings, watch_timeout_seconds=1), api_client)
    fake.pod_rule = lambda pod: PodOutcome(ready=False)
    endpoints = []
    async with trio.open_nursery() as nursery:

        async def create() -> None:
            endpoints.append(await provider.create_volume("v", {}))

        nursery.start_soon(create)
        await wait_until(lambda: fake.watch_requests >= 2 and fake.open_watches == 1)
        make_ready(fake, "aldaas-v")
    assert endpoints[0].host == "127.0.0.9"


async def test_if_waits_fill_the_watch_slots_then_a_claim_still_gets_through(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If more steps wait on watches than there are watch slots, then calls are not starved."""
    await provider.create_volume("v", {})
    (volume,) = await provider.list(Kind.VOLUME)
    fake.pod_rule = lambda pod: PodOutcome(ready=False)
    async with trio.open_nursery() as nursery:
        for name in ("w1", "w2", "w3"):  # the test client's pool of 4 has 2 watch slots
            nursery.start_soon(provider.create_volume, name, {})
        await wait_until(lambda: fake.open_watches == 2)
        with trio.fail_after(3):  # well before any of those watches ends (5 s)
            claimed = await provider.set_meta(
                Kind.VOLUME, "v", {"lease": "l"}, expect_version=volume.version
            )
        assert claimed.meta["lease"] == "l"
        nursery.cancel_scope.cancel()
    assert provider.watch_threads == 0


async def test_if_the_pod_is_deleted_while_starting_then_create_fails_at_once(
    provider: KubernetesProvider, fake: FakeKubernetes
) -> None:
    """If someone deletes the database pod during the wait, then ProviderError now, not at the timeout."""
    fake.pod_rule = lambda pod: PodOutcome(ready=False)
    async with trio.open_nursery() as nursery:

        async def create() -> None:
            with pytest.raises(ProviderError, match="deleted while starting"):
                await provider.create_volume("v", {})

        nursery.start_soon(create)
        await wait_until(lambda: fake.open_watches == 1)
        fake.remove("pods", NS, "aldaas-v")
    assert provider.watch_threads == 0


@pytest.mark.parametrize(
    "retry_after", ["1", "Wed, 21 Oct 2015 07:28:00 GMT"], ids=["seconds", "past-date"]
)
async def test_if_the_api_answers_429_with_retry_after_then_the_retry_waits_that_long(
    provider: KubernetesProvider,
    fake: FakeKubernetes,
    settings: KubernetesSettings,
    retry_after: str,
) -> None:
    """If a request gets 429 with Retry-After, then the retry is scheduled no sooner than the
    header asks (an HTTP date in the past: the usual back-off), and the call then succeeds."""
    await provider.create_volume("v", {})
    fault = Fault("GET", "/persistentvolumeclaims", code=429, times=1, retry_after=retry_after)
    fake.faults.append(fault)
    with capture_logs() as logs:
        (volume,) = await provider.list(Kind.VOLUME)
    assert volume.name == "v"
    (retry,) = [e for e in logs if e["event"] == "kubernetes.api_retry"]
    expected = 1.0 if retry_after == "1" else settings.api_retry_delay_seconds
    assert retry["retry_in"] == expected
    assert "HTTP 429" in retry["error"]
