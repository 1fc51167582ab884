"""Fuzz the settings loader with Hypothesis: YAML texts, environment values and --set strings.

Whatever arrives, ``load_settings`` either returns the settings tree or
raises :class:`ConfigError` with one line of text; values given for
secret-named settings never appear in that text.
"""

from __future__ import annotations

import pathlib
import string
import tempfile
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aldaas.broker._config import ConfigError, _is_secret, _leaf_paths, env_name, load_settings
from aldaas.pool import PoolSettings

pytestmark = pytest.mark.slow

LEAVES = [path for path, _ in _leaf_paths(PoolSettings)]
SECTIONS = sorted({path.split(".")[0] for path in LEAVES})
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["", "~", "-1", "1e400", "nan", "0x10", "yes", "../../etc", "\x00", "$(x)"])
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
keys = st.sampled_from(SECTIONS + LEAVES) | st.text(max_size=10)


def tree_for(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """Nest ``a.b`` keys into ``{"a": {"b": ...}}`` (later keys win)."""
    tree: dict[str, Any] = {}
    for key, value in items:
        parts = key.split(".")
        node = tree
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return tree


def load(**kwargs: Any) -> None:
    try:
        result = load_settings(PoolSettings, **kwargs)
    except ConfigError as exc:
        message = str(exc)
        assert message
        assert "\n" not in message, message  # one line, whatever names the input held
        return
    assert isinstance(result, PoolSettings)


def load_text(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "aldaas.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        load(path=path)


@FUZZ
@given(st.text(max_size=200))
def test_if_the_config_file_is_any_text_then_only_config_errors_escape(text: str) -> None:
    """If the YAML file holds arbitrary text, then it loads or raises ConfigError, nothing else."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return
    load_text(text)


@FUZZ
@given(st.lists(st.tuples(keys, values), max_size=6))
def test_if_the_config_file_holds_odd_values_then_only_config_errors_escape(
    items: list[tuple[str, Any]],
) -> None:
    """If real and unknown keys hold values of every type, then ConfigError is the only error."""
    load_text(yaml.safe_dump(tree_for(items), allow_unicode=True))


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.text(max_size=40),
            st.tuples(st.sampled_from(LEAVES) | st.text(max_size=12), st.text(max_size=20)).map(
                lambda kv: f"{kv[0]}={kv[1]}"
            ),
        ),
        max_size=4,
    ),
    st.dictionaries(
        st.sampled_from([env_name(p) for p in LEAVES]), st.text(max_size=20), max_size=3
    ),
)
def test_if_set_flags_and_environment_are_anything_then_only_config_errors_escape(
    flags: list[str], environ: dict[str, str]
) -> None:
    """If --set strings and ALDAAS_* variables hold any text, then ConfigError is the only error."""
    load(overrides=flags, environ=environ)


@FUZZ
@given(
    st.sampled_from([p for p in LEAVES if _is_secret(p)]),
    st.text(alphabet=string.ascii_letters + string.digits, min_size=12, max_size=30),
    st.sampled_from(["{}", "[1, 2]", "12"]),
)
def test_if_a_secret_setting_gets_a_bad_value_then_the_error_does_not_echo_it(
    path: str, secret: str, wrong: str
) -> None:
    """If a secret-named setting is set wrongly, then the error never shows what was given."""
    section, field = path.rsplit(".", 1)
    text = yaml.safe_dump({section: {field: {"nested": secret}}})
    with tempfile.TemporaryDirectory() as folder:
        config = pathlib.Path(folder) / "aldaas.yaml"
        config.write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_settings(PoolSettings, path=config, overrides=[f"{path}.x={wrong}"])
        assert secret not in str(caught.value)
