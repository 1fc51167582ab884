"""End to end: ``lease.max_active`` through a real broker process and real clients (slow)."""

from __future__ import annotations

import pathlib

import pytest
from aldaas_e2e import Clients, one_sentence, running_broker

pytestmark = pytest.mark.slow


def test_if_the_pool_has_max_active_leases_then_connect_is_refused_with_the_count(
    module_data_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """If lease.max_active leases are active, then another aldaas connect exits 1 with one
    sentence naming the count and the way out, the admin API, metrics and status show the
    limit, and once the first lease is released a new connect gets a database."""
    overrides = ["pool.size=2", "lease.max_active=1"]
    with running_broker(module_data_dir, tmp_path, overrides, warm=2) as broker:
        holder = Clients(broker=broker, state_home=tmp_path / "holder")
        other = Clients(broker=broker, state_home=tmp_path / "other")
        with holder.connect("--port", "0") as held:
            held.dsn()
            broker.wait_until("2 warm clones again", lambda: broker.warm() >= 2)
            refused = other.run("connect", "--port", "0")
            assert refused.returncode == 1, refused.stderr
            assert one_sentence(refused.stderr) == (
                "The pool already has 1 active lease (lease.max_active is 1); end one with "
                "`aldaas release` or wait until one expires, then retry."
            )
            assert broker.warm() == 2
            status, body = broker.api("GET", "/api/status")
            assert status == 200
            assert (body["pool"]["leases_active"], body["pool"]["leases_max_active"]) == (1, 1)
            _, metrics = broker.http("GET", "/metrics")
            assert "aldaas_lease_refusals_total 1.0" in metrics
            assert "aldaas_leases_max_active 1.0" in metrics
            shown = other.run("status")
            assert shown.returncode == 0, shown.stderr
            assert (
                "active leases 1 of at most 1 (lease.max_active); new ones are refused until "
                "one ends"
            ) in shown.stdout
            released = holder.run("release")
            assert released.returncode == 0, released.stderr
        with other.connect("--port", "0") as fresh:
            assert fresh.dsn().startswith("postgresql://")
