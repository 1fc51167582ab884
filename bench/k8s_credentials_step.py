"""What per-clone credentials add to a Kubernetes refill: the clone pod's init container.

Runs the init container's own script (``_manifests.CREDENTIALS_SCRIPT`` with the SQL
``credentials_sql`` builds and two fresh SCRAM verifiers) against a real data folder,
as a pod would before the database starts, ``--runs`` times, and beside it the baseline
in the same run: ``postgres --single`` started and stopped on the same folder with no
statement (the least any single-user step costs). The hand-out path is unchanged (the
password comes with the clone's endpoint; bench/k8s_claim.py measures the claim).

Usage (as root the server runs as ``--user``, default ``aldaas``):

    python bench/k8s_credentials_step.py [--bin-dir /usr/lib/postgresql/15/bin] [--runs 7]

Needs ``aldaas`` importable (the tox env's python, or ``pip install -e .``).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import pwd
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

from aldaas.pool import _roles as roles
from aldaas.pool.providers.kubernetes import _manifests as manifests
from aldaas.pool.providers.kubernetes._settings import KubernetesSettings


def _demote(user: str | None) -> Callable[[], None] | None:
    """A preexec function that drops root to ``user`` (PostgreSQL refuses to run as root)."""
    if user is None:
        return None
    entry = pwd.getpwnam(user)

    def demote() -> None:
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)

    return demote


def _run(argv: list[str], env: dict[str, str], user: str | None) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True, preexec_fn=_demote(user))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin-dir", default="/usr/lib/postgresql/15/bin")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--user", default="aldaas", help="who runs PostgreSQL when root")
    args = parser.parse_args()
    user = args.user if os.geteuid() == 0 else None
    folder = pathlib.Path(tempfile.mkdtemp(prefix="aldaas-bench-credentials-"))
    try:
        if user:
            entry = pwd.getpwnam(user)
            os.chown(folder, entry.pw_uid, entry.pw_gid)
        data = folder / "pgdata"
        env = {"PATH": f"{args.bin_dir}:/usr/bin:/bin", "LC_ALL": "C", "PGDATA": str(data)}
        pwfile = folder / "pw"
        pwfile.write_text(roles.new_password())
        if user:
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        initdb = ["initdb", "-U", roles.ADMIN, "--pwfile", str(pwfile), "-A", "scram-sha-256"]
        _run(initdb, env, user)
        settings = KubernetesSettings()
        step_env = {
            **env,
            "ALDAAS_DATA": str(data),
            "ALDAAS_CREDENTIALS_SQL": manifests.credentials_sql(settings, lease_superuser=False),
        }
        single = ["postgres", "--single", "-D", str(data), "template1"]
        baseline, step = [], []
        for _ in range(args.runs):
            baseline.append(_run(single, env, user))
            verifiers = {
                "ALDAAS_LOGIN_VERIFIER": roles.scram_verifier(roles.new_password()),
                "ALDAAS_ADMIN_VERIFIER": roles.scram_verifier(roles.new_password()),
            }
            script = ["sh", "-c", manifests.CREDENTIALS_SCRIPT]
            step.append(_run(script, {**step_env, **verifiers}, user))
        version = subprocess.run(
            [f"{args.bin_dir}/postgres", "--version"], capture_output=True, text=True, check=True
        ).stdout.strip()
        print(f"{version}; {args.runs} runs each, interleaved; seconds: median (min-max)")
        for name, times in (
            ("baseline: postgres --single, no statement", baseline),
            ("credentials init container script", step),
        ):
            print(f"{name:45s} {statistics.median(times):.3f} ({min(times):.3f}-{max(times):.3f})")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
