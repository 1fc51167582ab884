"""The client's options: flags first, then the original client's environment, then defaults.

The original aldaas client was configured only by environment variables
(``ALDAAS_SERVER``, ``ALDAAS_TOKEN``, ``ALDAAS_PORT``, ``ALDAAS_TTL``,
``ALDAAS_NAME``, ``ALDAAS_PROTOCOL``); they keep working, and every one has a
flag that wins over it. Every mistake is one sentence naming the value seen.
"""

from __future__ import annotations

import math
import pathlib
import urllib.parse
from collections.abc import Mapping
from typing import Literal

import attrs

DEFAULT_PORT = 5432
"""Where ``aldaas connect`` listens: PostgreSQL's own port, so tools need no ``-p``."""
DEFAULT_PATH = "/tunnel"
"""The gateway's multiplexed endpoint when ``ALDAAS_SERVER`` names no path."""
DEFAULT_NAME = "default"
"""Name of the lease in the state file when ``ALDAAS_NAME`` is unset."""
DEFAULT_TIMEOUT = 60.0
"""How long ``aldaas run`` waits for a database before it exits 1: a CI job fails within a
minute, saying why, instead of hanging until the job's own limit."""

Protocol = Literal["ws", "wss"]


class ClientError(Exception):
    """Something the user can fix; ``str()`` is one sentence and the CLI exits non-zero."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@attrs.frozen(kw_only=True)
class Options:
    """Everything a client command needs to reach the broker."""

    url: str
    """Full websocket URL of the gateway, e.g. ``wss://aldaas.example.com/tunnel``."""
    token: str | None = attrs.field(repr=False)
    port: int
    """Local listening port (``connect``, ``run``); 0 picks a free one."""
    listen: str = "127.0.0.1"
    """Local listening address; loopback unless asked (``0.0.0.0`` inside the client container)."""
    ttl: float | None
    """Idle TTL asked for the lease; ``None`` leaves the server's default (300 s)."""
    timeout: float = DEFAULT_TIMEOUT
    """Seconds ``aldaas run`` waits for its database (gateway, queue, snapshot) before giving up."""
    name: str
    ca_file: pathlib.Path | None
    state_dir: pathlib.Path
    relay: str = ""
    """``ALDAAS_TUNNEL_RELAY`` as set (``portable`` turns the tunnel's Linux accelerator off);
    checked where the tunnel starts, which knows what this platform has."""

    @property
    def server(self) -> str:
        """The URL without its path, as shown to the user and keyed in the state file."""
        parts = urllib.parse.urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"


def _pick(flag: object, environ: Mapping[str, str], var: str) -> str | None:
    if flag is not None:
        return str(flag)
    value = environ.get(var, "").strip()
    return value or None


def _seconds(flag: object, environ: Mapping[str, str], what: str, name: str) -> float | None:
    """``--NAME`` or ``ALDAAS_NAME`` as a finite number of seconds > 0; ``None`` if unset."""
    var = f"ALDAAS_{name.upper()}"
    text = _pick(flag, environ, var)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < math.inf:
        raise ClientError(
            f"The {what} must be a positive number of seconds, got {text!r}; "
            f"fix --{name} or {var}.",
            exit_code=2,
        )
    return value


def resolve_url(server: str, protocol: str | None) -> str:
    """``host[:port][/path]`` or a ``ws(s)://`` / ``http(s)://`` URL → the gateway's ws(s) URL."""
    if protocol is not None and protocol not in ("ws", "wss"):
        raise ClientError(f"ALDAAS_PROTOCOL must be ws or wss, got {protocol!r}; pick one of them.")
    text = server.strip()
    if "://" in text:
        scheme, _, rest = text.partition("://")
        mapped = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}.get(scheme.lower())
        if mapped is None:
            raise ClientError(
                f"The server URL {server!r} has scheme {scheme!r}; use ws://, wss:// or a bare host."
            )
        if protocol is not None and protocol != mapped:
            raise ClientError(
                f"The server URL {server!r} says {mapped} but ALDAAS_PROTOCOL says {protocol}; "
                "drop one of them."
            )
    else:
        mapped, rest = protocol or "wss", text
    parts = urllib.parse.urlsplit(f"{mapped}://{rest}")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ClientError(
            f"The server {server!r} has an invalid port; write it as host:port."
        ) from None
    if not parts.hostname:
        raise ClientError(f"The server {server!r} names no host; write it as host[:port].")
    path = parts.path if parts.path not in ("", "/") else DEFAULT_PATH
    return urllib.parse.urlunsplit((mapped, parts.netloc, path, parts.query, ""))


def resolve(
    *,
    environ: Mapping[str, str],
    state_dir: pathlib.Path,
    server: str | None = None,
    token: str | None = None,
    port: int | None = None,
    ttl: float | None = None,
    name: str | None = None,
    protocol: str | None = None,
    ca_file: pathlib.Path | None = None,
    listen: str | None = None,
    timeout: str | float | None = None,
    default_port: int = DEFAULT_PORT,
) -> Options:
    """Flags (the keyword arguments) win over ``ALDAAS_*`` variables, which win over defaults."""
    server_text = _pick(server, environ, "ALDAAS_SERVER")
    if server_text is None:
        raise ClientError(
            "No server is set; pass --server HOST[:PORT] or set ALDAAS_SERVER.", exit_code=2
        )
    url = resolve_url(server_text, _pick(protocol, environ, "ALDAAS_PROTOCOL"))

    port_text = _pick(port, environ, "ALDAAS_PORT")
    local_port = default_port
    if port_text is not None:
        try:
            local_port = int(port_text)
        except ValueError:
            local_port = -1
        if not 0 <= local_port <= 65535:
            raise ClientError(
                f"The local port must be a number from 0 to 65535, got {port_text!r}; "
                "fix --port or ALDAAS_PORT.",
                exit_code=2,
            )

    ttl_value = _seconds(ttl, environ, "TTL", "ttl")
    timeout_value = _seconds(timeout, environ, "timeout", "timeout")

    ca_text = _pick(ca_file, environ, "ALDAAS_CA_FILE")
    ca_path = pathlib.Path(ca_text).expanduser() if ca_text else None
    if ca_path is not None and not ca_path.is_file():
        raise ClientError(
            f"The CA file {str(ca_path)!r} does not exist; fix --ca-file or ALDAAS_CA_FILE.",
            exit_code=2,
        )

    return Options(
        url=url,
        listen=_pick(listen, environ, "ALDAAS_LISTEN") or "127.0.0.1",
        token=_pick(token, environ, "ALDAAS_TOKEN"),
        port=local_port,
        ttl=ttl_value,
        timeout=DEFAULT_TIMEOUT if timeout_value is None else timeout_value,
        name=_pick(name, environ, "ALDAAS_NAME") or DEFAULT_NAME,
        ca_file=ca_path,
        state_dir=state_dir,
        relay=environ.get("ALDAAS_TUNNEL_RELAY", ""),
    )
