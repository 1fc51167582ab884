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
  like the official postgres image, a volume's database then has the
  superuser POSTGRES_USER with the password POSTGRES_PASSWORD of the pod's
  environment (secretKeyRef and envFrom resolved from the fake's Secrets, as
  a kubelet does), and a clone pod's init containers really run, with the
  server stopped, as the PostgreSQL OS user, on the clone's data folder
  (``postgres --single`` sets the clone's passwords);
- a VolumeSnapshot → ``LocalProvider.seal(pvc, snapshot)`` (stops the server
  cleanly, as deleting the pod did on a cluster, and keeps the data);
- a deleted PVC or VolumeSnapshot → ``LocalProvider.destroy``;
- a Job → its containers run as processes on this machine, each volume a
  folder and every path under a mount made the folder's: the ``fetch`` init
  container's ``--key K --to P`` is served from the S3 source, then the main
  container's command runs with the pod's environment and the PostgreSQL
  binaries on PATH (``aldaas ...`` is this installation's, as in the helper
  image); its output becomes the pod's log and what it wrote to its
  ``terminationMessagePath`` its termination message.

It runs in the fake's controller threads and calls the (trio) local provider
with ``trio.from_thread.run``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import trio
from k8s_fake_api import FakeKubernetes, JobOutcome, Obj
from psycopg import sql

from aldaas.pool import Backup, Endpoint, Kind, LocalProvider, S3Source
from aldaas.pool.providers.local import _postgres as pg
from aldaas.pool.providers.local._postgres import embedded_bin_dir


class ContainerFailed(Exception):
    """A container of a database pod could not start or exited non-zero (its log is the message)."""

    def __init__(self, container: str, reason: str, log: str) -> None:
        super().__init__(log)
        self.container, self.reason = container, reason


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


def _mounts(container: Obj, volumes: dict[str, pathlib.Path]) -> list[tuple[str, str]]:
    """(path in the container, local path) of each of ``container``'s volume mounts."""
    mounts = []
    for mount in container.get("volumeMounts", []):
        local = volumes[mount["name"]] / mount.get("subPath", "")
        mounts.append((mount["mountPath"].rstrip("/"), str(local)))
    return mounts


def _local(value: str, mounts: list[tuple[str, str]]) -> str:
    """``value`` with a container path under one of ``mounts`` made the local one."""
    for path, local in mounts:
        if value == path or value.startswith(path + "/"):
            return local + value[len(path) :]
    return value


def _local_argv(container: Obj, volumes: dict[str, pathlib.Path]) -> list[str]:
    mounts = _mounts(container, volumes)
    return [_local(arg, mounts) for arg in container["command"]]


class LocalKubelet:
    """The fake's kubelet, CSI driver and Job runner, backed by a LocalProvider and an S3 source."""

    def __init__(
        self,
        local: LocalProvider,
        source: S3Source,
        token: trio.lowlevel.TrioToken,
        workdir: pathlib.Path,
        fake: FakeKubernetes,
    ) -> None:
        self._local = local
        self._fake = fake
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

    # environment -----------------------------------------------------------------------------
    def _env(self, pod: Obj, container: Obj) -> dict[str, str]:
        """A container's environment as the kubelet builds it: envFrom Secrets, then env entries
        (plain or from a Secret's key); a missing Secret or key fails the container."""
        namespace = pod["metadata"]["namespace"]
        name = container["name"]

        def secret(secret_name: str) -> dict[str, str]:
            found = self._fake.get("secrets", namespace, secret_name)
            if found is None:
                raise ContainerFailed(
                    name, "CreateContainerConfigError", f'secret "{secret_name}" not found'
                )
            data = found.get("data") or {}
            return {k: base64.b64decode(v).decode() for k, v in data.items()}

        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            env.update(secret(source["secretRef"]["name"]))
        for entry in container.get("env", []):
            if "value" in entry:
                env[entry["name"]] = entry["value"]
                continue
            ref = entry["valueFrom"]["secretKeyRef"]
            values = secret(ref["name"])
            if ref["key"] not in values:
                raise ContainerFailed(
                    name,
                    "CreateContainerConfigError",
                    f"couldn't find key {ref['key']} in Secret {namespace}/{ref['name']}",
                )
            env[entry["name"]] = values[ref["key"]]
        return env

    # database pods ---------------------------------------------------------------------------
    def start_pod(self, pod: Obj, pvc: Obj, ip: str) -> None:
        """Start (or clone) the pod's database and forward ip:containerPort to it."""
        name = pvc["metadata"]["name"]
        uid = pvc["metadata"]["uid"]
        target = self._started.get(uid)
        database = pod["spec"]["containers"][0]
        env = self._env(pod, database)
        if target is None:
            source = pvc["spec"].get("dataSource")
            if source:
                endpoint = self._run(self._local.clone, source["name"], name, {})
            else:
                endpoint = self._run(self._local.create_volume, name, {})
                if "POSTGRES_PASSWORD" in env:
                    self._as_image(name, endpoint, env)
            target = (endpoint.host, endpoint.port)
        inits = pod["spec"].get("initContainers", [])
        if inits:  # on every start of a pod, a recreated one too (the server then restarts)
            init_env = {c["name"]: self._env(pod, c) for c in inits}
            endpoint = self._run(self._run_init_containers, name, inits, init_env)
            target = (endpoint.host, endpoint.port)
        self._started[uid] = target
        port = database["ports"][0]["containerPort"]
        self._forwarders[pod["metadata"]["name"]] = _Forwarder(ip, port, target)

    async def _run_init_containers(
        self, name: str, inits: list[Obj], envs: dict[str, dict[str, str]]
    ) -> Endpoint:
        """Stop the clone's server, run each init container as the PostgreSQL OS user on its
        data folder (PGDATA), start the server again; the admin's endpoint (its new port)."""
        local = self._local
        setup = await local._ready()
        folder = local._dir(Kind.CLONE, name)
        await local._servers.stop(folder)
        for init in inits:
            env = {**envs[init["name"]], "PGDATA": str(folder / "pgdata")}
            done = await pg.run_command(
                init["command"],
                env=pg.command_env(setup.bin_dir, env),
                run_user=setup.run_user,
                timeout_seconds=60,
                what=f"init container {init['name']} of clone {name!r}",
                cwd=folder,
            )
            if done.returncode != 0:
                raise ContainerFailed(init["name"], "CrashLoopBackOff", done.tail)
        await local._servers.start(setup, folder, f"clone {name!r}", durable=False)
        endpoint = local._servers.endpoint(folder, admin=True)
        assert endpoint is not None
        return endpoint

    def _as_image(self, volume: str, endpoint: Endpoint, env: dict[str, str]) -> None:
        """What the official image's first start makes: the superuser POSTGRES_USER with the
        password POSTGRES_PASSWORD, and the database POSTGRES_DB (the local admin does it)."""
        user = env.get("POSTGRES_USER", "postgres")
        with psycopg.connect(
            host=endpoint.host,
            port=endpoint.port,
            user=endpoint.user,
            dbname="postgres",
            password=endpoint.password,
            autocommit=True,
        ) as conn:
            exists = conn.execute("SELECT FROM pg_roles WHERE rolname = %s", [user]).fetchall()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(
                sql.SQL("{} ROLE {} WITH LOGIN SUPERUSER PASSWORD {}").format(
                    sql.SQL(verb), sql.Identifier(user), env["POSTGRES_PASSWORD"]
                )
            )
            if user == endpoint.user:  # the local admin: its state must know the new password
                folder = self._local._dir(Kind.VOLUME, volume)
                state = json.loads((folder / "state.json").read_text())
                state["admin_password"] = env["POSTGRES_PASSWORD"]
                (folder / "state.json").write_text(json.dumps(state))
            database = env.get("POSTGRES_DB", user)
            found = conn.execute("SELECT FROM pg_database WHERE datname = %s", [database])
            if not found.fetchall():
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))

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
            # Each volume is a folder; a path under a container's mount is that folder's.
            volumes = {v["name"]: pathlib.Path(folder, v["name"]) for v in spec.get("volumes", [])}
            for path in volumes.values():
                path.mkdir()
            for init in spec.get("initContainers", []):
                argv = _local_argv(init, volumes)
                key, target = argv[argv.index("--key") + 1], argv[argv.index("--to") + 1]
                self._run(self._download, key, pathlib.Path(target))
            container = spec["containers"][0]
            message_path = pathlib.Path(folder, "termination-log")
            message_path.touch()
            mounts = _mounts(container, volumes)
            message_at = container.get("terminationMessagePath", "/dev/termination-log")
            mounts.append((message_at, str(message_path)))
            env = self._env(job["spec"]["template"] | {"metadata": job["metadata"]}, container)
            env = {k: _local(v, mounts) for k, v in env.items()}
            env["PATH"] = f"{embedded_bin_dir()}:{os.environ.get('PATH', '/usr/bin:/bin')}"
            env["LC_ALL"] = "C"
            argv = [_local(arg, mounts) for arg in container["command"]]
            if argv[0] == "aldaas":  # the helper image's program: this installation's
                argv = [sys.executable, "-m", "aldaas.broker", *argv[1:]]
            done = subprocess.run(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=job["spec"]["activeDeadlineSeconds"],
                check=False,
            )
            message = message_path.read_text(errors="replace")
        log = (done.stdout + done.stderr).decode("utf-8", "replace")
        if done.returncode != 0:
            self.failures.append(log)
        return JobOutcome(succeeded=done.returncode == 0, log=log, message=message)

    async def _download(self, key: str, target: pathlib.Path) -> None:
        backup = Backup(key=key, etag="", size=0, modified=0.0)
        with target.open("wb") as out:
            async for chunk in self._source.open(backup):
                out.write(chunk)

    def close(self) -> None:
        for forwarder in self._forwarders.values():
            forwarder.close()
        self._forwarders.clear()
