"""Keys, signers and X.509 helpers."""
