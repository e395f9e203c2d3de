"""The OAuth 2.0 token service and the credentials of devices that do not (only) use
certificates: access tokens, proofs of possession, client assertions, scopes,
symmetric keys and API keys. Wire formats: docs/credentials.md."""
