"""Fixtures of the broker's tests.

The pool's in-memory fakes (tests/pool/pool_fakes.py: an honest Provider and
Source under the mock clock) are reused here to test the broker's wiring
without PostgreSQL; tests/pool is put on sys.path to import them.
"""

from __future__ import annotations

import logging
import pathlib
import sys
from collections.abc import Iterator

import pytest
import structlog

_POOL_TESTS = str(pathlib.Path(__file__).resolve().parent.parent / "pool")
if _POOL_TESTS not in sys.path:
    sys.path.append(_POOL_TESTS)


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """Tests that run ``main()`` configure structlog for the process; undo it after each test."""
    yield
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()
