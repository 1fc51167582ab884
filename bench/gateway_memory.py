"""Gateway memory under many sessions: what the process really holds vs its memory budget.

    .tox/py3/bin/python bench/gateway_memory.py [--sessions 1000] [--runs 3] [--kib 256]

Starts the gateway alone in a child process (an echo server behind every session) and, from
this process, opens ``--sessions`` tunnel sessions with one stream each, in steps. At each
step it reads the gateway process's resident memory (``VmRSS`` from /proc) and the budget's
``memory_held_bytes``, then pushes ``--kib`` KiB through every stream (echoed back, all
sessions at once) and reads both again (and the peak, ``VmHWM``). The baseline is the
same gateway process with no session, in the same run. Median of ``--runs`` runs.

Never a test: figures depend on the machine. Results go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
from functools import partial

import structlog
import trio

TOKEN = "bench-token"


def _quiet() -> None:
    """Warnings and errors only, on stderr: stdout carries the port and the results."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def _raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---------------------------------------------------------------------------- the gateway (child)


async def _gateway_main() -> None:
    from aldaas import tunnel

    async def echo(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    class Hooks:
        def __init__(self, address: tuple[str, int]) -> None:
            self.address = address
            self.count = 0
            self.gateway: tunnel.Gateway | None = None

        async def open_session(
            self, params: tunnel.JSONObject, progress: tunnel.ProgressCallback
        ) -> tunnel.SessionGrant:
            self.count += 1
            return tunnel.SessionGrant(session_id=f"s{self.count}", secret=f"secret{self.count}")

        async def verify_session(self, session_id: str, secret: str) -> bool:
            return False

        def resolve(self, session_id: str) -> tuple[str, int]:
            return self.address

        async def control(
            self, session_id: str | None, name: str, args: tunnel.JSONObject
        ) -> tunnel.JSONValue:
            assert self.gateway is not None
            stats = self.gateway.statistics()
            text = await trio.Path("/proc/self/status").read_text()
            fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
            return {
                "rss_kib": int(fields["VmRSS"].split()[0]),
                "hwm_kib": int(fields["VmHWM"].split()[0]),
                "held_bytes": stats.memory_held_bytes,
                "sessions": stats.sessions,
                "streams": stats.streams,
            }

        async def resolve_legacy(self, name: str, session: str) -> tunnel.LegacyRoute:
            raise tunnel.SessionRefused("no legacy endpoint here")

        def attached(self, session_id: str) -> None: ...

        def detached(self, session_id: str) -> None: ...

        def traffic(self, session_id: str, bytes_up: int, bytes_down: int) -> None: ...

        def session_ended(self, session_id: str, reason: str) -> None: ...

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
        hooks = Hooks(listeners[0].socket.getsockname()[:2])
        settings = tunnel.GatewaySettings(
            host="127.0.0.1", port=0, instance_token=TOKEN, max_sessions=100_000
        )
        hooks.gateway = await nursery.start(tunnel.serve_gateway, settings, hooks)
        print(hooks.gateway.port, flush=True)


# ---------------------------------------------------------------------------- the clients (parent)


async def _measure(port: int, steps: list[int], kib: int) -> list[dict[str, float]]:
    from aldaas import tunnel

    settings = tunnel.ClientSettings(url=f"ws://127.0.0.1:{port}/tunnel", listen=False)
    payload = os.urandom(kib * 1024)
    rows: list[dict[str, float]] = []

    async def probe() -> dict[str, int]:
        async with tunnel.open_control(settings, TOKEN) as control:
            answer = await control.request("stats")
        assert isinstance(answer, dict)
        return {k: int(v) for k, v in answer.items()}  # type: ignore[arg-type]

    async def roundtrip(stream: tunnel.TunnelStream) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, payload)
            got = 0
            while got < len(payload):
                got += len(await stream.receive_some(65536))

    async with trio.open_nursery() as nursery:
        clients: list[tunnel.TunnelClient] = []
        streams: list[tunnel.TunnelStream] = []
        base = await probe()
        rows.append({"sessions": 0, "rss_mib": base["rss_kib"] / 1024, "held_mib": 0.0})
        for target in steps:
            while len(clients) < target:
                client = await nursery.start(
                    partial(tunnel.serve_client, settings, tunnel.NewSession(token=TOKEN))
                )
                clients.append(client)
                streams.append(await client.open_stream())
            idle = await probe()
            async with trio.open_nursery() as traffic:
                for stream in streams:
                    traffic.start_soon(roundtrip, stream)
            busy = await probe()
            rows.append(
                {
                    "sessions": target,
                    "rss_mib": idle["rss_kib"] / 1024,
                    "held_mib": idle["held_bytes"] / 2**20,
                    "rss_after_traffic_mib": busy["rss_kib"] / 1024,
                    "peak_mib": busy["hwm_kib"] / 1024,
                    "held_after_traffic_mib": busy["held_bytes"] / 2**20,
                }
            )
        for client in clients:
            client.close()
        nursery.cancel_scope.cancel()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kib", type=int, default=256, help="KiB echoed per stream per step")
    parser.add_argument("--gateway", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    _raise_fd_limit()
    _quiet()
    if args.gateway:
        trio.run(_gateway_main)
        return
    steps = sorted({max(1, args.sessions // 10), args.sessions // 2, args.sessions})
    runs: list[list[dict[str, float]]] = []
    for _ in range(args.runs):
        child = subprocess.Popen(
            [sys.executable, __file__, "--gateway"], stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout is not None
            port = int(child.stdout.readline())
            runs.append(trio.run(_measure, port, steps, args.kib))
        finally:
            child.kill()
            child.wait()
    median = [
        {key: statistics.median(run[i][key] for run in runs) for key in runs[0][i]}
        for i in range(len(runs[0]))
    ]
    print(json.dumps({"runs": args.runs, "kib_per_stream": args.kib, "median": median}, indent=1))


if __name__ == "__main__":
    main()
