"""Shared fixtures. Package-specific fixtures live in each tests/<package>/conftest.py."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest


def _kill_postmasters(root: pathlib.Path) -> None:
    """Kill every PostgreSQL still serving a data directory under ``root`` (test leftovers)."""
    for pidfile in root.glob("*/*/pgdata/postmaster.pid"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pidfile.read_text().splitlines()[0])
            if os.readlink(f"/proc/{pid}/cwd") == str(pidfile.parent.resolve()):
                os.killpg(os.getpgid(pid), signal.SIGKILL)


def _remove(path: pathlib.Path) -> None:
    """Delete a tree, including sealed snapshots whose folders are read-only (0500) to a non-root user."""
    for dirpath, _dirnames, _filenames in os.walk(path):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, 0o700)
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def traversable_data_dir() -> Iterator[pathlib.Path]:
    """A fresh, not yet existing data folder for the local provider that its run user can reach.

    pytest's ``tmp_path`` lives under /tmp/pytest-of-root (mode 0700): when the
    tests run as root, PostgreSQL runs as the unprivileged ``aldaas`` user,
    which cannot traverse it. This folder's parent is /tmp/aldaas-test-XXXX
    (0711: traversable, not listable); any server left running is killed and
    the folder removed afterwards.
    """
    parent = pathlib.Path(tempfile.mkdtemp(prefix="aldaas-test-", dir="/tmp"))
    parent.chmod(0o711)
    try:
        yield parent / "data"
    finally:
        _kill_postmasters(parent / "data")
        _remove(parent)


@pytest.fixture
def data_dir() -> Iterator[pathlib.Path]:
    """A data folder for ``LocalSettings(data_dir=...)`` that PostgreSQL's run user can reach."""
    with traversable_data_dir() as path:
        yield path


@pytest.fixture(scope="module")
def module_data_dir() -> Iterator[pathlib.Path]:
    """Like ``data_dir``, shared by a test module (build an expensive snapshot once)."""
    with traversable_data_dir() as path:
        yield path


@pytest.fixture(scope="module")
def ca() -> Any:
    """A throwaway certificate authority (trustme.CA) for TLS tests."""
    import trustme

    return trustme.CA()


@pytest.fixture(scope="module")
def https_endpoint(ca: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 over HTTPS with a certificate for localhost from ``ca``, holding one backup
    (tests/s3_https.py); imported here so that sessions without TLS tests do not load moto."""
    from s3_https import https_s3

    with https_s3(ca, tmp_path_factory.mktemp("ca")) as endpoint:
        yield endpoint
