"""Fixtures of the provider contract suite: each provider in turn (see provider_backends.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import trio
from provider_backends import (
    Backend,
    LiveProvider,
    clear,
    fake_backend,
    kubernetes_backend,
    local_backend,
)

_SLOW = pytest.mark.slow  # real PostgreSQL servers, a real HTTP server and its threads


@pytest.fixture(
    scope="module",
    params=["fake", pytest.param("local", marks=_SLOW), pytest.param("kubernetes", marks=_SLOW)],
)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Each provider in turn, with snapshot ``base`` and volume ``scratch`` made once."""
    if request.param == "fake":
        made = fake_backend()
    elif request.param == "local":
        made = local_backend(request.getfixturevalue("module_data_dir"))
    else:
        made = kubernetes_backend()
    with made as backend:
        yield backend


@pytest.fixture
async def provider(backend: Backend) -> AsyncIterator[LiveProvider]:
    """A fresh provider on the backend; whatever the test made is destroyed afterwards."""
    async with backend.provider() as provider:
        yield provider
        with trio.CancelScope(shield=True):
            await clear(provider)
