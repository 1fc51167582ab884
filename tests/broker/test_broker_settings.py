"""The root settings tree: the shipped example loads, and every leaf is documented."""

from __future__ import annotations

import pathlib

import pytest

from aldaas.broker._config import ConfigError, describe_settings, load_settings
from aldaas.broker._settings import Settings

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "local.yaml"


def test_if_the_shipped_example_is_loaded_then_it_is_valid_and_says_what_the_demo_needs() -> None:
    """If examples/local.yaml is loaded, then it parses and sets the demo's pool, folder, ports."""
    s = load_settings(Settings, path=EXAMPLE, environ={})
    assert (s.provider, s.source.kind, s.pool.size) == ("local", "directory", 2)
    assert s.directory.path == pathlib.Path("examples/backups")
    assert s.local.data_dir == pathlib.Path(".aldaas/data")
    assert (s.gateway.port, s.admin.port) == (8765, 9090)
    assert s.gateway.instance_token.startswith("demo-only")
    assert s.admin.token is not None
    assert s.admin.token.startswith("demo-only")


def test_if_the_pool_settings_are_assembled_then_they_carry_the_root_sections() -> None:
    """If pool_settings() is built, then it holds exactly the root tree's pool sections."""
    s = load_settings(
        Settings, environ={"ALDAAS_POOL_SIZE": "5"}, overrides=["lease.ttl=60", "s3.bucket=b"]
    )
    p = s.pool_settings()
    assert (p.pool.size, p.lease.ttl, p.s3.bucket) == (5, 60.0, "b")
    assert (p.local, p.directory, p.check) == (s.local, s.directory, s.check)


def test_if_a_setting_is_unknown_then_the_error_names_the_sections() -> None:
    """If a section is misspelt, then the one-sentence error lists the known sections."""
    with pytest.raises(ConfigError, match=r"unknown setting gatway\.port") as info:
        load_settings(Settings, overrides=["gatway.port=1"])
    assert "gateway" in str(info.value)


def test_if_the_tree_is_described_then_every_broker_leaf_has_a_docstring() -> None:
    """If the reference is generated, then every admin/log/provider leaf has its docstring."""
    mine = [i for i in describe_settings(Settings) if i.path.split(".")[0] in {"admin", "log"}]
    mine += [i for i in describe_settings(Settings) if i.path == "provider"]
    assert len(mine) == 6
    assert [i.path for i in mine if not i.doc] == []
