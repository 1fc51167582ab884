"""A simulated kubelet for the fake API server that runs real PostgreSQL through the local provider.

Each object the Kubernetes provider creates becomes the local provider's
equivalent, so an end-to-end test exercises real databases while the broker
only ever talks to the (fake) Kubernetes API:

- a database pod on a fresh PVC → ``LocalProvider.create_volume(pvc)``;
  on a PVC whose dataSource is a VolumeSnapshot → ``LocalProvider.clone``;
  a pod made again on a PVC that had one (after an eviction) → that PVC's
  server, still running on the same data (the PVC's data is the server's);
  the pod's IP (127.0.0.x) and the application port are forwarded to the
  local server's 127.0.0.1 port by a small TCP proxy, as a pod network would;
  like the application image (POSTGRES_USER/POSTGRES_PASSWORD), the database
  then has the application's superuser with the application's password (the
  local provider's own role model is undone here: per-clone credentials on
  Kubernetes are a later change);
- a VolumeSnapshot → ``LocalProvider.seal(pvc, snapshot)`` (stops the server
  cleanly, as deleting the pod did on a cluster, and keeps the data);
- a deleted PVC or VolumeSnapshot → ``LocalProvider.destroy``;
- a Job → its containers run as processes on this machine: the ``fetch`` init
  container's ``--key K --to P`` is served from the S3 source, then the main
  container's command runs with the pod's environment and the PostgreSQL
  binaries on PATH; its output becomes the pod's log.

It runs in the fake's controller threads and calls the (trio) local provider
with ``trio.from_thread.run``.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import trio
from k8s_fake_api import JobOutcome, Obj
from psycopg import sql

from aldaas.pool import Backup, Endpoint, Kind, LocalProvider, S3Source
from aldaas.pool.providers.local._postgres import embedded_bin_dir


class _Forwarder:
    """Listens on (ip, port) and pipes every connection to (target_host, target_port)."""

    def __init__(self, ip: str, port: int, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server((ip, port))
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, timeout=10)
            except OSError:
                conn.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()


class LocalKubelet:
    """The fake's kubelet, CSI driver and Job runner, backed by a LocalProvider and an S3 source."""

    def __init__(
        self,
        local: LocalProvider,
        source: S3Source,
        token: trio.lowlevel.TrioToken,
        workdir: pathlib.Path,
        application: tuple[str, str],
    ) -> None:
        """``local`` must make its lease login a superuser; ``application`` is (user, password)."""
        self._local = local
        self._application = application
        self._source = source
        self._token = token
        self._workdir = workdir
        self._forwarders: dict[str, _Forwarder] = {}
        self._started: dict[str, tuple[str, int]] = {}
        """PVC uid → its local server: a pod made again on a PVC finds that PVC's data there."""
        self.failures: list[str] = []

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return trio.from_thread.run(fn, *args, trio_token=self._token)
        except (trio.RunFinishedError, trio.Cancelled, BaseExceptionGroup) as exc:
            # The test's trio run ended (or cancelled the call) while the fake still worked.
            raise RuntimeError(f"the local provider is gone ({exc!r})") from None

    # database pods ---------------------------------------------------------------------------
    def start_pod(self, pod: Obj, pvc: Obj, ip: str) -> None:
        """Start (or clone) the pod's database and forward ip:containerPort to it."""
        name = pvc["metadata"]["name"]
        target = self._started.get(pvc["metadata"]["uid"])
        if target is None:
            source = pvc["spec"].get("dataSource")
            if source:
                endpoint = self._run(self._local.clone, source["name"], name, {})
            else:
                endpoint = self._run(self._local.create_volume, name, {})
            self._as_image(endpoint)
            target = self._started[pvc["metadata"]["uid"]] = (endpoint.host, endpoint.port)
        port = pod["spec"]["containers"][0]["ports"][0]["containerPort"]
        self._forwarders[pod["metadata"]["name"]] = _Forwarder(ip, port, target)

    def _as_image(self, endpoint: Endpoint) -> None:
        """Give the database the image's superuser and password (as admin, or as the login)."""
        user, password = self._application
        with psycopg.connect(
            host=endpoint.host,
            port=endpoint.port,
            user=endpoint.user,
            dbname=endpoint.database,
            password=endpoint.password,
            autocommit=True,
        ) as conn:
            exists = conn.execute("SELECT FROM pg_roles WHERE rolname = %s", [user]).fetchall()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(
                sql.SQL("{} ROLE {} WITH LOGIN SUPERUSER PASSWORD {}").format(
                    sql.SQL(verb), sql.Identifier(user), password
                )
            )

    def stop_pod(self, pod: Obj) -> None:
        forwarder = self._forwarders.pop(pod["metadata"]["name"], None)
        if forwarder is not None:
            forwarder.close()

    def deleted_pvc(self, pvc: Obj) -> None:
        self._started.pop(pvc["metadata"]["uid"], None)
        kind = Kind(pvc["metadata"]["labels"]["aldaas.io/kind"])
        self._run(self._local.destroy, kind, pvc["metadata"]["name"])

    # snapshots -------------------------------------------------------------------------------
    def take_snapshot(self, snapshot: Obj) -> None:
        volume = snapshot["spec"]["source"]["persistentVolumeClaimName"]
        self._run(self._local.seal, volume, snapshot["metadata"]["name"], {})

    def deleted_snapshot(self, snapshot: Obj) -> None:
        self._run(self._local.destroy, Kind.SNAPSHOT, snapshot["metadata"]["name"])

    # jobs ------------------------------------------------------------------------------------
    def run_job(self, job: Obj) -> JobOutcome:
        spec = job["spec"]["template"]["spec"]
        with tempfile.TemporaryDirectory(dir=self._workdir) as folder:
            mounts: dict[str, str] = {}
            for init in spec.get("initContainers", []):
                argv = init["command"]
                key, target = argv[argv.index("--key") + 1], argv[argv.index("--to") + 1]
                local = pathlib.Path(folder) / pathlib.PurePosixPath(target).name
                self._run(self._download, key, local)
                mounts[target] = str(local)
            container = spec["containers"][0]
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            env = {k: mounts.get(v, v) for k, v in env.items()}
            env["PATH"] = f"{embedded_bin_dir()}:{os.environ.get('PATH', '/usr/bin:/bin')}"
            env["LC_ALL"] = "C"
            done = subprocess.run(
                container["command"],
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=job["spec"]["activeDeadlineSeconds"],
                check=False,
            )
        log = (done.stdout + done.stderr).decode("utf-8", "replace")
        if done.returncode != 0:
            self.failures.append(log)
        return JobOutcome(succeeded=done.returncode == 0, log=log)

    async def _download(self, key: str, target: pathlib.Path) -> None:
        backup = Backup(key=key, etag="", size=0, modified=0.0)
        with target.open("wb") as out:
            async for chunk in self._source.open(backup):
                out.write(chunk)

    def close(self) -> None:
        for forwarder in self._forwarders.values():
            forwarder.close()
        self._forwarders.clear()
