"""What every admin resource module shares: the services, the route record, helpers.

A resource module (``devices``, ``policies``, ...) declares its handlers and a ``ROUTES``
tuple; ``fleetward.admin.app`` concatenates them into the one table that serves the API
and generates the OpenAPI document. Nothing here imports a resource module.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from aiohttp import web

from fleetward.admin.auth import OperatorTokens
from fleetward.audit import AuditLog
from fleetward.ca import Authority
from fleetward.clock import Clock
from fleetward.enroll import BootstrapTokens, EnrollmentService
from fleetward.errors import InvalidInput
from fleetward.model import Operator, Role
from fleetward.registry import Registry
from fleetward.registry.device_commands import DeviceCommandService
from fleetward.registry.policies import PolicyService
from fleetward.store import Database
from fleetward.tokens.api_keys import ApiKeyService
from fleetward.tokens.credentials import DeviceCredentialService
from fleetward.tokens.keys import SigningKeys
from fleetward.tokens.service import TokenService

T = TypeVar("T")
MAX_BODY_BYTES = 1024 * 1024  # bytes; a CSR is ~1 KiB, an OEM CA certificate ~2 KiB
DEFAULT_TOKEN_TTL_HOURS = 72  # a device is usually installed within days of its token
MAX_TOKEN_TTL_HOURS = 24 * 90  # hours; BootstrapTokens allows at most 90 days
MAX_SQL_INT = 2**63 - 1  # BIGINT: audit sequence numbers and message ids
MAX_PAGE = 1000  # items per list call, wherever a route takes ?limit=
_DECIMAL = re.compile(r"-?[0-9]+")
OPERATOR_KEY = web.AppKey("operator", Operator)
SERVICES_KEY: web.AppKey[AdminServices] = web.AppKey("services")


@dataclass(frozen=True, slots=True)
class AdminServices:
    db: Database
    registry: Registry
    tokens: OperatorTokens
    authority: Authority
    audit: AuditLog
    clock: Clock
    executor: Executor  # one worker: serialises SQL writes and keeps them off the loop
    bootstrap: BootstrapTokens
    enrollment: EnrollmentService
    policies: PolicyService
    commands: DeviceCommandService
    access_tokens: TokenService
    credentials: DeviceCredentialService
    api_keys: ApiKeyService
    signing_keys: SigningKeys

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, partial(fn, *args, **kwargs))


Handler = Callable[[web.Request, AdminServices, Operator], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Reply:
    """One documented response of a route: what the status means and its JSON body."""

    description: str
    schema: dict[str, Any] | None = None  # JSON Schema of the body; None: no body (204)


@dataclass(frozen=True, slots=True)
class Param:
    """A path or query parameter with the constraints its handler enforces."""

    name: str
    schema: dict[str, Any]
    description: str = ""
    required: bool = False  # path parameters always are


@dataclass(frozen=True, slots=True)
class Route:
    """One admin API operation: its role, handler and what the OpenAPI document says.

    ``responses`` lists the statuses the handler answers with on success (each with
    its body's schema); ``errors`` the problem statuses it can produce beyond those
    every route of its kind has (401/403 when it needs a role; 400 when it takes a
    body, query or path parameters; 413 with a body; 5XX always), each with what it
    means here: see ``fleetward.admin.openapi``.
    """

    method: str
    path: str
    role: Role | None  # None: public (health, OpenAPI document)
    handler: Callable[..., Awaitable[web.StreamResponse]]
    summary: str
    body: dict[str, Any] | None = None  # JSON Schema of the request body
    query: tuple[Param, ...] = ()
    responses: Mapping[int, Reply] = field(default_factory=dict)
    errors: Mapping[int, str] = field(default_factory=dict)
    # Path parameters whose schema differs from PATH_PARAMS (e.g. names that exclude
    # the built-in policies).
    path_params: tuple[Param, ...] = ()
    body_types: tuple[str, ...] = ("application/json",)


def actor(op: Operator) -> str:
    return f"operator:{op.name}"


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


def body_int(body: dict[str, Any], key: str, default: int | None, low: int, high: int) -> int:
    """An integer field in ``low..high``; ``default`` None makes it required."""
    example = f'e.g. {{"{key}": {default if default is not None else low}}}'
    value = body.get(key, default)
    if value is None:
        raise InvalidInput(f"missing field {key!r}", hint=example)
    # JSON has one number type: JSON Schema's "integer" is any number with a zero
    # fractional part (2020-12 Core §4.2.1), so 30.0 is 30, as the OpenAPI document says.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    # bool is an int in Python; JSON true must not mean 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"field {key!r} must be an integer", hint=example)
    if not low <= value <= high:
        raise InvalidInput(f"field {key!r} must be between {low} and {high}", hint=example)
    return value


def body_bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"field {key!r} must be true or false",
                           hint=f'e.g. {{"{key}": true}}')
    return value


def str_list(body: dict[str, Any], key: str, example: str) -> list[str] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInput(f"{key} must be a list of strings", hint=f"e.g. {example}")
    return value


def query_int(request: web.Request, key: str, default: int, low: int = 0,
              high: int = MAX_SQL_INT) -> int:
    """A query parameter of decimal digits in ``low..high``; ``default`` when absent.

    Raises:
        InvalidInput: not an integer (Python's ``int()`` would also take "1_000", " 5"
            and other scripts' digits), or out of range (a value beyond a 64-bit SQL
            integer would fail in the database driver instead).
    """
    raw = request.query.get(key)
    if raw is None:
        return default
    if not _DECIMAL.fullmatch(raw):
        raise InvalidInput(f"query parameter {key} must be an integer",
                           hint=f"e.g. ?{key}={default}")
    # More digits than any 64-bit value has are out of range without parsing them.
    value = int(raw) if len(raw) <= 20 else high + 1
    if not low <= value <= high:
        raise InvalidInput(f"query parameter {key} must be between {low} and {high}",
                           hint=f"e.g. ?{key}={default}")
    return value


def ttl(body: dict[str, Any], default_hours: int = DEFAULT_TOKEN_TTL_HOURS) -> dt.timedelta:
    # The service enforces 1 minute .. 90 days; whole hours are what operators type.
    return dt.timedelta(hours=body_int(body, "ttl_hours", default_hours, 1,
                                       MAX_TOKEN_TTL_HOURS))


# --- JSON Schema of ?limit= (the rest are in fleetward.admin.schemas) --------------------

LIMIT = {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 100,
         "description": "items per page"}
