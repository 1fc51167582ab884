"""Makes a Python process look like macOS to aldaas: no ``select.epoll``, no ``EPOLL*``
constants, no ``socket.SOCK_NONBLOCK``.

Python imports this module at start-up when its folder is on ``PYTHONPATH``
(tests/client/test_client_portable.py starts the real ``aldaas`` CLI so). trio is
imported first, with the real modules, because it picks its own I/O backend (epoll here,
kqueue on macOS) at import; every module imported afterwards, aldaas included, sees
``select`` and ``socket`` without those names. If ``ALDAAS_TEST_RELAY_REPORT`` names a
file, the relay that ``auto`` chose is written there at exit (nothing if aldaas's tunnel
was never imported), so the test knows the emulation reached aldaas.
"""

from __future__ import annotations

import atexit
import json
import os
import pathlib
import select
import socket
import sys
import types

import trio  # noqa: F401  # before the modules change: trio's own backend stays epoll


def _without(module: types.ModuleType, hidden: set[str]) -> types.ModuleType:
    clone = types.ModuleType(module.__name__, module.__doc__)
    clone.__dict__.update(
        (name, value)
        for name, value in vars(module).items()
        if name not in hidden and not name.startswith("EPOLL")
    )
    return clone


sys.modules["select"] = _without(select, {"epoll"})
sys.modules["socket"] = _without(socket, {"SOCK_NONBLOCK"})


def _report() -> None:
    relay = sys.modules.get("aldaas.tunnel._relay")
    path = os.environ.get("ALDAAS_TEST_RELAY_REPORT")
    if relay is None or not path:
        return
    report = {
        "epoll_seen_by_aldaas": hasattr(relay.select, "epoll"),
        "auto": relay.resolve_mode("auto"),
    }
    pathlib.Path(path).write_text(json.dumps(report), encoding="utf-8")


atexit.register(_report)
