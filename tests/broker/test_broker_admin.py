"""The admin/health HTTP listener over real loopback sockets, driven by a stdlib HTTP client."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Mapping
from typing import Any

import attrs
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from aldaas.broker._admin import AdminApp, serve_admin
from aldaas.broker._metrics import Metrics

TOKEN = "admin-token-for-tests"


@attrs.define
class FakeBackend:
    ready: bool = False
    leases: dict[str, str] = attrs.field(factory=lambda: {"L1": "active"})
    calls: list[str] = attrs.field(factory=list)

    def is_ready(self) -> tuple[bool, str]:
        return self.ready, "" if self.ready else "No snapshot is ready yet."

    def status(self) -> Mapping[str, Any]:
        return {"leases": [{"id": k, "state": v} for k, v in self.leases.items()]}

    async def kill_lease(self, lease_id: str) -> bool:
        self.calls.append(f"kill {lease_id}")
        return self.leases.pop(lease_id, None) is not None

    async def refresh(self) -> None:
        self.calls.append("refresh")

    async def drain(self) -> None:
        self.calls.append("drain")


@attrs.frozen
class Served:
    port: int
    backend: FakeBackend


@pytest.fixture
async def served(nursery: trio.Nursery) -> Served:
    backend = FakeBackend()
    app = AdminApp(backend, Metrics().exposition, token=TOKEN)
    port = await nursery.start(
        lambda task_status: serve_admin(app, host="127.0.0.1", port=0, task_status=task_status)
    )
    return Served(port=port, backend=backend)


def _request(
    port: int, method: str, path: str, token: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


async def request(
    port: int, method: str, path: str, token: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    return await trio.to_thread.run_sync(_request, port, method, path, token)


async def test_if_healthz_is_asked_then_it_answers_alive(served: Served) -> None:
    """If /healthz is requested, then it answers 200 alive without any token."""
    status, _, body = await request(served.port, "GET", "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "alive"})


async def test_if_no_snapshot_is_ready_then_readyz_is_503_until_it_is(served: Served) -> None:
    """If the backend is not ready, then /readyz is 503 with the reason; once ready, 200."""
    status, _, body = await request(served.port, "GET", "/readyz")
    assert status == 503
    assert json.loads(body) == {"status": "not ready", "reason": "No snapshot is ready yet."}
    served.backend.ready = True
    status, _, body = await request(served.port, "GET", "/readyz")
    assert (status, json.loads(body)) == (200, {"status": "ready"})


async def test_if_metrics_are_scraped_then_the_exposition_parses(served: Served) -> None:
    """If /metrics is requested, then the body is text exposition that the parser reads."""
    status, headers, body = await request(served.port, "GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert "aldaas_clones" in names


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x", ""])
async def test_if_the_admin_token_is_wrong_then_the_api_says_401(
    served: Served, token: str | None
) -> None:
    """If the admin token is missing or wrong, then the API answers 401 with one sentence."""
    status, headers, body = await request(served.port, "GET", "/api/status", token)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    error = json.loads(body)["error"]
    assert error.count(". ") == 0
    assert error.endswith(".")
    assert "admin token" in error
    assert served.backend.calls == []


async def test_if_the_token_is_right_then_status_refresh_drain_and_kill_reach_the_backend(
    served: Served,
) -> None:
    """If the admin token is right, then each API route calls the backend and answers JSON."""
    status, _, body = await request(served.port, "GET", "/api/status", TOKEN)
    assert (status, json.loads(body)) == (200, {"leases": [{"id": "L1", "state": "active"}]})
    assert (await request(served.port, "POST", "/api/refresh", TOKEN))[0] == 202
    assert (await request(served.port, "POST", "/api/drain", TOKEN))[0] == 202
    status, _, body = await request(served.port, "POST", "/api/leases/L1/kill", TOKEN)
    assert (status, json.loads(body)) == (200, {"killed": "L1"})
    status, _, body = await request(served.port, "POST", "/api/leases/L1/kill", TOKEN)
    assert status == 404
    assert json.loads(body)["error"] == (
        "There is no lease 'L1'; list the leases with GET /api/status."
    )
    assert served.backend.calls == ["refresh", "drain", "kill L1", "kill L1"]


async def test_if_the_method_or_path_is_wrong_then_405_or_404(served: Served) -> None:
    """If a route gets the wrong method or does not exist, then 405 or 404 with a JSON error."""
    status, headers, _ = await request(served.port, "POST", "/healthz")
    assert (status, headers["Allow"]) == (405, "GET")
    status, _, _ = await request(served.port, "GET", "/api/drain", TOKEN)
    assert status == 405
    status, _, body = await request(served.port, "GET", "/nope")
    assert status == 404
    assert "/nope" in json.loads(body)["error"]
    assert served.backend.calls == []


async def test_if_no_admin_token_is_configured_then_the_api_is_403(nursery: trio.Nursery) -> None:
    """If admin.token is unset, then the API is refused with 403 while probes still answer."""
    app = AdminApp(FakeBackend(), Metrics().exposition, token=None)
    port = await nursery.start(
        lambda task_status: serve_admin(app, host="127.0.0.1", port=0, task_status=task_status)
    )
    status, _, body = await request(port, "GET", "/api/status", "")
    assert status == 403
    assert "admin.token" in json.loads(body)["error"]
    assert (await request(port, "GET", "/healthz"))[0] == 200


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def test_if_two_requests_share_a_connection_then_both_are_answered(served: Served) -> None:
    """If a client pipelines two keep-alive requests, then both get answers on one connection."""
    two = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\n"
    two += b"Connection: close\r\n\r\n"
    out = await trio.to_thread.run_sync(_raw, served.port, two)
    assert out.count(b"HTTP/1.1 200 ") == 1
    assert out.count(b"HTTP/1.1 503 ") == 1


async def test_if_the_request_is_garbage_then_400_and_close(served: Served) -> None:
    """If the bytes are not HTTP, then the listener answers 400 and closes the connection."""
    out = await trio.to_thread.run_sync(_raw, served.port, b"\x00\x01 not http\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")
    assert b"send valid HTTP/1.1" in out


class RaisingBackend(FakeBackend):
    """A backend whose status and kill fail, as a bug in the pool would make them."""

    def status(self) -> Mapping[str, Any]:
        raise RuntimeError("status broke")

    async def kill_lease(self, lease_id: str) -> bool:
        raise KeyError(lease_id)


async def test_if_an_admin_handler_raises_then_it_answers_500_and_healthz_stays_up(
    nursery: trio.Nursery,
) -> None:
    """If the backend raises in a handler, then that request gets a 500 and /healthz still answers."""
    app = AdminApp(RaisingBackend(), Metrics().exposition, token=TOKEN)
    port = await nursery.start(
        lambda task_status: serve_admin(app, host="127.0.0.1", port=0, task_status=task_status)
    )
    for _ in range(3):
        status, _, body = await request(port, "GET", "/api/status", TOKEN)
        assert status == 500
        assert json.loads(body) == {
            "error": "The broker failed while answering GET '/api/status' (RuntimeError); "
            "see the broker's log for the cause."
        }
        status, _, body = await request(port, "POST", "/api/leases/L1/kill", TOKEN)
        assert (status, json.loads(body)["error"][:40]) == (
            500,
            "The broker failed while answering POST '",
        )
        status, _, body = await request(port, "GET", "/healthz")
        assert (status, json.loads(body)) == (200, {"status": "alive"})
