#!/usr/bin/env python3
"""Install size, install time and start time of the client, beside the broker's install.

Builds the wheel from this checkout, then for each of ``aldaas`` (the client, the plain
install) and ``aldaas[server]`` (the broker's dependencies too, what every install was
before the split) creates a fresh virtualenv without pip, installs into it with this
interpreter's pip (``pip --python``; pip's cache is warmed by one untimed install first, so
the figures are install time, not download time), and measures:

- the virtualenv's size on disk (``du``-style, bytes of every file),
- the install's wall time (median of ``--runs``),
- ``aldaas connect --help``'s wall time from exec to exit (median of ``--starts``), and
  ``python -c pass`` in the same venv as the floor.

Run: ``python bench/install_bench.py [--runs 3] [--starts 15]`` (needs PyPI or a pip cache).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import venv

ROOT = pathlib.Path(__file__).resolve().parents[1]


def build_wheel(out: pathlib.Path) -> pathlib.Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
    )
    (wheel,) = out.glob("aldaas-*.whl")
    return wheel


def tree_size(path: pathlib.Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            full = pathlib.Path(root, name)
            if not full.is_symlink():
                total += full.stat().st_size
    return total


def install(requirement: str, target: pathlib.Path) -> float:
    if target.exists():
        shutil.rmtree(target)
    venv.create(target, with_pip=False)
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(target / "bin" / "python"),
            "install",
            "-q",
            "--disable-pip-version-check",
            requirement,
        ],
        check=True,
    )
    return time.perf_counter() - started


def start_time(argv: list[str], starts: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    times = []
    for _ in range(starts):
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env, cwd="/")
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="installs per variant")
    parser.add_argument("--starts", type=int, default=15, help="starts per measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        wheel = build_wheel(work / "dist")
        print(
            "| install | venv size | install time (median) | `aldaas connect --help` | `python -c pass` |"
        )
        print("|---|---|---|---|---|")
        for label, requirement in (
            ("`pip install aldaas`", str(wheel)),
            ("`pip install 'aldaas[server]'`", f"{wheel}[server]"),
        ):
            target = work / "venv"
            install(requirement, target)  # warms pip's cache
            seconds = statistics.median(install(requirement, target) for _ in range(args.runs))
            size = tree_size(target)
            help_time = start_time(
                [str(target / "bin" / "aldaas"), "connect", "--help"], args.starts
            )
            floor = start_time([str(target / "bin" / "python"), "-c", "pass"], args.starts)
            print(
                f"| {label} | {size / 1e6:.1f} MB | {seconds:.1f} s | {help_time * 1000:.0f} ms "
                f"| {floor * 1000:.0f} ms |",
                flush=True,
            )


if __name__ == "__main__":
    main()
