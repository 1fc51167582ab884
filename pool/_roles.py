"""The role model's SQL: pure builders for the admin, the dump's roles and the lease login.

Three kinds of role exist in every database aldaas makes (docs/security.md):

- the **admin** (:data:`ADMIN`), the cluster's bootstrap superuser, which only
  the broker uses (restore, seal, masking, check, per-clone credentials);
- the **dump's roles**, whatever a backup creates or references; the seal step
  makes each of them harmless (no superuser, no password, no way to programs
  or server files);
- the **lease login** (``local.user``), which owns the handed-out database, is
  a member of every dump role, and gets a random password per clone.

Everything here builds text and touches nothing, so both providers can run it
their own way (``psql`` as the admin locally, a Job on Kubernetes) and a test
can run it against a real server. Identifiers and literals are quoted here;
callers pass plain names.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

ADMIN = "aldaas_admin"
"""The bootstrap superuser's name: unlikely in any dump (not ``postgres``, which dumps use as an
ordinary owner)."""

DANGEROUS_ROLES = ("pg_execute_server_program", "pg_read_server_files", "pg_write_server_files")
"""Built-in roles that reach the PostgreSQL OS user's programs and files: nobody but the admin
keeps a membership in them."""

SCRAM_ITERATIONS = 4096
"""PostgreSQL's own default (``scram_iterations``); a login costs the server one such derivation."""


def quote_ident(name: str) -> str:
    """``name`` as an SQL identifier (always double-quoted, quotes doubled)."""
    if "\0" in name:
        raise ValueError(f"a role or database name cannot contain NUL, got {name!r}")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """``value`` as a standard SQL string literal (quotes doubled; no backslash escapes)."""
    if "\0" in value:
        raise ValueError("an SQL string literal cannot contain NUL")
    return "'" + value.replace("'", "''") + "'"


def new_password() -> str:
    """A fresh random password: 32 URL-safe characters (192 bits), safe unquoted in a DSN."""
    return secrets.token_urlsafe(24)


def scram_verifier(
    password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS
) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802/7677).

    The broker sends this instead of the password, so the plain password never
    reaches the server (nor its log, which prints a failing statement in full).
    Only ASCII passwords are accepted: SASLprep leaves them unchanged, and
    :func:`new_password` makes nothing else.
    """
    if not password.isascii() or not password.isprintable():
        raise ValueError("a lease login's password must be printable ASCII")
    salt = secrets.token_bytes(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    b64 = base64.b64encode
    return (
        f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}"
        f"${b64(stored_key).decode()}:{b64(server_key).decode()}"
    )


def hba_conf(*, admin: str = ADMIN) -> bytes:
    """``pg_hba.conf``: the admin from loopback only, every role with a password over TCP.

    There is no Unix socket and no replication entry. Dump roles have no
    password after the seal, so in practice only the admin (loopback) and the
    lease login (password per clone) can log in.
    """
    name = quote_ident(admin)
    return (
        "# aldaas: the admin only from this host's loopback; everyone else by password\n"
        f"host all {name} 127.0.0.1/32 scram-sha-256\n"
        f"host all {name} ::1/128 scram-sha-256\n"
        f"host all {name} all reject\n"
        "host all all all scram-sha-256\n"
    ).encode()


def seal_roles_sql(*, login: str, admin: str = ADMIN) -> str:
    """Cluster-wide part of the seal step: the login exists, every other role is harmless.

    Run once per cluster, as the admin, after the restore:

    - the lease login exists: LOGIN INHERIT NOSUPERUSER NOCREATEROLE CREATEDB
      NOREPLICATION NOBYPASSRLS, no password yet (each clone sets its own);
    - every other non-system role (the dump's): NOSUPERUSER NOCREATEROLE
      NOREPLICATION NOBYPASSRLS, PASSWORD NULL (dump passwords never survive);
    - nobody but the admin is a member of the admin, of a superuser, or of
      :data:`DANGEROUS_ROLES`;
    - the login is a member of every dump role (to act as the owners of the
      restored objects), except those that are members of the login already
      (PostgreSQL refuses a membership loop).
    """
    lit_login, lit_admin = quote_literal(login), quote_literal(admin)
    dangerous = ", ".join(quote_literal(r) for r in DANGEROUS_ROLES)
    # Every value below went through quote_literal/quote_ident.
    return f"""\
DO $aldaas$
DECLARE
    r record;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {lit_login}) THEN
        CREATE ROLE {quote_ident(login)};
    END IF;
    ALTER ROLE {quote_ident(login)} WITH LOGIN INHERIT NOSUPERUSER NOCREATEROLE CREATEDB
        NOREPLICATION NOBYPASSRLS PASSWORD NULL;
    FOR r IN
        SELECT rolname FROM pg_catalog.pg_roles
        WHERE oid >= 16384 AND rolname NOT IN ({lit_admin}, {lit_login})
    LOOP
        EXECUTE format('ALTER ROLE %I WITH NOSUPERUSER NOCREATEROLE NOREPLICATION NOBYPASSRLS '
                       'PASSWORD NULL', r.rolname);
    END LOOP;
    FOR r IN
        SELECT g.rolname AS role, m.rolname AS member, gr.rolname AS grantor
        FROM pg_catalog.pg_auth_members a
        JOIN pg_catalog.pg_roles g ON g.oid = a.roleid
        JOIN pg_catalog.pg_roles m ON m.oid = a.member
        LEFT JOIN pg_catalog.pg_roles gr ON gr.oid = a.grantor
        WHERE m.rolname <> {lit_admin}
          AND (g.rolname IN ({dangerous}) OR g.rolname = {lit_admin} OR g.rolsuper)
    LOOP
        IF r.grantor IS NULL THEN
            EXECUTE format('REVOKE %I FROM %I CASCADE', r.role, r.member);
        ELSE
            EXECUTE format('REVOKE %I FROM %I GRANTED BY %I CASCADE', r.role, r.member, r.grantor);
        END IF;
    END LOOP;
    FOR r IN
        SELECT rolname FROM pg_catalog.pg_roles
        WHERE oid >= 16384 AND rolname NOT IN ({lit_admin}, {lit_login})
          AND NOT pg_catalog.pg_has_role({lit_login}, oid, 'MEMBER')
          AND NOT pg_catalog.pg_has_role(oid, {lit_login}, 'MEMBER')
    LOOP
        EXECUTE format('GRANT %I TO %I', r.rolname, {lit_login});
    END LOOP;
