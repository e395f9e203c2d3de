"""Device API routes without TLS: every /v1 device route is gated (deny by default),
the gate failing closed before its caches load, and the query parsing a device sees.

The TLS, admission and enforcement paths are in tests/integration/test_device_https.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request

from fleetward.config import ChannelConfig, DeviceApiConfig
from fleetward.edge.channel import Admission, LiveConnections, Refusal
from fleetward.edge.device import build_device_app
from fleetward.edge.device_api import DeviceApi, _epoch_iso, _wait_seconds
from fleetward.edge.gate import TrustGate
from fleetward.errors import InvalidInput
from fleetward.model import AuditEvent
from fleetward.registry.device_commands import DeviceCommandService
from fleetward.registry.policies import PolicyService
from tests.conftest import Stack

DEVICE_ROUTES = [("POST", "/v1/telemetry"), ("POST", "/v1/telemetry/reading"),
                 ("POST", "/v1/events"), ("POST", "/v1/events/boot"),
                 ("GET", "/v1/devices/self"), ("GET", "/v1/commands?wait=5"),
                 ("POST", "/v1/commands/abc/result")]


class NeverIntake:
    """Fails the test if a refused request ever reaches the intake."""

    async def accept_http(self, admission: Admission, kind: str, message_type: str,
                          data: Any) -> None:
        raise AssertionError("a refused request reached the intake")


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown(wait=True)


def app_for(stack: Stack, executor: ThreadPoolExecutor, *, loaded: bool,
            refusals: list[AuditEvent]) -> web.Application:
    live = LiveConnections()
    gate = TrustGate(stack.db, [stack.authority.issuing.certificate],
                     PolicyService(stack.db, stack.audit, stack.clock), live, ChannelConfig(),
                     stack.clock, refusals.append)
    if loaded:
        gate.load()
    config = DeviceApiConfig()
    commands = DeviceCommandService(stack.db, stack.audit, stack.clock, config, executor)
    return build_device_app(api=DeviceApi(gate, live, NeverIntake(), commands, config,
                                          executor))


async def call_all(app: web.Application) -> list[tuple[int, dict[str, Any], dict[str, str]]]:
    answers = []
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        for method, path in DEVICE_ROUTES:
            async with session.request(method, server.make_url(path), json={"t": 1}) as r:
                answers.append((r.status, await r.json(content_type=None), dict(r.headers)))
        async with session.get(server.make_url("/v1/health")) as health:
            answers.append((health.status, await health.json(), dict(health.headers)))
    return answers


@pytest.mark.parametrize(("loaded", "status", "code"), [
    (True, 401, Refusal.BAD_CREDENTIALS),  # no client certificate (no TLS at all)
    (False, 503, Refusal.SERVER_UNAVAILABLE),  # caches not loaded: fail closed
])
def test_every_device_route_is_gated_and_health_is_not(
        sqlite_stack: Stack, executor: ThreadPoolExecutor, loaded: bool, status: int,
        code: Refusal) -> None:
    refusals: list[AuditEvent] = []
    answers = asyncio.run(call_all(app_for(sqlite_stack, executor, loaded=loaded,
                                           refusals=refusals)))
    *routes, health = answers
    for (method, path), (got, body, headers) in zip(DEVICE_ROUTES, routes, strict=True):
        assert got == status, (method, path, body)
        assert headers["Content-Type"].startswith("application/problem+json")
        assert body["reason_code"] == f"0x{int(code):02x}" and body["hint"], body
        assert "WWW-Authenticate" not in headers
        assert ("Retry-After" in headers) == (status == 503)
    assert health[0] == 200  # negative control: the ungated route answers
    assert refusals and all(e.action == "channel.refused" for e in refusals)
    # The gate throttles its refusal audit per peer and reason: one row, not seven.
    assert len(refusals) == 1


@pytest.mark.parametrize(("query", "expected"), [
    ("", 0), ("wait=", 0), ("wait=0", 0), ("wait=7", 7), ("wait=30", 30),
    ("wait=31", 30), ("wait=99999999999999", 30),  # longer waits are shortened
])
def test_wait_is_whole_seconds_capped_at_the_limit(query: str, expected: int) -> None:
    request = make_mocked_request("GET", f"/v1/commands?{query}")
    assert _wait_seconds(request, 30) == expected


@pytest.mark.parametrize("value", ["-1", "1.5", "1e3", "abc", "٣", " 5", "0x10"])
def test_bad_waits_are_refused_with_an_example(value: str) -> None:
    request = make_mocked_request("GET", "/v1/commands")
    request = request.clone(rel_url=f"/v1/commands?wait={value}")
    with pytest.raises(InvalidInput) as refused:
        _wait_seconds(request, 30)
    assert "?wait=30" in refused.value.hint


def test_certificate_expiry_renders_as_rfc3339_utc() -> None:
    assert _epoch_iso(1_780_000_000.0) == "2026-05-28T20:26:40Z"
    assert _epoch_iso(float("inf")) is None
