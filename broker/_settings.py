"""The root of the settings tree: one section per part of the broker.

Each package owns its sections (pool/_settings.py, tunnel/_settings.py); this
module only assembles them and adds the broker's own (``admin``, ``log``).
:func:`broker._config.load_settings` fills the tree from YAML, the
environment (``ALDAAS_<SECTION>_<FIELD>``) and ``--set`` flags.
"""

from __future__ import annotations

from typing import Literal

import attrs


@attrs.frozen(kw_only=True)
class AdminSettings:
    """The admin/health HTTP listener (probes, metrics, admin API)."""

    listen: str = "127.0.0.1"
    """Address the admin listener binds; loopback by default because the admin API can kill leases.

    Set ``0.0.0.0`` in a container so that probes and Prometheus reach it.
    """

    port: int = 9090
    """Port of the admin listener; 9090 is the usual metrics port and never the gateway's."""

    token: str | None = attrs.field(default=None, repr=False)
    """Bearer token for ``/api/*``; ``None`` disables the admin API (probes and metrics stay open)."""


@attrs.frozen(kw_only=True)
class LogSettings:
    """Structured logging (structlog)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level written; ``info`` logs one line per lease event, which is what operators read."""

    format: Literal["auto", "json", "console"] = "auto"
    """``auto`` writes console lines on a terminal and JSON lines otherwise (containers, files)."""


@attrs.frozen(kw_only=True)
class Settings:
    """Everything ``aldaas serve`` reads, built once and passed explicitly."""

    admin: AdminSettings = attrs.field(factory=AdminSettings)
    """The admin/health HTTP listener."""

    log: LogSettings = attrs.field(factory=LogSettings)
    """Structured logging."""
