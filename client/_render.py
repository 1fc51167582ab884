"""Pure text for the client: the DSN, the ``PG*`` environment, status and snapshot tables.

The broker's ``status`` answer (a JSON object) is documented in
docs/client.md; every field is read with a default so an older or newer
broker never crashes an older or newer client.
"""

from __future__ import annotations

import math
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any


def dsn(info: Mapping[str, Any], host: str, port: int) -> str:
    """``postgresql://user[:password]@host:port/database?sslmode=disable`` for the local listener.

    ``sslmode=disable``: the hop to the local listener is loopback and the tunnel is the secure
    part (wss); libpq's default ``prefer`` would spend one more round trip through the tunnel
    asking a database that has no TLS for it.
    """
    user = urllib.parse.quote(str(info.get("user") or "postgres"), safe="")
    password = info.get("password")
    auth = f"{user}:{urllib.parse.quote(str(password), safe='')}" if password else user
    database = urllib.parse.quote(str(info.get("database") or "postgres"), safe="")
    return f"postgresql://{auth}@{host}:{port}/{database}?sslmode=disable"


def legacy_url(url: str, name: str, secret: str, lease_id: str) -> str:
    """The lease's URL for the original aldaas client (``/{name}/{secret}/{lease}``, at the
    root of the gateway's host): the lease secret stands where the original put the
    instance token, so the URL opens this lease only, and only while it lasts."""
    parts = urllib.parse.urlsplit(url)
    path = "/".join(urllib.parse.quote(p, safe="") for p in (name, secret, lease_id))
    return f"{parts.scheme}://{parts.netloc}/{path}"


def database_environ(info: Mapping[str, Any], host: str, port: int) -> dict[str, str]:
    """``DATABASE_URL`` and libpq's ``PG*`` variables, for ``aldaas run``'s command."""
    env = {
        "DATABASE_URL": dsn(info, host, port),
        "PGHOST": host,
        "PGPORT": str(port),
        "PGUSER": str(info.get("user") or "postgres"),
        "PGDATABASE": str(info.get("database") or "postgres"),
        "PGSSLMODE": "disable",
    }
    if info.get("password"):
        env["PGPASSWORD"] = str(info["password"])
    return env


def duration(seconds: float | None) -> str:
    """``42s``, ``5m03s``, ``2h05m``, ``3d04h``; ``-`` for unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def size(n: float | None) -> str:
    """Bytes in powers of 1024 with one decimal: ``512 B``, ``3.1 MiB``."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; headers upper-cased."""
    cells = [[h.upper() for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _until(deadline: Any, now: float) -> str:
    return duration(float(deadline) - now) if isinstance(deadline, int | float) else "-"


def _failed_newest(snapshots: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The newest snapshot (by start of its restore) if it failed."""
    dated = [s for s in snapshots if isinstance(s.get("created_at"), int | float)]
    newest = max(dated, key=lambda s: float(s["created_at"]), default=None)
    return newest if newest is not None and newest.get("status") == "failed" else None


def status_text(status: Mapping[str, Any], *, server: str, now: float | None = None) -> str:
    """The human view of the broker's ``status`` answer."""
    now = time.time() if now is None else now
    pool = status.get("pool") or {}
    clones = pool.get("clones") or {}
    state = (
        "draining" if status.get("draining") else "ready" if status.get("ready") else "not ready"
    )
    head = (
        f"broker {server}: {state}; warm {clones.get('warm', 0)}/{pool.get('size', '?')}, "
        f"leased {clones.get('leased', 0)}, provisioning {clones.get('provisioning', 0)}, "
        f"queued {pool.get('queue_length', 0)}"
    )
    lines = [head]
    limit = pool.get("leases_max_active")
    if limit:
        active = pool.get("leases_active", 0)
        full = "; new ones are refused until one ends" if active >= limit else ""
        lines.append(f"active leases {active} of at most {limit} (lease.max_active){full}")
    if not status.get("ready") and status.get("reason"):
        lines.append(f"  {status['reason']}")
    source = status.get("source") or {}
    if source.get("last_error"):
        good = source.get("last_success_at")
        since = f"last good listing {duration(now - good)} ago" if good else "no good listing yet"
        lines.append(f"backup source failing ({since}): {source['last_error']}")
    restore = status.get("restore")
    if restore:
        done, total = restore.get("done_bytes", 0), restore.get("total_bytes", 0)
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        stalled = restore.get("stalled_seconds") or 0
        rate = restore.get("rate_bytes_per_second")
        if stalled:
            pace = f"stalled for {duration(stalled)}"
        else:
            speed = f"{size(rate)}/s, " if rate is not None else ""
            pace = f"{speed}eta {duration(restore.get('eta_seconds'))}"
        lines.append(
            f"restoring {restore.get('backup', '?')}: {size(done)} of {size(total)}{pct}, {pace}"
        )
    snapshots = list(status.get("snapshots") or ())
    ready = [s for s in snapshots if s.get("status") == "ready"]
    if ready:
        newest = ready[0]
        lines.append(
            f"newest snapshot {newest.get('name')} of {newest.get('backup', '?')}, "
            f"age {duration(newest.get('age_seconds'))}"
        )
    failed = _failed_newest(snapshots)
    if failed is not None and ready:
        lines.append(
            f"the newest backup {failed.get('backup', '?')} failed to restore "
            f"({str(failed.get('reason') or 'no reason given').rstrip('.')}); "
            f"the older snapshot {ready[0].get('name')} still serves"
        )
    leases = status.get("leases") or ()
    mine = status.get("you")
    if leases:
        rows = [
            [
                ("* " if lease.get("id") == mine else "") + str(lease.get("id")),
                str(lease.get("state", "?")),
                str(lease.get("attached", 0)),
                str(lease.get("snapshot", "-")),
                duration(lease.get("ttl")),
                _until(lease.get("idle_deadline"), now),
                _until(lease.get("expires_at"), now),
                str(lease.get("resets", 0)),
            ]
            for lease in leases
        ]
        lines.append("")
        headers = ["lease", "state", "clients", "snapshot", "ttl", "idle left", "ends in", "resets"]
        lines.append(table(headers, rows))
    elif pool.get("leases_active"):
        # The broker lists only the caller's own lease (others' ids are theirs).
        lines.append(f"{pool['leases_active']} active leases, none of them yours")
    else:
        lines.append("no active leases")
    return "\n".join(lines)


def snapshots_text(snapshots: Sequence[Mapping[str, Any]]) -> str:
    """The human view of the broker's ``snapshots`` answer (newest first)."""
    if not snapshots:
        return "no snapshots yet"
    rows = [
        [
            str(s.get("name", "?")),
            str(s.get("status", "?")),
            str(s.get("backup", "-")),
            duration(s.get("age_seconds")),
            str(s.get("reason") or _tolerated(s.get("tolerated"))),
        ]
        for s in snapshots
    ]
    return table(["snapshot", "status", "backup", "age", "reason"], rows)


def _tolerated(value: object) -> str:
    """What a good restore tolerated, for the reason column of a snapshot that has no failure."""
    return f"restored; tolerated: {value}" if value else ""


def progress_text(params: Mapping[str, Any]) -> str:
    """A PROGRESS frame's params as a short phrase: ``queued 2 of 3, eta 40s``."""
    position = params.get("queue_position")
    if position is None:
        return str(params.get("message") or "waiting for a database")
    text = f"queued {position} of {params.get('queue_length', position)}"
    eta = params.get("eta_seconds")
    return f"{text}, eta {duration(eta)}" if eta is not None else text
