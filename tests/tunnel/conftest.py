"""Fixtures of the tunnel tests (helpers live in tunnel_fakes.py)."""

from __future__ import annotations

import pytest
import trio
from tunnel_fakes import Rig, start_rig


@pytest.fixture
async def rig(nursery: trio.Nursery) -> Rig:
    return await start_rig(nursery)
