"""HTTP plumbing shared by every listener: problem+json and TLS contexts."""
