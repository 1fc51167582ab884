"""Fixtures of the tunnel tests (helpers live in tunnel_fakes.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
from tunnel_fakes import Rig, start_rig


@pytest.fixture
async def rig(nursery: trio.Nursery) -> AsyncIterator[Rig]:
    yield await start_rig(nursery)
