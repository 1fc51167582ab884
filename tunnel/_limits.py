"""What the gateway admits: connections before authentication, failed logins, memory.

Three small ledgers the gateway consults before it commits anything to a peer:

- :class:`Unauthenticated` counts connections that have not shown valid credentials yet
  (TCP accepted, TLS and upgrade under way), overall and per peer address, so that a flood of
  idle or slow handshakes cannot take every file descriptor.
- :class:`LoginPenalties` remembers failed logins per peer and credential and says how long
  that pair is locked out: the answer to a failure goes out at once and the socket closes;
  the *next* attempt of the same pair inside the lockout is refused (HTTP 429) before its
  credentials are read.
- :class:`MemoryBudget` is the gateway-wide ceiling on bytes that sessions may hold in replay
  buffers and stream windows (see ``GatewaySettings.memory_budget``).
"""

from __future__ import annotations

from typing import TypeVar

LOCKOUT_FIRST = 0.1
"""Seconds a peer is locked out after its first failed login; doubled per failure."""
LOCKOUT_MAX = 5.0
"""Ceiling of that lockout: guessing stays slow, a typo costs a tenth of a second."""
FORGET_SECONDS = 600.0
"""A peer without failures for this long starts afresh."""
PEERS_MAX = 10_000
"""(peer, credential) pairs remembered at most (the least recently failing go first)."""


class Unauthenticated:
    """Connections accepted but not yet authenticated, overall and per peer address."""

    def __init__(self, total: int, per_peer: int) -> None:
        self.total_limit = total
        self.per_peer_limit = per_peer
        self.count = 0
        self._peers: dict[str, int] = {}

    def enter(self, peer: str) -> int | None:
        """Count a new connection from ``peer``; None if admitted, else the HTTP status to
        refuse it with (503: the gateway is full, 429: this peer has too many)."""
        if self.count >= self.total_limit:
            return 503
        held = self._peers.get(peer, 0)
        if held >= self.per_peer_limit:
            return 429
        self.count += 1
        self._peers[peer] = held + 1
        return None

    def leave(self, peer: str) -> None:
        """The connection authenticated or ended."""
        self.count -= 1
        held = self._peers[peer] - 1
        if held:
            self._peers[peer] = held
        else:
            del self._peers[peer]


class Ticket:
    """One connection's place in :class:`Unauthenticated`, given back exactly once."""

    def __init__(self, ledger: Unauthenticated, peer: str) -> None:
        self._ledger: Unauthenticated | None = ledger
        self.peer = peer

    def release(self) -> None:
        if self._ledger is not None:
            self._ledger.leave(self.peer)
            self._ledger = None


class LoginPenalties:
    """Failed logins per (peer, credential): each failure locks the pair out for longer
    (0.1 s, doubling, at most 5 s).

    The credential is the session id for a session secret and ``""`` for the instance token,
    so a wrong secret for one lease does not lock its peer out of opening sessions or of
    its other leases. Attempts refused during a lockout are not failures: they neither count
    nor extend it, so a client that retries (behind the same ingress address as a guesser)
    gets in once the lockout ends.

    Instance-token and session entries are kept apart, each at most :data:`PEERS_MAX`: a
    peer failing with made-up session ids (which cost it nothing) cannot push its own
    instance-token lockout out of memory. A session id is remembered by its first
    :data:`CREDENTIAL_CHARS` characters, so made-up ids cost little memory.
    """

    def __init__(self) -> None:
        self._instance: dict[str, tuple[int, float, float]] = {}
        self._sessions: dict[tuple[str, str], tuple[int, float, float]] = {}

    def failed(self, peer: str, credential: str, now: float) -> tuple[int, float]:
        """Record a failure; return the pair's recent failures and its lockout in seconds."""
        if credential:
            return _fail(self._sessions, (peer, credential[:CREDENTIAL_CHARS]), now)
        return _fail(self._instance, peer, now)

    def locked_for(self, peer: str, credential: str, now: float) -> float:
        """Seconds the pair is still locked out (0 if it may try now)."""
        if credential:
            entry = self._sessions.get((peer, credential[:CREDENTIAL_CHARS]))
        else:
            entry = self._instance.get(peer)
        return 0.0 if entry is None else max(0.0, entry[2] - now)


CREDENTIAL_CHARS = 64
"""Characters of a session id a lockout is keyed by (ours are far shorter)."""


_Key = TypeVar("_Key", str, tuple[str, str])


def _fail(
    entries: dict[_Key, tuple[int, float, float]], key: _Key, now: float
) -> tuple[int, float]:
    count, last, _ = entries.pop(key, (0, now, now))
    if now - last > FORGET_SECONDS:
        count = 0
    count += 1
    lockout = min(LOCKOUT_MAX, LOCKOUT_FIRST * 2.0 ** min(count - 1, 16))
    entries[key] = (count, now, now + lockout)
    while len(entries) > PEERS_MAX:
        del entries[next(iter(entries))]
    return count, lockout


REPLAY_CHUNK = 256 * 1024
"""Replay buffer bytes a session takes from the budget at a time (and its floor)."""


class MemoryBudget:
    """Bytes the gateway's sessions may hold at most in replay buffers and stream windows.

    Each session holds one :data:`REPLAY_CHUNK` of replay from the start and takes more, a
    chunk at a time, up to its own ``replay_buffer_size`` while the budget has room (else its
    senders wait for the client's ACK, as with a full replay buffer); it gives chunks back
    once acknowledged. Each open stream holds its receive window (the bytes the client may
    send before the gateway has written them on). A new session (HTTP 503) or stream (reset,
    code 3) that does not fit is refused; the sessions already open go on.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.limit

    def take(self, nbytes: int) -> bool:
        """Hold ``nbytes`` if they fit; False (nothing held) if not."""
        if self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def hold(self, nbytes: int) -> None:
        """Hold ``nbytes`` even beyond the limit (a session's floor, admitted earlier)."""
        self.used += nbytes

    def give(self, nbytes: int) -> None:
        self.used -= nbytes
