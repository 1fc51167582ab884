"""Names of provider resources and the flat ``meta`` keys the pool persists on them.

The pool keeps no state that the provider does not also hold: a snapshot's
status and origin, a clone's state and its lease live in these strings, and
a restarted pool rebuilds itself from them. Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Mapping

STATUS = "status"
ROLE = "role"
ROLE_VERIFY = "verify"
SNAPSHOT = "snapshot"
CREATED = "created"
BACKUP_KEY = "backup_key"
BACKUP_ETAG = "backup_etag"
BACKUP_SIZE = "backup_size"
BACKUP_MODIFIED = "backup_modified"
READY_AT = "ready_at"
FAILED_AT = "failed_at"
REASON = "reason"
RESTORE_SECONDS = "restore_seconds"
RESTORED_BYTES = "restored_bytes"
RESTORE_FORMAT = "restore_format"
RESTORE_DATABASE = "restore_database"
RESTORE_TOLERATED = "restore_tolerated"
RESTORE_CREATED_ROLES = "restore_created_roles"
RESTORE_OUTCOME = (RESTORE_FORMAT, RESTORE_DATABASE, RESTORE_TOLERATED, RESTORE_CREATED_ROLES)
"""What aldaas's restore engine reports about a restore (the snapshot meta it adds)."""

LEASE_ID = "lease_id"
LEASE_SECRET_HASH = "lease_secret_hash"  # noqa: S105 - a meta key, not a secret
LEASE_TTL = "lease_ttl"
LEASE_LABELS = "lease_labels"
LEASE_CREATED = "lease_created"
LEASE_EXPIRES_AT = "lease_expires_at"
LEASE_IDLE_DEADLINE = "lease_idle_deadline"
LEASE_ATTACHED = "lease_attached"
LEASE_GENERATION = "lease_generation"
LEASE_RESETS = "lease_resets"

MAX_REASON_CHARS = 2000


def snapshot_name(wall: float) -> str:
    """``snap-<UTC yyyymmddhhmmss>-<6 hex>``: sortable by time, unique, DNS-label safe."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(wall))
    return f"snap-{stamp}-{secrets.token_hex(3)}"


def clone_name() -> str:
    return f"clone-{secrets.token_hex(5)}"


def verify_clone_name() -> str:
    return f"verify-{secrets.token_hex(5)}"


def lease_id() -> str:
    return secrets.token_hex(8)


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    """SHA-256 of the secret (hex): what is persisted and compared, never the secret itself."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def fmt_time(value: float) -> str:
    return f"{value:.3f}"


def parse_float(meta: Mapping[str, str], key: str) -> float | None:
    try:
        return float(meta[key])
    except (KeyError, ValueError):
        return None


def parse_int(meta: Mapping[str, str], key: str, default: int = 0) -> int:
    try:
        return int(meta[key])
    except (KeyError, ValueError):
        return default


def dump_labels(labels: Mapping[str, str]) -> str:
    return json.dumps(dict(labels), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def load_labels(text: str) -> dict[str, str] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        return None
    return value
