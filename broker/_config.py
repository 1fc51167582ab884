"""One settings tree, built once from a YAML file, the environment and flags.

Every package describes its own settings as ``@attrs.frozen(kw_only=True)``
classes; this module turns untrusted text into such a tree, and nothing else
reads configuration. Precedence, lowest first: field defaults, the YAML file,
``ALDAAS_<SECTION>_<FIELD>`` environment variables, ``--set section.field=value``
flags. Anything it cannot place is an error that names the key, the value seen
and what is allowed; secrets are never echoed back.
"""

from __future__ import annotations

import ast
import difflib
import enum
import inspect
import itertools
import pathlib
import textwrap
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import attrs
import yaml

T = TypeVar("T")

ENV_PREFIX = "ALDAAS_"
_SECRET_WORDS = ("token", "secret", "password")


class ConfigError(ValueError):
    """The configuration cannot be used; ``str()`` is one sentence that says what to change."""


@attrs.frozen(kw_only=True)
class SettingInfo:
    """One leaf setting, for documentation and error messages."""

    path: str
    type_name: str
    default: object
    doc: str
    env: str


def _is_secret(path: str) -> bool:
    leaf = path.rsplit(".", 1)[-1].lower()
    return any(word in leaf for word in _SECRET_WORDS) or leaf.endswith("_key")


def _shown(path: str, value: object) -> str:
    return "<redacted>" if _is_secret(path) else repr(value)


def _named(path: str) -> str:
    """A setting name for a message: untrusted (YAML keys, --set), so printable and short."""
    return path if path.isprintable() and len(path) <= 120 else repr(path[:120])


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_settings_class(tp: object) -> bool:
    return isinstance(tp, type) and attrs.has(tp)


