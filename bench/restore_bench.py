"""Restore throughput of the local provider's built-in restore beside psql / pg_restore -j by hand.

Usage (as root or as a normal user; root runs PostgreSQL as the ``aldaas`` user):

    python bench/restore_bench.py [--scale 70] [--runs 3] [--jobs 0] [--engine provider|command]

It makes one source database with ``pgbench -i -s SCALE`` (scale 70 is about
1 GB), dumps it once as plain SQL (``pg_dump``) and as a custom archive
(``pg_dump -Fc``), then, ``--runs`` times and in the same run, restores each
file into a fresh volume

- with ``LocalProvider.restore()`` (the built-in restore, as the pool runs it:
  the file streamed from a directory source, format read from its bytes), or with
  ``--engine command`` with ``aldaas restore-backup --file FILE --seal-login aldaas``
  as the Kubernetes restore Job runs it on the downloaded file (the same engine; an
  uncompressed archive is read in place instead of spooled), and
- by hand: ``psql -X -q -v ON_ERROR_STOP=1 -f FILE`` and
  ``pg_restore --jobs N -d DB FILE`` against an identical fresh volume,

and prints the median seconds and MB/s (dump file bytes / seconds) of each, and the CPU
seconds the benchmark's own process (the broker's side: read, decompress, filter, pipe)
spent in each built-in restore (``--engine provider``; the command's CPU is its own process's). The built-in and the by-hand restore take turns going first.
``--jobs 0`` uses the built-in restore's own choice (CPU count, 1 to 4) for
both.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from aldaas.pool import (
    Command,
    DirectorySettings,
    DirectorySource,
    Endpoint,
    Kind,
    LocalProvider,
    LocalSettings,
    RestoreProgress,
)

BUILTIN = Command(argv=(), builtin=True)


@contextlib.contextmanager
def scratch_dir() -> Iterator[pathlib.Path]:
    parent = pathlib.Path(tempfile.mkdtemp(prefix="aldaas-bench-", dir="/tmp"))
    parent.chmod(0o711)
    try:
        yield parent
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def ignore(_: RestoreProgress) -> None:
    pass


def run_as_tool(argv: list[str], endpoint: Endpoint, bin_dir: pathlib.Path) -> None:
    env = {**os.environ, **endpoint.environ(), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run(argv, env=env, capture_output=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{argv[0]} failed: {done.stderr.decode()[-2000:]}")


def run_command(path: pathlib.Path, endpoint: Endpoint, bin_dir: pathlib.Path) -> None:
    """``aldaas restore-backup`` on ``path``, as the Kubernetes restore Job runs it."""
    work = path.parent.parent / "work"
    argv = [sys.executable, "-m", "aldaas.broker", "restore-backup", "--file", str(path)]
    argv += ["--key", path.name, "--work-dir", str(work), "--bin-dir", str(bin_dir)]
    argv += ["--outcome", str(path.parent.parent / "outcome.json"), "--seal-login", "aldaas"]
    run_as_tool(argv, endpoint, bin_dir)


async def main(scale: int, runs: int, jobs: int, engine: str) -> None:
    with scratch_dir() as root:
        settings = LocalSettings(data_dir=root / "data")
        provider = LocalProvider(settings)
        files = root / "backups"
        files.mkdir(mode=0o755)
        source = await provider.create_volume("source", {})
        bin_dir = await provider.bin_dir()
        started = time.monotonic()
        await trio.to_thread.run_sync(
            run_as_tool,
            [str(bin_dir / "pgbench"), "-i", "-s", str(scale), "-q", "--no-vacuum"],
            source,
            bin_dir,
        )
        print(f"# pgbench -i -s {scale}: {time.monotonic() - started:.0f} s")
        plain, custom = files / "bench.sql", files / "bench.dump"
        await trio.to_thread.run_sync(
            run_as_tool, [str(bin_dir / "pg_dump"), "-f", str(plain)], source, bin_dir
        )
        await trio.to_thread.run_sync(
            run_as_tool, [str(bin_dir / "pg_dump"), "-Fc", "-f", str(custom)], source, bin_dir
        )
        await provider.destroy(Kind.VOLUME, "source")
        for path in (plain, custom):
            path.chmod(0o644)
            print(f"# {path.name}: {path.stat().st_size / 1e6:.0f} MB")
        jobs = jobs or max(1, min(4, os.cpu_count() or 1))
        dir_source = DirectorySource(DirectorySettings(path=files, suffix=""))
        backups = {b.key: b for b in await dir_source.list_backups()}
        seconds: dict[str, list[float]] = {}
        python_cpu: dict[str, list[float]] = {}

        async def timed(label: str, name: str, how: str, path: pathlib.Path) -> None:
            endpoint = await provider.create_volume(name, {})
            began, cpu = time.monotonic(), time.process_time()
            if how == "builtin" and engine == "command":
                await trio.to_thread.run_sync(run_command, path, endpoint, bin_dir)
            elif how == "builtin":
                await provider.restore(name, backups[path.name], dir_source, BUILTIN, ignore)
            elif path.suffix == ".sql":
                argv = [str(bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-o"]
                argv += ["/dev/null", "-f", str(path)]
                await trio.to_thread.run_sync(run_as_tool, argv, endpoint, bin_dir)
            else:
                argv = [str(bin_dir / "pg_restore"), "--exit-on-error", f"--jobs={jobs}"]
                argv += [f"--dbname={endpoint.database}", str(path)]
                await trio.to_thread.run_sync(run_as_tool, argv, endpoint, bin_dir)
            seconds.setdefault(label, []).append(time.monotonic() - began)
            if how == "builtin" and engine == "provider":
                python_cpu.setdefault(label, []).append(time.process_time() - cpu)
            await provider.destroy(Kind.VOLUME, name)

        for run in range(runs):
            for path in (plain, custom):
                # Alternate which goes first: the second restore of a pair meets a warmer cache.
                for how in ("builtin", "by hand")[:: 1 if run % 2 == 0 else -1]:
                    tool = "psql" if path.suffix == ".sql" else f"pg_restore -j {jobs}"
                    ours = "aldaas built-in" if engine == "provider" else "aldaas restore-backup"
                    label = f"{path.name} {ours if how == 'builtin' else tool}"
                    await timed(label, f"r{run}-{path.stem}-{how[:2]}", how, path)
            print(f"# run {run + 1} of {runs} done", flush=True)
        print("| restore | median s | MB/s (dump bytes) | runs (s) | broker CPU s (median) |")
        print("| --- | --- | --- | --- | --- |")
        for label, values in seconds.items():
            size = (plain if label.startswith("bench.sql") else custom).stat().st_size
            med = statistics.median(values)
            runs_text = ", ".join(f"{v:.1f}" for v in values)
            cpu_text = f"{statistics.median(python_cpu[label]):.1f}" if label in python_cpu else ""
            print(f"| {label} | {med:.1f} | {size / 1e6 / med:.1f} | {runs_text} | {cpu_text} |")
        # On a shared machine the load moves between runs; a pair ran back to back.
        labels = list(seconds)
        for builtin, by_hand in zip(labels[::2], labels[1::2], strict=True):
            ratios = [a / b for a, b in zip(seconds[builtin], seconds[by_hand], strict=True)]
            shown = ", ".join(f"{r:.2f}" for r in ratios)
            print(
                f"# {builtin} / by hand, per run: median {statistics.median(ratios):.2f} ({shown})"
            )
        await provider.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=70)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=0)
    parser.add_argument("--engine", choices=("provider", "command"), default="provider")
    args = parser.parse_args()
    trio.run(main, args.scale, args.runs, args.jobs, args.engine)
