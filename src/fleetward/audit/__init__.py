"""Tamper-evident audit log."""

from fleetward.audit.log import AuditLog, ChainProblem, VerifyReport, record_to_json

__all__ = ["AuditLog", "ChainProblem", "VerifyReport", "record_to_json"]
