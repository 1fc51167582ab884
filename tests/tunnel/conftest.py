"""Fixtures of the tunnel tests (helpers live in tunnel_fakes.py)."""

from __future__ import annotations

import pytest
import trio
from tunnel_fakes import Rig, start_rig

from aldaas.tunnel._relay import RELAY_ENV, epoll_available

RELAY_MODES = [
    pytest.param(
        "epoll",
        marks=pytest.mark.skipif(not epoll_available(), reason="the epoll relay is Linux's"),
    ),
    "portable",
]


@pytest.fixture(params=RELAY_MODES)
def relay_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once per relay (the Linux accelerator, the portable path): the gateway
    and client settings of the test say ``auto``, which follows the environment."""
    mode: str = request.param
    monkeypatch.setenv(RELAY_ENV, mode)
    return mode


@pytest.fixture
async def rig(nursery: trio.Nursery) -> Rig:
    return await start_rig(nursery)
