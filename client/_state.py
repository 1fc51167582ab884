"""The client's cached lease: one small file per server and name, readable by its owner only.

Like the original client's single cached file, it lets ``aldaas connect``
resume the same database after a restart; unlike it, there is one file per
``(server, name)`` so several brokers and several named databases coexist.
Files live under ``$XDG_STATE_HOME/aldaas`` (``~/.local/state/aldaas``), the
folder mode 0700 and each file 0600, written atomically (temp file + rename)
so a crash never leaves half a secret behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import re
import time
from collections.abc import Mapping

import attrs


@attrs.frozen(kw_only=True)
class CachedLease:
    """What it takes to come back to a lease: its id and secret, and where it lives."""

    server: str
    name: str
    lease_id: str
    secret: str = attrs.field(repr=False)
    info: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    """What the broker said about the database (user, database, password), to print the DSN again."""
    saved_at: float = 0.0
    """Wall-clock seconds since the epoch, for display only."""


def state_dir(environ: Mapping[str, str]) -> pathlib.Path:
    """``$XDG_STATE_HOME/aldaas``, else ``~/.local/state/aldaas`` (XDG base directory spec)."""
    base = environ.get("XDG_STATE_HOME", "").strip()
    if base and pathlib.Path(base).is_absolute():
        return pathlib.Path(base) / "aldaas"
    home = environ.get("HOME", "").strip() or str(pathlib.Path.home())
    return pathlib.Path(home) / ".local" / "state" / "aldaas"


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def state_path(directory: pathlib.Path, server: str, name: str) -> pathlib.Path:
    """The file for ``(server, name)``: readable slug plus a digest so distinct pairs never collide."""
    digest = hashlib.sha256(f"{server}\0{name}".encode()).hexdigest()[:12]
    slug = _UNSAFE.sub("_", f"{server}--{name}").strip("_.")[:80]
    return directory / f"{slug}-{digest}.json"


def load(path: pathlib.Path) -> CachedLease | None:
    """The cached lease, or ``None`` when there is none or the file is unreadable or malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return CachedLease(
            server=str(data["server"]),
            name=str(data["name"]),
            lease_id=str(data["lease_id"]),
            secret=str(data["secret"]),
            info={str(k): str(v) for k, v in dict(data.get("info") or {}).items()},
            saved_at=float(data.get("saved_at", 0.0)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(path: pathlib.Path, lease: CachedLease) -> None:
    """Write ``lease`` atomically with mode 0600 (the folder 0700)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        path.parent.chmod(0o700)
    payload = {
        "server": lease.server,
        "name": lease.name,
        "lease_id": lease.lease_id,
        "secret": lease.secret,
        "info": dict(lease.info),
        "saved_at": lease.saved_at or time.time(),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if hasattr(os, "fchmod"):  # not on Windows before Python 3.13 (its profile is private)
            os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def forget(path: pathlib.Path) -> None:
    """Remove the cached lease; a missing file is fine."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def forget_if_unchanged(path: pathlib.Path, lease: CachedLease) -> None:
    """Remove the cached lease only if the file still holds ``lease`` as this process saved it.

    Another ``aldaas connect`` that took the lease over re-saves the file (a newer
    ``saved_at``); the process it replaced must not delete that.
    """
    current = load(path)
    if current is not None and current.saved_at == lease.saved_at:
        forget(path)
