#!/usr/bin/env python3
"""Install size, install time and start time of the client, beside the broker's install.

Builds the wheel from this checkout, then for each of ``aldaas`` (the client, the plain
install) and ``aldaas[server]`` (the broker's dependencies too, what every install was
before the split) fills a wheelhouse (``pip wheel``, untimed), creates fresh virtualenvs
without pip, installs into them with this interpreter's pip (``pip --python``) and measures:

- the virtualenv's size on disk (bytes of every file),
- the install's wall time, median of ``--runs``, from the wheelhouse (``--no-index``: no
  network, so it is pip's own work) and from PyPI with a warm cache (index lookups included),
- ``aldaas connect --help``'s wall time from exec to exit, median and minimum of
  ``--starts``, beside ``python -c pass`` in the same venv (the interpreter's floor).

Run: ``python bench/install_bench.py [--runs 3] [--starts 21]`` (needs PyPI or a pip cache).
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


def install(requirement: str, target: pathlib.Path, *pip_args: str) -> float:
    if target.exists():
        shutil.rmtree(target)
    venv.create(target, with_pip=False)
    python = str(target / "bin" / "python")
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", *pip_args, requirement],
        check=True,
    )
    return time.perf_counter() - started


def start_times(argv: list[str], starts: int) -> tuple[float, float]:
    """Median and minimum wall time of ``argv`` (outside the repository, no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    times = []
    for _ in range(starts):
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env, cwd="/")
        times.append(time.perf_counter() - started)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="installs per variant")
    parser.add_argument("--starts", type=int, default=21, help="starts per measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        wheel = build_wheel(work / "dist")
        print(
            "| install | venv size | install, wheelhouse | install, PyPI (warm cache) "
            "| `aldaas connect --help` median (min) | `python -c pass` median (min) |"
        )
        print("|---|---|---|---|---|---|")
        for label, requirement in (
            ("`pip install aldaas`", str(wheel)),
            ("`pip install 'aldaas[server]'`", f"{wheel}[server]"),
        ):
            house = work / f"house-{len(label)}"
            subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(house), requirement],
                check=True,
            )
            target = work / "venv"
            offline = ("--no-index", "--find-links", str(house))
            local = statistics.median(
                install(requirement, target, *offline) for _ in range(args.runs)
            )
            install(requirement, target)  # warms pip's cache for the next ones
            online = statistics.median(install(requirement, target) for _ in range(args.runs))
            size = tree_size(target)
            bin_dir = target / "bin"
            helped = start_times([str(bin_dir / "aldaas"), "connect", "--help"], args.starts)
            floor = start_times([str(bin_dir / "python"), "-c", "pass"], args.starts)
            print(
                f"| {label} | {size / 1e6:.1f} MB | {local:.1f} s | {online:.1f} s "
                f"| {helped[0] * 1000:.0f} ms ({helped[1] * 1000:.0f} ms) "
                f"| {floor[0] * 1000:.0f} ms ({floor[1] * 1000:.0f} ms) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
