"""Listeners devices and relying parties talk to."""
