"""Operators of the admin API and what their role lets them do."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(enum.StrEnum):
    ADMIN = "admin"  # everything, including operator tokens and CA registration
    OPERATOR = "operator"  # devices, certificates, lifecycle changes
    AUDITOR = "auditor"  # read-only, including the audit log


# Each role's rights are a superset of the one after it.
ROLE_RANK: dict[Role, int] = {Role.AUDITOR: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


def role_allows(held: Role, needed: Role) -> bool:
    return ROLE_RANK[held] >= ROLE_RANK[needed]


@dataclass(frozen=True, slots=True)
class Operator:
    token_id: str
    name: str
    role: Role
