"""Fleetward: a device-trust platform for IoT and edge fleets."""

__version__ = "0.1.0"
