"""Enrollment: one-time bootstrap credentials (EST endpoints arrive next)."""

from fleetward.enroll.bootstrap import BootstrapRefused, BootstrapTokens, IssuedToken, Redemption

__all__ = ["BootstrapRefused", "BootstrapTokens", "IssuedToken", "Redemption"]
