"""Hand-out cost of the Kubernetes provider: one compare-and-set of a clone's meta.

Runs against the fake API server of tests/k8s (real HTTP on loopback, the real
`kubernetes` client), so the figures show what the provider adds per claim —
threads, the client's serialisation, request count — not a real API server's
latency. Two variants: a claim at the version the provider just listed (one
PATCH), and a claim by a provider that has not listed it (GET of the PVC, PATCH, GET of the pod for the endpoint).

    /tmp/dev/bin/python bench/k8s_claim.py [--clones 200] [--runs 5]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import structlog
import trio

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "k8s")]

from k8s_fake_api import FakeKubernetes  # noqa: E402
from kubernetes import client  # noqa: E402

from aldaas.pool import Kind  # noqa: E402
from aldaas.pool.providers.kubernetes._provider import KubernetesProvider  # noqa: E402
from aldaas.pool.providers.kubernetes._settings import KubernetesSettings  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run_once(clones: int) -> dict[str, list[float]]:
    fake = FakeKubernetes()
    fake.start()
    api = client.ApiClient(client.Configuration(host=fake.url))
    settings = KubernetesSettings(namespace="bench")
    provider = KubernetesProvider(settings, api)
    try:
        await provider.create_volume("v", {})
        await provider.seal("v", "s", {"status": "ready"})
        for i in range(clones):
            await provider.clone("s", f"c{i}", {"state": "warm"})
        timings: dict[str, list[float]] = {"listed (1 PATCH)": [], "unlisted (3 requests)": []}
        warm = {r.name: r for r in await provider.list(Kind.CLONE)}
        cold = KubernetesProvider(settings, api)
        for i in range(clones):
            name = f"c{i}"
            who, label = (
                (provider, "listed (1 PATCH)") if i % 2 else (cold, "unlisted (3 requests)")
            )
            started = time.perf_counter()
            await who.set_meta(
                Kind.CLONE, name, {"state": "leased"}, expect_version=warm[name].version
            )
            timings[label].append((time.perf_counter() - started) * 1000)
        return timings
    finally:
        await provider.aclose()
        api.close()
        fake.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clones", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    medians: dict[str, list[float]] = {}
    p99s: dict[str, list[float]] = {}
    for _ in range(args.runs):
        for label, values in trio.run(run_once, args.clones).items():
            medians.setdefault(label, []).append(statistics.median(values))
            p99s.setdefault(label, []).append(percentile(values, 0.99))
    print(f"claims per run: {args.clones // 2} per variant, runs: {args.runs}")
    for label in medians:
        print(
            f"{label:22s} median of run medians {statistics.median(medians[label]):.2f} ms, "
            f"median of run p99s {statistics.median(p99s[label]):.2f} ms"
        )


if __name__ == "__main__":
    main()
