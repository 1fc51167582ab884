"""The ``aldaas`` program (its console script).

``pip install aldaas`` is the client, so the program lives here: the client
commands (``connect``, ``run``, ...) come from :mod:`._cli`. The broker's
commands (``serve``, ``settings``, ``fetch-backup``, ``restore-backup``) need the ``server``
extra; they are listed in the help, and their code is imported only when one
of them runs. Without the extra, they say in one sentence what to install.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
from collections.abc import Callable, Sequence

BROKER_COMMANDS = {
    "serve": "run the broker (pool, gateway, admin listener) [needs aldaas[server]]",
    "fetch-backup": "stream one backup from S3 to a file (the Kubernetes restore Job) "
    "[needs aldaas[server]]",
    "restore-backup": "restore one backup file into a PostgreSQL server (the Kubernetes "
    "restore Job) [needs aldaas[server]]",
    "settings": "print every broker setting with its default and environment variable "
    "[needs aldaas[server]]",
}
"""The commands that run broker code, with their one-line help for ``aldaas --help``."""

_EXTRA = re.compile(r"""extra\s*==\s*["']server["']""")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the client commands; ``_cli.COMMANDS`` runs them (imported only then: it loads trio)."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("where the broker is (flags win over the ALDAAS_* variables)")
    g.add_argument("--server", help="gateway host[:port] or ws(s):// URL [ALDAAS_SERVER]")
    g.add_argument("--token", help="instance token [ALDAAS_TOKEN]")
    g.add_argument("--name", help="name of the lease, one per server and name [ALDAAS_NAME]")
    g.add_argument("--protocol", choices=("ws", "wss"), help="default wss [ALDAAS_PROTOCOL]")
    g.add_argument("--ca-file", type=pathlib.Path, help="CA bundle for wss (default: system store)")
    g.add_argument("--listen", help="local address to listen on [ALDAAS_LISTEN, 127.0.0.1]")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, parents=[common], help=help_text, description=help_text)

    p = add("connect", "get a database (or resume the cached one) on a local port")
    p.add_argument("--port", type=int, help="local port, 0 = any free one [ALDAAS_PORT, 5432]")
    p.add_argument("--ttl", type=float, help="idle TTL in seconds [ALDAAS_TTL, server default]")
    p.add_argument("--new", action="store_true", help="forget the cached lease, get a fresh one")
    p.add_argument(
        "--release-on-exit",
        action="store_true",
        help="release the lease on exit instead of leaving it to its idle TTL",
    )
    p.add_argument(
        "--legacy-url",
        action="store_true",
        help="also print the lease's URL for the original aldaas client (tcp-over-websocket); "
        "it carries the lease's secret",
    )

    p = add("run", "run a command against a fresh database, then release it")
    p.add_argument("--port", type=int, help="local port [ALDAAS_PORT, else any free one]")
    p.add_argument("--ttl", type=float, help="idle TTL in seconds [ALDAAS_TTL]")
    p.add_argument(
        "--timeout",
        help="give up (exit 1) if no database is ready after this many seconds "
        "[ALDAAS_TIMEOUT, 60]",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...", help="the command")

    add("reset", "swap the cached lease's database for a pristine copy, same address")
    add("release", "release the cached lease now (its database is destroyed)")
    p = add("status", "show the pool, the snapshots and the leases")
    p.add_argument("--json", action="store_true", help="print the broker's JSON answer")
    p = add("snapshots", "list the snapshots")
    p.add_argument("--json", action="store_true", help="print the broker's JSON answer")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aldaas",
        description="Production-like PostgreSQL databases, handed out instantly.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in BROKER_COMMANDS.items():
        # Parsed by the broker's own parser (see main); listed here so --help shows them.
        sub.add_parser(name, help=help_text, add_help=False)
    add_commands(sub)
    return parser


def missing_server_requirements() -> list[str]:
    """Distributions of the ``server`` extra that are not installed, as named in the metadata."""
    import importlib.metadata  # not at the top: it costs the client's start 30 ms

    try:
        requirements = importlib.metadata.requires("aldaas") or []
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - only runs installed
        return []
    missing = []
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        name = _NAME.match(spec.strip())
        if name is None or not _EXTRA.search(marker):
            continue
        try:
            importlib.metadata.distribution(name.group())
        except importlib.metadata.PackageNotFoundError:
            missing.append(name.group())
    return missing


def _broker_main(command: str) -> Callable[[Sequence[str]], int] | None:
    """The broker's ``main``, or ``None`` after saying what to install."""
    missing = missing_server_requirements()
    if missing:
        print(
            f"aldaas: error: aldaas {command} runs the broker, whose dependencies are not "
            f"installed (missing: {', '.join(missing)}); install them with "
            "pip install 'aldaas[server]'.",
            file=sys.stderr,
        )
        return None
    # The one place the client package reaches the broker, and only for the broker's commands
    # (import-linter's client contract names this exception).
    from aldaas.broker._cli import main

    return main


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aldaas`` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in BROKER_COMMANDS:
        broker_main = _broker_main(args_list[0])
        return 1 if broker_main is None else broker_main(args_list)
    args = _parser().parse_args(args_list)
    from ._cli import run_command
    from ._logging import configure_logging

    # The client shows its own progress; library logs (the tunnel's) only matter when they warn,
    # and never go to stdout, which carries the DSN and status output.
    level = os.environ.get("ALDAAS_LOG_LEVEL", "warning").strip().lower() or "warning"
    try:
        configure_logging(level, "auto")
    except ValueError as exc:
        print(f"aldaas: error: ALDAAS_LOG_LEVEL: {exc}", file=sys.stderr)
        return 2
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
