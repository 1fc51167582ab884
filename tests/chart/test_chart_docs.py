"""docs/kubernetes.md documents every value the chart has, and nothing it does not."""

from __future__ import annotations

import pathlib
import re
from typing import Any

import yaml

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "kubernetes.md"


def _documented_keys() -> set[str]:
    """The keys in the guide's Values table."""
    text = DOC.read_text()
    table = text.split("\n## Values\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([A-Za-z0-9_.]+)` \|", table, flags=re.MULTILINE))


def _leaves(node: Any, prefix: str = "") -> set[str]:
    """Dotted paths of every leaf in a values mapping."""
    if not isinstance(node, dict) or not node:
        return {prefix}
    return {leaf for k, v in node.items() for leaf in _leaves(v, f"{prefix}{k}.")}


def test_if_values_yaml_has_a_key_then_the_guide_documents_it(chart_dir: pathlib.Path) -> None:
    """If values.yaml has a key, then the guide's Values table lists it or the map holding it."""
    values = yaml.safe_load((chart_dir / "values.yaml").read_text())
    documented = _documented_keys()
    leaves = {leaf.rstrip(".") for leaf in _leaves(values)}
    missing = sorted(
        leaf
        for leaf in leaves
        if not any(leaf == key or leaf.startswith(key + ".") for key in documented)
    )
    assert missing == []


def test_if_the_guide_lists_a_key_then_values_yaml_has_it(chart_dir: pathlib.Path) -> None:
    """If the guide's Values table lists a key, then values.yaml defines it (no stale rows)."""
    values = yaml.safe_load((chart_dir / "values.yaml").read_text())
    stale = []
    for key in sorted(_documented_keys()):
        node = values
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                stale.append(key)
                break
            node = node[part]
    assert stale == []
    assert len(_documented_keys()) >= 70
