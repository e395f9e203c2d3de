"""Enrollment: bootstrap tokens, EST (RFC 7030) logic without HTTP, factory batches."""

from fleetward.enroll.bootstrap import BootstrapRefused, BootstrapTokens, IssuedToken, Redemption
from fleetward.enroll.est import (
    CSR_ATTRS_DER,
    Attempt,
    EnrollmentRefused,
    EnrollmentResult,
    EnrollmentService,
)
from fleetward.enroll.factory import FactoryService

__all__ = ["CSR_ATTRS_DER", "Attempt", "BootstrapRefused", "BootstrapTokens",
           "EnrollmentRefused", "EnrollmentResult", "EnrollmentService", "FactoryService",
           "IssuedToken", "Redemption"]
