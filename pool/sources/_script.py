"""Reading a plain SQL dump (``pg_dump -Fp``, ``pg_dumpall``) on its way to psql.

Pure, no I/O: :class:`ScriptFilter` takes the decompressed script in chunks
and hands back what each psql session should read, split at ``\\connect``
(one psql per database, started by the provider, so psql never runs a
meta-command from the backup). On the way it

- refuses every psql meta-command other than ``\\connect``, ``\\restrict``
  and ``\\unrestrict`` (``\\!``, ``\\o |cmd``, ``\\copy ... program`` never
  reach psql; psql 18's restricted mode, which the provider turns on with a
  key the backup cannot know, also refuses any meta-command in the middle of
  a line);
- drops or rewrites what every dump does on a fresh cluster and would fail
  there (``CREATE ROLE`` of a role the cluster has, ``ALTER ROLE`` of the
  broker's admin, ``CREATE DATABASE`` of a database that exists), and lists
  each in :attr:`ScriptFilter.tolerated`;
- creates, NOLOGIN, every role an ``OWNER TO``, ``GRANT``, ``REVOKE``,
  ``ALTER DEFAULT PRIVILEGES`` or ``SET SESSION AUTHORIZATION`` names that
  neither the cluster nor the dump created;
- drops the dump's role passwords (they are never what a lease holder gets);
- drops tablespaces (``CREATE``/``ALTER``/``COMMENT``/``GRANT`` on a
  tablespace, ``SET default_tablespace``, ``CREATE DATABASE ... TABLESPACE``):
  a tablespace is a folder on the source's server, so its objects land in the
  clone's default tablespace, and each tablespace is listed as tolerated;
- checks the ``Dumped from database version`` header against the server.

Only whole lines outside ``COPY ... FROM stdin`` data are looked at. COPY
data (the bulk of a dump) is passed on as the very chunk it came in (no copy,
no per-line work): its end marker is found with ``memchr`` for backslashes, and
lines are counted with one ``bytes.count``, so the filter costs about a tenth
of a CPU second per 100 MB.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import attrs

from .._provider import ProviderError
from ._formats import check_major, dumped_from_major

SYSTEM_DATABASES = frozenset({"postgres", "template0", "template1"})

_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*)'
_LIST = rf"{_IDENT}(?:\s*,\s*{_IDENT})*"
_NOT_ROLES = frozenset({"public", "current_user", "session_user", "current_role"})

_CONNECT = re.compile(r"\\(?:connect|c)\s+(.*?)\s*$", re.S)
_CONNECT_REUSE = re.compile(r'-reuse-previous=on\s+"((?:[^"]|"")*)"$')
_CONNSTR_DBNAME = re.compile(r"dbname='((?:[^'\\]|\\.)*)'$")
_COPY_STDIN = re.compile(r"COPY\s.*\sFROM\s+stdin;\s*$", re.S | re.I)
_PROGRAM = re.compile(r"\b(?:FROM|TO)\s+PROGRAM\s+'", re.I)
_CREATE_ROLE = re.compile(rf"CREATE\s+(?:ROLE|USER|GROUP)\s+({_IDENT})", re.I)
_ALTER_ROLE = re.compile(rf"ALTER\s+(?:ROLE|USER|GROUP)\s+({_IDENT})", re.I)
_PASSWORD = re.compile(r"\s+(?:ENCRYPTED\s+)?PASSWORD\s+(?:'(?:[^']|'')*'|NULL)", re.I)
_CREATE_DATABASE = re.compile(rf"CREATE\s+DATABASE\s+({_IDENT})", re.I)
_CREATE_PUBLIC = re.compile(r"CREATE\s+SCHEMA\s+public\s*;\s*$", re.I)
_TABLESPACE_STATEMENT = re.compile(
    rf"(?:(?:CREATE|ALTER)\s+TABLESPACE|COMMENT\s+ON\s+TABLESPACE|(?:GRANT|REVOKE)\s.*?\sON\s+"
    rf"TABLESPACE|SECURITY\s+LABEL\s.*?\sON\s+TABLESPACE)\s+({_IDENT})",
    re.S | re.I,
)
_DEFAULT_TABLESPACE = re.compile(
    rf"SET\s+default_tablespace\s*(?:=|TO)\s*({_IDENT}|'(?:[^']|'')*')", re.I
)
_EVERY_CLUSTER_HAS = frozenset({"''", '""', "pg_default", "'pg_default'", '"pg_default"'})
"""``default_tablespace`` values every cluster can take: the database's own, ``pg_default``."""
_DATABASE_TABLESPACE = re.compile(rf"\s+TABLESPACE\s*=\s*({_IDENT})(?=[\s;])", re.I)
_MEMBERSHIP_GRANTOR = re.compile(
    rf"(GRANT\s+{_IDENT}\s+TO\s+{_IDENT}.*?)\s+GRANTED\s+BY\s+({_IDENT})(\s*;\s*)$", re.S | re.I
)
_SESSION_AUTHORIZATION = re.compile(r"SET\s+SESSION\s+AUTHORIZATION\s+'((?:[^']|'')+)'", re.I)
_ROLE_REFERENCES = (
    re.compile(rf"ALTER\s.*\sOWNER\s+TO\s+({_IDENT})\s*;\s*$", re.S | re.I),
    re.compile(
        rf"GRANT\s.*?\sTO\s+({_LIST})(?:\s+WITH\s.*?)?(?:\s+GRANTED\s+BY\s+({_IDENT}))?\s*;",
        re.S | re.I,
    ),
    re.compile(
        rf"REVOKE\s.*?\sFROM\s+({_LIST})(?:\s+GRANTED\s+BY\s+({_IDENT}))?(?:\s+CASCADE)?\s*;",
        re.S | re.I,
    ),
    re.compile(rf"ALTER\s+DEFAULT\s+PRIVILEGES\s+FOR\s+(?:ROLE|USER)\s+({_LIST})\s", re.I),
    re.compile(
        rf"CREATE\s+POLICY\s.*?\sTO\s+({_LIST})(?:\s+USING|\s+WITH\s+CHECK|\s*;)", re.S | re.I
    ),
)
_BACKSLASH_TRIES = 32
"""Backslashes looked at one by one in COPY data before searching for its end marker instead."""
_INTERESTING = tuple(b"\\CAGRS-")
"""First bytes of the lines the filter looks at; every other line passes untouched."""


