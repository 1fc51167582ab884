"""The chart's masking step: `transform.sql` becomes a file next to config.yaml and its setting."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

from test_chart_broker_contract import load_broker_settings

Render = Callable[[dict[str, Any] | None], Any]

MASKING_SQL = pathlib.Path(__file__).resolve().parents[2] / "examples" / "masking.sql"


def test_if_transform_sql_is_set_then_the_broker_runs_it_before_verifying(
    render: Render, tmp_path: pathlib.Path
) -> None:
    """If transform.sql holds examples/masking.sql, then the ConfigMap carries it verbatim as
    transform.sql, and the broker's loaded settings point transform.sql_file at its mount."""
    sql = MASKING_SQL.read_text(encoding="utf-8")
    rendered = render({"transform": {"sql": sql}})
    (data,) = [m["data"] for m in rendered.manifests if m["kind"] == "ConfigMap"]
    assert data["transform.sql"].strip() == sql.strip()
    settings = load_broker_settings(rendered, tmp_path)
    assert settings.transform.sql_file == pathlib.Path("/etc/aldaas/transform.sql")


def test_if_transform_sql_is_empty_then_there_is_no_masking_step(
    render: Render, tmp_path: pathlib.Path
) -> None:
    """If transform.sql is left empty (the default), then no transform file or setting exists."""
    rendered = render(None)
    (data,) = [m["data"] for m in rendered.manifests if m["kind"] == "ConfigMap"]
    assert "transform.sql" not in data
    assert load_broker_settings(rendered, tmp_path).pool_settings().transform_command() is None
