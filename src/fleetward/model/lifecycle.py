"""Device lifecycle: the one table of allowed transitions.

Every state change in Fleetward goes through ``check_transition``; nothing else decides
whether a move is legal (python-tuf's trusted_metadata_set keeps its order the same way).
"""

from __future__ import annotations

import enum

from fleetward.errors import IllegalTransition


class LifecycleState(enum.StrEnum):
    REGISTERED = "registered"  # known to the registry, no credential used yet
    ACTIVE = "active"  # may connect and act within its policy
    DISABLED = "disabled"  # switched off by an operator; credentials kept
    QUARANTINED = "quarantined"  # recovery routes only (re-enroll, firmware, own status)
    COMPROMISED = "compromised"  # every credential revoked (keyCompromise)
    RETIRED = "retired"  # terminal; every credential revoked (cessationOfOperation)


S = LifecycleState

TRANSITIONS: dict[LifecycleState, frozenset[LifecycleState]] = {
    S.REGISTERED: frozenset({S.ACTIVE, S.COMPROMISED, S.RETIRED}),
    S.ACTIVE: frozenset({S.DISABLED, S.QUARANTINED, S.COMPROMISED, S.RETIRED}),
    S.DISABLED: frozenset({S.ACTIVE, S.COMPROMISED, S.RETIRED}),
    S.QUARANTINED: frozenset({S.ACTIVE, S.COMPROMISED, S.RETIRED}),
    S.COMPROMISED: frozenset({S.RETIRED}),
    S.RETIRED: frozenset(),
}

# States in which a device may receive a new certificate. A quarantined device may
# re-enroll: that is one of its recovery routes.
ISSUABLE_STATES: frozenset[LifecycleState] = frozenset({S.REGISTERED, S.ACTIVE, S.QUARANTINED})

# States whose entry revokes every credential, with the RFC 5280 §5.3.1 reason to use.
REVOKING_STATES: dict[LifecycleState, str] = {
    S.COMPROMISED: "key_compromise",
    S.RETIRED: "cessation_of_operation",
}

# States whose entry ends every access token the device holds (its credential
# generation moves on): a token must not outlive the decision that took the device out
# of service, even if an operator switches it back on later.
TOKEN_ENDING_STATES: frozenset[LifecycleState] = frozenset(
    {S.DISABLED, S.QUARANTINED, S.COMPROMISED, S.RETIRED})


def parse_state(value: str) -> LifecycleState:
    """Parse a state name, with an error that lists the valid ones."""
    try:
        return LifecycleState(value)
    except ValueError:
        from fleetward.errors import InvalidInput

        names = ", ".join(s.value for s in LifecycleState)
        raise InvalidInput(
            f"unknown lifecycle state {value!r}", hint=f"use one of: {names}"
        ) from None


def check_transition(current: LifecycleState, target: LifecycleState) -> None:
    """Raise IllegalTransition unless ``current → target`` is in the table.

    Raises:
        IllegalTransition: naming the states reachable from ``current``.
    """
    allowed = TRANSITIONS[current]
    if target in allowed:
        return
    if allowed:
        names = ", ".join(sorted(s.value for s in allowed))
        hint = f"from {current.value} a device may move to: {names}"
    else:
        hint = f"{current.value} is terminal; no further change is possible"
    raise IllegalTransition(
        f"a device cannot move from {current.value} to {target.value}",
        hint=hint,
        allowed=sorted(s.value for s in allowed),
    )