def _type_name(tp: object) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(repr(m.value) for m in tp)
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _convert(path: str, tp: Any, value: object, origin_desc: str, *, from_text: bool) -> object:
    """Turn ``value`` into ``tp`` or raise :class:`ConfigError` naming ``path``."""

    def fail(expected: str) -> ConfigError:
        return ConfigError(
            f"setting {_named(path)} ({origin_desc}) must be {expected}, "
            f"got {_shown(path, value)}; "
            f"fix it or remove it to use the default"
        )

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (from_text and value in ("", "null", "~"))):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(path, arg, value, origin_desc, from_text=from_text)
            except ConfigError as exc:
                errors.append(exc)
        raise fail(_type_name(tp))
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        raise fail("one of " + ", ".join(repr(a) for a in allowed))
    if tp is Any or tp is object:
        return value
    if _is_settings_class(tp):
        if not isinstance(value, Mapping):
            raise fail("a mapping of settings")
        return _build(tp, value, path, origin_desc)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value in (member.value, member.name):
                return member
        raise fail("one of " + ", ".join(repr(m.value) for m in tp))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
        raise fail("true or false")
    if tp is int:
        if isinstance(value, bool):
            raise fail("a whole number")
        if isinstance(value, int):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise fail("a whole number")
    if tp is float:
        if isinstance(value, bool):
            raise fail("a number")
        if isinstance(value, int | float):
            return float(value)
        if from_text and isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise fail("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise fail("a string")
    if tp is pathlib.Path:
        if isinstance(value, str | pathlib.Path) and str(value):
            return pathlib.Path(value).expanduser()
        raise fail("a path")
    if origin in (tuple, list):
        item_types: list[Any] = [a for a in typing.get_args(tp) if a is not Ellipsis] or [str]
        if from_text and isinstance(value, str):
            value = (
                _yaml_text(value, fail, "a list")
                if value.strip().startswith("[")
                else value.split(",")
            )
        if not isinstance(value, list | tuple):
            raise fail("a list")
        items = [
            _convert(f"{path}[{i}]", item_types[0], item, origin_desc, from_text=from_text)
            for i, item in enumerate(typing.cast("Sequence[object]", value))
        ]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        key_tp, val_tp = typing.get_args(tp) or (str, str)
        if from_text and isinstance(value, str):
            value = _yaml_text(value, fail, "a mapping")
        if not isinstance(value, Mapping):
            raise fail("a mapping")
        return {
            _convert(f"{path}.<key>", key_tp, k, origin_desc, from_text=False): _convert(
                f"{path}.{k}", val_tp, v, origin_desc, from_text=False
            )
            for k, v in value.items()
        }
    raise ConfigError(f"setting {path} has a type this loader does not know ({tp!r}); report a bug")


def _yaml_text(text: str, fail: Callable[[str], ConfigError], expected: str) -> object:
    """Parse a flag's or variable's YAML value; broken YAML is a ConfigError, never a YAMLError."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise fail(f"{expected} written as YAML (e.g. {{a: b}} or [a, b])") from None


def _build(cls: type[T], data: Mapping[str, object], prefix: str, origin_desc: str) -> T:
    hints = _hints(cls)
    fields = {f.name: f for f in attrs.fields(typing.cast("Any", cls))}
    kwargs: dict[str, object] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(
                f"setting name {key!r} under {prefix or 'the top level'} ({origin_desc}) "
                "must be a string; quote it"
            )
        name = key.replace("-", "_")
        path = f"{prefix}.{name}" if prefix else name
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            known = ", ".join(sorted(fields))
            raise ConfigError(
                f"unknown setting {_named(path)} ({origin_desc}){hint} "
                f"(known under {prefix or 'the top level'}: {known})"
            )
        kwargs[name] = _convert(path, hints[name], value, origin_desc, from_text=False)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"settings under {prefix or 'the top level'} are invalid: {exc}") from exc


def _leaf_paths(cls: type, prefix: str = "") -> Iterator[tuple[str, Any]]:
    hints = _hints(cls)
    for f in attrs.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if _is_settings_class(tp):
            yield from _leaf_paths(tp, path)
        else:
            yield path, tp


def env_name(path: str) -> str:
    """``pool.max_provisioning`` → ``ALDAAS_POOL_MAX_PROVISIONING``."""
    return ENV_PREFIX + path.replace(".", "_").upper()


def _set_path(tree: dict[str, Any], path: str, value: object) -> None:
    parts = path.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_leaf(cls: type, path: str, origin_desc: str) -> Any:
    """The type of leaf ``path`` in ``cls``'s tree, or a ConfigError naming the unknown part."""
    node: Any = cls
    walked = ""
    for part in path.replace("-", "_").split("."):
        if not _is_settings_class(node):
            raise ConfigError(
                f"unknown setting {_named(path)} ({origin_desc}): {walked} has no sub-settings"
            )
        fields = [f.name for f in attrs.fields(node)]
        if part not in fields:
            close = difflib.get_close_matches(part, fields, n=1)
            hint = f"; did you mean {walked + '.' if walked else ''}{close[0]}?" if close else ""
            raise ConfigError(
                f"unknown setting {_named(path)} ({origin_desc}){hint} "
                f"(known under {walked or 'the top level'}: {', '.join(sorted(fields))})"
            )
        node = _hints(node)[part]
        walked = f"{walked}.{part}" if walked else part
    return node


def load_settings(
    cls: type[T],
    *,
    path: pathlib.Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Build ``cls`` from defaults, the YAML file at ``path``, ``environ`` and ``overrides``.

    ``overrides`` are ``section.field=value`` strings (the CLI's ``--set``).
    Environment variables that are not a known setting are ignored (the
    client's own ``ALDAAS_TOKEN`` and friends share the prefix).
    """
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot read the config file {str(path)!r} ({exc.strerror or exc}); "
                "check the path given to --config"
            ) from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(
                f"the config file {str(path)!r} is not valid YAML{where}; fix the syntax there"
            ) from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"the config file {str(path)!r} must hold a mapping of sections at the top level, "
                f"got a {type(loaded).__name__}"
            )
        tree = _merge(tree, loaded)
        # Validate the file on its own first so errors name the file, not "environment".
        _build(cls, tree, "", f"in {path.name}")

    typed_overrides: list[tuple[str, Any, str]] = []
    if environ:
        leaves = {env_name(p): (p, tp) for p, tp in _leaf_paths(cls)}
        for name, raw in environ.items():
            if name in leaves:
                leaf, tp = leaves[name]
                typed_overrides.append((leaf, tp, f"from {name}"))
                _set_path(tree, leaf, _convert(leaf, tp, raw, f"from {name}", from_text=True))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"--set expects section.field=value, got {item.split('=', 1)[0]!r}; "
                "for example --set pool.size=5"
            )
        desc = f"from --set {_named(key)}"
        tp = _resolve_leaf(cls, key, desc)
        if _is_settings_class(tp):
            raise ConfigError(
                f"--set {_named(key)} names a section, not a setting; name one of its fields"
            )
        _set_path(tree, key.replace("-", "_"), _convert(key, tp, raw.strip(), desc, from_text=True))
    return _build(cls, tree, "", "in the configuration")


def _field_docs(cls: type) -> dict[str, str]:
    """Read the string literal that follows each field in the class body (kopf-style docs)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0]
    if not isinstance(body, ast.ClassDef):
        return {}
    docs: dict[str, str] = {}
    statements = body.body
    for stmt, nxt in itertools.pairwise(statements):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def describe_settings(cls: type, prefix: str = "") -> list[SettingInfo]:
    """Every leaf setting of ``cls`` with type, default and doc, for the configuration reference."""
    out: list[SettingInfo] = []
    hints = _hints(cls)
    docs = _field_docs(cls)
    for f in attrs.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if _is_settings_class(tp):
            out.extend(describe_settings(tp, path))
            continue
        if isinstance(f.default, attrs.Factory):  # type: ignore[arg-type]
            factory = f.default.factory
            default = factory() if not f.default.takes_self else None
        else:
            default = f.default
        if _is_secret(path) and default:
            default = "<redacted>"
        out.append(
            SettingInfo(
                path=path,
                type_name=_type_name(tp),
                default=default,
                doc=docs.get(f.name, ""),
                env=env_name(path),
            )
        )
    return out


def render_reference(cls: type, *, title: str = "Configuration reference") -> str:
    """The Markdown reference of every setting of ``cls`` (``aldaas settings`` prints it)."""
    lines = [
        f"# {title}",
        "",
        "Generated by `aldaas settings` from the settings classes; do not edit by hand.",
        "",
        "Precedence, lowest first: the default, the YAML file given to `--config`, the",
        "environment variable, `--set section.field=value`. YAML keys are the dotted path's parts.",
        "",
    ]
    section = None
    for row in describe_settings(cls):
        top = row.path.split(".", 1)[0] if "." in row.path else ""
        if top != section:
            section = top
            lines += ["", f"## `{top}`" if top else "## top level", ""]
            lines += [
                "| setting | type | default | environment | meaning |",
                "| --- | --- | --- | --- | --- |",
            ]
        default = "" if row.default is None else str(row.default)
        cells = [
            f"`{row.path}`",
            row.type_name.replace("|", "\\|"),
            f"`{default}`" if default else "",
            f"`{row.env}`",
            row.doc.replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"
