"""PID 1 duties, for when ``aldaas serve`` is the first process of a container or PID namespace.

The local provider's PostgreSQL servers are detached from the broker (they
outlive a ``kill -9`` of it), so when one exits it is a child of PID 1, which
must reap it or it stays a zombie. The broker image runs ``tini`` as PID 1 for
that; when ``aldaas serve`` is PID 1 itself (``docker run --entrypoint aldaas``,
``unshare --pid --fork``), it forks: the child is the broker, and the parent
stays PID 1, forwards signals to it, reaps every process that ends, and exits
with the broker's status. Nothing changes when aldaas is not PID 1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType

FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
"""Signals PID 1 passes on to the broker (PID 1 ignores them otherwise: the kernel drops
signals an init has no handler for)."""


def serve_as_init(run: Callable[[], int], *, pid: int | None = None) -> int:
    """``run()``'s exit status; as PID 1, ``run`` goes to a child while this process reaps."""
    if (os.getpid() if pid is None else pid) != 1:
        return run()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            code = run()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    return reap_until(child)


def reap_until(child: int) -> int:
    """Reap every child that ends until ``child`` does; its exit status (128+N for signal N)."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 1  # no children left at all: the broker is gone without a status
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            return 128 - code if code < 0 else code
