"""Who may do what: policy documents, variables, MQTT topic matching, decisions.

Pure code (imports only ``fleetward.model`` and ``fleetward.errors``): storage lives in
``fleetward.store.policies`` and the service in ``fleetward.registry.policies``.
"""

from fleetward.policy.defaults import (
    BUILTIN_POLICIES,
    DEFAULT_POLICY,
    DEFAULT_POLICY_NAME,
    QUARANTINE_POLICY,
    QUARANTINE_POLICY_NAME,
)
from fleetward.policy.document import (
    ACTIONS,
    VARIABLES,
    Effect,
    NamedPolicy,
    PolicyDocument,
    Statement,
    parse_document,
    validate_policy_name,
)
from fleetward.policy.engine import (
    CompiledPolicy,
    Decision,
    Explanation,
    PolicySnapshot,
    PolicyVariables,
    StatementMatch,
    compile_for_device,
    compile_policies,
    effective_policies,
    policies_for,
)

__all__ = [
    "ACTIONS",
    "BUILTIN_POLICIES",
    "DEFAULT_POLICY",
    "DEFAULT_POLICY_NAME",
    "QUARANTINE_POLICY",
    "QUARANTINE_POLICY_NAME",
    "VARIABLES",
    "CompiledPolicy",
    "Decision",
    "Effect",
    "Explanation",
    "NamedPolicy",
    "PolicyDocument",
    "PolicySnapshot",
    "PolicyVariables",
    "Statement",
    "StatementMatch",
    "compile_for_device",
    "compile_policies",
    "effective_policies",
    "parse_document",
    "policies_for",
    "validate_policy_name",
]