def unquote(ident: str) -> str:
    """A role or database name as PostgreSQL stores it (quoted: verbatim; bare: lower case)."""
    if ident.startswith('"'):
        return ident[1:-1].replace('""', '"')
    return ident.lower()


def quote(name: str) -> str:
    """``name`` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _names(text: str) -> list[str]:
    return [unquote(m) for m in re.findall(_IDENT, text)]


@attrs.frozen
class Connect:
    """Start a new psql session on ``database`` (the backup's ``\\connect``)."""

    database: str


Piece = bytes | Connect


@attrs.define
class ScriptFilter:
    """Turns a plain dump's bytes into psql input per database; see the module docstring."""

    key: str
    """The backup's name, for messages."""
    admin: str
    """The role the restore runs as (the cluster's bootstrap superuser): its attributes stay."""
    roles: set[str]
    """Roles the cluster has before the restore; grows with those the dump creates."""
    databases: set[str]
    """Databases the cluster has before the restore (``postgres``, templates, the target)."""
    fresh_database: str | None
    """The empty database made for the restore: a dump's ``CREATE DATABASE`` of it replaces it."""
    server_major: int
    bin_dir_setting: str = "local.bin_dir"
    """The setting a newer dump's error tells the user to point at newer binaries."""

    tolerated: list[str] = attrs.field(factory=list)
    """What every dump does on a fresh cluster that the filter dropped or rewrote, one line each."""
    created_roles: list[str] = attrs.field(factory=list)
    """Roles the dump referenced without creating them, made NOLOGIN before their first use."""
    dump_databases: list[str] = attrs.field(factory=list)
    """Databases the dump creates or connects to, in order."""
    dump_major: int | None = None
    tablespaces: list[str] = attrs.field(factory=list)
    """Tablespaces the dump creates or puts objects in; their objects land in the default one."""

    _carry: bytes = b""
    _in_copy: bool = False
    _copy_tail: bytes = b""
    """The last bytes of COPY data passed on (``\\n`` at its start): the end marker may straddle."""
    _line_no: int = 0

    def feed(self, data: bytes) -> list[Piece]:
        """What psql should read for ``data``; a :class:`Connect` starts the next session."""
        buf = self._carry + data if self._carry else data
        self._carry = b""
        out = _Pieces()
        pos = 0
        size = len(buf)
        while pos < size:
            if self._in_copy:
                end = self._copy_end(buf, pos)
                if end < 0:
                    # COPY data to the end of the chunk: passed on whole, never copied.
                    self._line_no += buf.count(b"\n", pos)
                    self._copy_tail = (self._copy_tail + buf[max(pos, size - 3) :])[-3:]
                    out.add(buf if pos == 0 else buf[pos:])
                    pos = size
                    break
                self._line_no += buf.count(b"\n", pos, end)
                out.add(buf[pos:end])
                pos = end
                self._in_copy = False
                continue
            newline = buf.find(b"\n", pos)
            if newline < 0:
                break
            self._line_no += 1
            line = buf[pos : newline + 1]
            pos = newline + 1
            if line[0] in _INTERESTING:
                for piece in self._line(line):
                    out.add(piece)
            else:
                out.add(line)
        self._carry = buf[pos:]
        return out.done()

    def _copy_end(self, buf: bytes, pos: int) -> int:
        """Where the COPY data from ``pos`` ends (just past its ``\\.`` line); -1 if not in ``buf``.

        The end marker is a line ``\\.``: ``\\n\\.\\n`` in the stream, of which up
        to three bytes may have been passed on with the previous chunk.
        """
        joined = self._copy_tail + buf[pos : pos + 3]
        found = joined.find(b"\n\\.\n")
        if found >= 0:
            return pos + found + 4 - len(self._copy_tail)
        # memchr for a backslash is many times faster than a search for four bytes; data with
        # many backslashes (escapes) falls back to that search after a few misses.
        at = pos
        for _ in range(_BACKSLASH_TRIES):
            at = buf.find(b"\\", at)
            if at < 0:
                return -1
            if buf[at - 1 : at] == b"\n" and buf[at + 1 : at + 3] == b".\n" and at > pos:
                return at + 3
            at += 1
        found = buf.find(b"\n\\.\n", at - 1)
        return found + 4 if found >= 0 else -1

    def finish(self) -> list[Piece]:
        """What is left after the last chunk (a last line without a newline)."""
        rest, self._carry = self._carry, b""
        if not rest:
            return []
        if self._in_copy:
            return [rest]
        self._line_no += 1
        return list(self._line(rest + b"\n"))

    def _line(self, raw: bytes) -> Iterable[Piece]:
        line = raw.decode("utf-8", "surrogateescape")
        if line.startswith("\\"):
            yield from self._meta(line)
            return
        if line.startswith("--"):
            if self.dump_major is None and (major := dumped_from_major(raw)) is not None:
                self.dump_major = major
                check_major(
                    self.key, major, self.server_major, bin_dir_setting=self.bin_dir_setting
                )
            yield raw
            return
        if _PROGRAM.search(line) and line.upper().startswith("COPY"):
            raise ProviderError(
                f"backup {self.key!r} runs a program on the database server at line "
                f"{self._line_no} (COPY ... PROGRAM), which no pg_dump writes; aldaas does not "
                "restore it: use a backup made by pg_dump or pg_dumpall"
            )
        if _COPY_STDIN.match(line):
            self._in_copy = True
            self._copy_tail = b"\n"
            yield raw
            return
        if m := _TABLESPACE_STATEMENT.match(line):
            # A tablespace is a folder on the source's server: the clone has no such folder.
            self._tablespace(unquote(m.group(1)))
            return
        if (m := _DEFAULT_TABLESPACE.match(line)) and m.group(1) not in _EVERY_CLUSTER_HAS:
            value = m.group(1)
            self._tablespace(value[1:-1].replace("''", "'") if value[0] == "'" else unquote(value))
            yield b"SET default_tablespace = '';\n"
            return
        if m := _CREATE_ROLE.match(line):
            name = unquote(m.group(1))
            if name in self.roles:
                self.tolerated.append(f"CREATE ROLE {name} (the cluster already has it)")
                return
            self.roles.add(name)
            yield _PASSWORD.sub("", line).encode("utf-8", "surrogateescape")
            return
        if m := _ALTER_ROLE.match(line):
            name = unquote(m.group(1))
            if name == self.admin:
                self.tolerated.append(f"ALTER ROLE {name} (the restore's own superuser)")
                return
            yield from self._create_missing([name])
            yield _PASSWORD.sub("", line).encode("utf-8", "surrogateescape")
            return
        if m := _CREATE_DATABASE.match(line):
            name = unquote(m.group(1))
            if space := _DATABASE_TABLESPACE.search(line):
                self._tablespace(unquote(space.group(1)))
                line = line[: space.start()] + line[space.end() :]
                raw = line.encode("utf-8", "surrogateescape")
            self._note_database(name)
            if name in SYSTEM_DATABASES or (name in self.databases and name != self.fresh_database):
                self.tolerated.append(f"CREATE DATABASE {name} (the cluster already has it)")
                return
            if name in self.databases:
                self.tolerated.append(
                    f"CREATE DATABASE {name} (replaced the empty one made for the restore)"
                )
                yield f"DROP DATABASE IF EXISTS {quote(name)};\n".encode()
            self.databases.add(name)
            yield raw
            return
        if _CREATE_PUBLIC.match(line):
            self.tolerated.append("CREATE SCHEMA public (every new database has it)")
            yield b"CREATE SCHEMA IF NOT EXISTS public;\n"
            return
        if m := _MEMBERSHIP_GRANTOR.match(line):
            # pg_dumpall names the source's superuser as grantor; PostgreSQL 16+ accepts that
            # only from the cluster's bootstrap superuser, which here is the restore's admin.
            grantor = unquote(m.group(2))
            note = f"GRANTED BY {grantor} of role memberships (granted by the restore's superuser)"
            if note not in self.tolerated:
                self.tolerated.append(note)
            line = m.group(1) + m.group(3)
            raw = line.encode("utf-8", "surrogateescape")
        if m := _SESSION_AUTHORIZATION.match(line):
            yield from self._create_missing([m.group(1).replace("''", "'")])
        else:
            for pattern in _ROLE_REFERENCES:
                if m := pattern.match(line):
                    yield from self._create_missing(_names(" ".join(g for g in m.groups() if g)))
                    break
        yield raw

    def _create_missing(self, names: Iterable[str]) -> Iterable[bytes]:
        for name in names:
            if name in self.roles or name in _NOT_ROLES:
                continue
            self.roles.add(name)
            self.created_roles.append(name)
            yield f"CREATE ROLE {quote(name)} NOLOGIN;\n".encode("utf-8", "surrogateescape")

    def _tablespace(self, name: str) -> None:
        if name not in self.tablespaces:
            self.tablespaces.append(name)
            self.tolerated.append(
                f"tablespace {name} (its statements dropped; its objects are in the default "
                "tablespace)"
            )

    def _note_database(self, name: str) -> None:
        if name not in self.dump_databases:
            self.dump_databases.append(name)

    def _meta(self, line: str) -> Iterable[Piece]:
        command = line.split(None, 1)[0] if line.strip() else "\\"
        if command in ("\\restrict", "\\unrestrict"):
            return  # pg_dump 17.6+'s guard; the provider's own key replaces it
        if command in ("\\connect", "\\c"):
            m = _CONNECT.match(line)
            target = m.group(1) if m else ""
            reuse = _CONNECT_REUSE.match(target)
            dbname = _CONNSTR_DBNAME.match(reuse.group(1).replace('""', '"')) if reuse else None
            if dbname:
                name = re.sub(r"\\(.)", r"\1", dbname.group(1))
            elif re.fullmatch(_IDENT, target):
                # psql takes a bare \connect argument as is (no lower-casing).
                name = target[1:-1].replace('""', '"') if target.startswith('"') else target
            else:
                raise ProviderError(
                    f"backup {self.key!r} has a \\connect aldaas cannot read at line "
                    f"{self._line_no} ({line.strip()[:80]!r}); use a backup made by pg_dumpall"
                )
            self._note_database(name)
            yield Connect(name)
            return
        raise ProviderError(
            f"backup {self.key!r} holds the psql meta-command {command[:20]!r} at line "
            f"{self._line_no}, which aldaas never runs (only \\connect of pg_dumpall is "
            "followed); use a backup made by pg_dump or pg_dumpall"
        )


class _Pieces:
    """Collects output, joining neighbouring bytes so psql gets few, large writes."""

    def __init__(self) -> None:
        self._out: list[Piece] = []
        self._bytes: list[bytes] = []

    def add(self, piece: Piece) -> None:
        if isinstance(piece, bytes):
            self._bytes.append(piece)
            return
        self._flush()
        self._out.append(piece)

    def _flush(self) -> None:
        if self._bytes:
            self._out.append(b"".join(self._bytes))
            self._bytes = []

    def done(self) -> list[Piece]:
        self._flush()
        return self._out


def choose_database(
    key: str,
    named: str | None,
    dump_databases: Iterable[str],
    default: str,
    *,
    setting: str = "local.database",
) -> str:
    """The database a lease gets after a script restore (see docs/backups.md).

    ``named`` is ``setting`` (``local.database``, or ``restore.database`` on
    Kubernetes) when set. A dump without ``\\connect`` was restored into
    ``named`` or ``default``; a pg_dumpall one hands out the named database,
    else its single non-system database.
    """
    listed = list(dump_databases)
    if not listed:
        return named or default
    if named is not None:
        if named not in listed:
            raise ProviderError(
                f"backup {key!r} has no database {named!r} (it holds {', '.join(listed)}); "
                f"set {setting} to one of them"
            )
        return named
    candidates = [d for d in listed if d not in SYSTEM_DATABASES]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        return "postgres"
    raise ProviderError(
        f"backup {key!r} holds several databases ({', '.join(candidates)}); "
        f"set {setting} to the one leases should get"
    )