END
$aldaas$;
"""  # noqa: S608


_REOWN = {
    # (catalog query of objects the admin owns, ALTER statement with %s for the object)
    "schemas": (
        "SELECT quote_ident(nspname) AS name FROM pg_catalog.pg_namespace o WHERE {owned}",
        "nspowner",
        "pg_namespace",
        "ALTER SCHEMA %s OWNER TO %I",
    ),
    "tables": (
        "SELECT o.oid::regclass::text AS name FROM pg_catalog.pg_class o "
        "WHERE relkind IN ('r', 'p', 'f') AND {owned}",
        "relowner",
        "pg_class",
        "ALTER TABLE %s OWNER TO %I",
    ),
    "views": (
        "SELECT o.oid::regclass::text AS name FROM pg_catalog.pg_class o WHERE relkind = 'v' AND {owned}",
        "relowner",
        "pg_class",
        "ALTER VIEW %s OWNER TO %I",
    ),
    "materialized views": (
        "SELECT o.oid::regclass::text AS name FROM pg_catalog.pg_class o WHERE relkind = 'm' AND {owned}",
        "relowner",
        "pg_class",
        "ALTER MATERIALIZED VIEW %s OWNER TO %I",
    ),
    # A sequence owned by a column (serial, identity) follows its table's owner.
    "sequences": (
        "SELECT o.oid::regclass::text AS name FROM pg_catalog.pg_class o WHERE relkind = 'S' AND {owned} "
        "AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d WHERE d.classid = "
        "'pg_catalog.pg_class'::regclass AND d.objid = o.oid AND d.deptype IN ('a', 'i'))",
        "relowner",
        "pg_class",
        "ALTER SEQUENCE %s OWNER TO %I",
    ),
    "routines": (
        "SELECT o.oid::regprocedure::text AS name FROM pg_catalog.pg_proc o WHERE {owned}",
        "proowner",
        "pg_proc",
        "ALTER ROUTINE %s OWNER TO %I",
    ),
    "domains": (
        "SELECT o.oid::regtype::text AS name FROM pg_catalog.pg_type o WHERE typtype = 'd' AND {owned}",
        "typowner",
        "pg_type",
        "ALTER DOMAIN %s OWNER TO %I",
    ),
    # Enums, ranges and standalone composite types (not a table's row type, not arrays).
    "types": (
        "SELECT o.oid::regtype::text AS name FROM pg_catalog.pg_type o WHERE {owned} AND "
        "(typtype IN ('e', 'r') OR (typtype = 'c' AND (SELECT relkind FROM pg_catalog.pg_class c "
        "WHERE c.oid = o.typrelid) = 'c'))",
        "typowner",
        "pg_type",
        "ALTER TYPE %s OWNER TO %I",
    ),
    "operators": (
        "SELECT o.oid::regoperator::text AS name FROM pg_catalog.pg_operator o WHERE {owned}",
        "oprowner",
        "pg_operator",
        "ALTER OPERATOR %s OWNER TO %I",
    ),
    "collations": (
        "SELECT format('%I.%I', n.nspname, o.collname) AS name FROM pg_catalog.pg_collation o "
        "JOIN pg_catalog.pg_namespace n ON n.oid = o.collnamespace WHERE {owned}",
        "collowner",
        "pg_collation",
        "ALTER COLLATION %s OWNER TO %I",
    ),
    "text search configurations": (
        "SELECT o.oid::regconfig::text AS name FROM pg_catalog.pg_ts_config o WHERE {owned}",
        "cfgowner",
        "pg_ts_config",
        "ALTER TEXT SEARCH CONFIGURATION %s OWNER TO %I",
    ),
    "text search dictionaries": (
        "SELECT o.oid::regdictionary::text AS name FROM pg_catalog.pg_ts_dict o WHERE {owned}",
        "dictowner",
        "pg_ts_dict",
        "ALTER TEXT SEARCH DICTIONARY %s OWNER TO %I",
    ),
    "large objects": (
        "SELECT o.oid::text AS name FROM pg_catalog.pg_largeobject_metadata o WHERE {owned}",
        "lomowner",
        "pg_largeobject_metadata",
        "ALTER LARGE OBJECT %s OWNER TO %I",
    ),
}


def seal_database_sql(*, login: str, admin: str = ADMIN, own_database: bool) -> str:
    """Per-database part of the seal step: the login owns what the admin made.

    Run as the admin in every database the restore filled, after
    :func:`seal_roles_sql`. Objects the admin owns (dumps made with
    ``--no-owner``, ``CREATE SCHEMA public``, a restore's own ``CREATE``) are
    given to the login; system objects (OIDs below 16384) and members of
    extensions (they follow their extension) are left alone. With
    ``own_database`` the login also becomes the database's owner.
    """
    lines = [
        "DO $aldaas$",
        "DECLARE",
        "    r record;",
        "BEGIN",
    ]
    if own_database:
        lines.append(
            "    EXECUTE format('ALTER DATABASE %I OWNER TO %I', "
            f"pg_catalog.current_database(), {quote_literal(login)});"
        )
    for query, owner_column, catalog, statement in _REOWN.values():
        # Large objects' OIDs are the dump's own choice; every other catalog's user objects
        # have OIDs from 16384 on (FirstNormalObjectId), below are the system's.
        user_made = "" if catalog == "pg_largeobject_metadata" else "o.oid >= 16384 AND "
        owned = (
            f"o.{owner_column} = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = "  # noqa: S608
            f"{quote_literal(admin)}) AND {user_made}NOT EXISTS (SELECT FROM "
            f"pg_catalog.pg_depend e WHERE e.classid = 'pg_catalog.{catalog}'::regclass "
            "AND e.objid = o.oid AND e.deptype = 'e')"
        )
        lines += [
            f"    FOR r IN {query.format(owned=owned)} LOOP",
            f"        EXECUTE format({quote_literal(statement)}, r.name, {quote_literal(login)});",
            "    END LOOP;",
        ]
    lines += ["END", "$aldaas$;", ""]
    return "\n".join(lines)


def login_sql(*, login: str, password: str, superuser: bool = False) -> str:
    """Per-clone step: the login's own password (sent as a SCRAM verifier) and superuser bit.

    The login is created when missing (a snapshot sealed without a restore has
    none); normally the seal step made it.
    """
    return "\n".join(
        login_statements(login=login, verifier=scram_verifier(password), superuser=superuser)
    )


def login_statements(*, login: str, verifier: str, superuser: bool = False) -> list[str]:
    """:func:`login_sql` as separate statements, with the password already a SCRAM verifier.

    The Kubernetes provider runs them in the clone pod's init container
    (``postgres --single``, one statement per entry), where the verifier is a
    placeholder the container fills from the clone's Secret.
    """
    bit = "SUPERUSER" if superuser else "NOSUPERUSER"
    lit = quote_literal(login)
    return [
        "DO $aldaas$ BEGIN\n"
        f"    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {lit}) THEN\n"
        f"        CREATE ROLE {quote_ident(login)} WITH CREATEDB;\n"
        "    END IF;\n"
        "END $aldaas$;",
        f"ALTER ROLE {quote_ident(login)} WITH LOGIN {bit} PASSWORD {quote_literal(verifier)};\n",
    ]


def admin_password_sql(*, verifier: str, admin: str = ADMIN) -> str:
    """The admin's password (a SCRAM verifier): each Kubernetes clone gives its admin a new one."""
    return f"ALTER ROLE {quote_ident(admin)} WITH PASSWORD {quote_literal(verifier)};\n"


DATABASES_SQL = (
    "SELECT pg_catalog.json_agg(datname ORDER BY datname) FROM pg_catalog.pg_database "
    "WHERE datallowconn"
)
"""Every database the seal step visits (``template0`` is never connectable), as one JSON array."""

SYSTEM_DATABASES = frozenset({"postgres", "template1"})
"""Databases the seal step re-owns objects in but does not give to the login."""
