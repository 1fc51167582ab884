"""Every metric the Grafana dashboard queries is one the broker exports, and the reverse."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aldaas.broker._metrics import exported_metric_names


def test_if_the_dashboard_queries_metrics_then_the_broker_exports_each(
    dashboard_metric_names: set[str],
) -> None:
    """If a dashboard query names a metric, then broker._metrics.exported_metric_names() has it."""
    assert dashboard_metric_names - exported_metric_names() == set()
    # The dashboard shows every exported family (histogram series fold onto their family).
    assert dashboard_metric_names == exported_metric_names()


def test_if_names_are_collected_then_histogram_series_fold_onto_their_family(
    metric_names: Callable[[list[str]], set[str]],
) -> None:
    """If a query reads _bucket/_count series, then the collected name is the family's."""
    queries = [
        "histogram_quantile(0.9, sum by (le) (rate(aldaas_handout_seconds_bucket[5m])))",
        "rate(aldaas_restore_seconds_count[5m]) + aldaas_unknown_thing",
    ]
    assert metric_names(queries) == {
        "aldaas_handout_seconds",
        "aldaas_restore_seconds",
        "aldaas_unknown_thing",
    }


def test_if_the_dashboard_is_read_then_it_has_the_promised_panels(
    dashboard: dict[str, Any],
) -> None:
    """If the dashboard loads, then pool, hand-out, queue, restore and tunnel panels are there."""
    titles = [p["title"] for p in dashboard["panels"] if p["type"] != "row"]
    for title in (
        "Clones by state",
        "Hand-out latency",
        "Queue",
        "Restore progress",
        "Tunnel traffic",
    ):
        assert title in titles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
