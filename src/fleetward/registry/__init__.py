"""Device registry and lifecycle service."""

from fleetward.registry.service import Registry, StateChange

__all__ = ["Registry", "StateChange"]
