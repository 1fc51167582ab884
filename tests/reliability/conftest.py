"""Fixtures for the reliability tests; they reuse the pool's fakes from tests/pool."""

from __future__ import annotations

import pathlib
import sys

# tests/ has no __init__.py: make tests/pool's helper modules (pool_fakes) importable from here.
_POOL_TESTS = str(pathlib.Path(__file__).resolve().parent.parent / "pool")
if _POOL_TESTS not in sys.path:
    sys.path.insert(0, _POOL_TESTS)

# ... and tests/tunnel's (tunnel_fakes), for the gateway fuzzing.
_TUNNEL_TESTS = str(pathlib.Path(__file__).resolve().parent.parent / "tunnel")
if _TUNNEL_TESTS not in sys.path:
    sys.path.insert(0, _TUNNEL_TESTS)

# ... and tests/broker's (aldaas_e2e: a real `aldaas serve` and clients).
_BROKER_TESTS = str(pathlib.Path(__file__).resolve().parent.parent / "broker")
if _BROKER_TESTS not in sys.path:
    sys.path.append(_BROKER_TESTS)
