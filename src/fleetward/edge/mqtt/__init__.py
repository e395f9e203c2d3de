"""Fleetward's own MQTT 3.1.1 + 5.0 server (asyncio, mutual TLS).

``codec`` encodes and decodes every control packet (sans I/O), ``session`` and
``broker`` hold sessions, subscriptions and retained messages, ``server`` is the
listener that authorizes every packet through the channel contract
(:mod:`fleetward.edge.channel`).
"""

from fleetward.edge.mqtt.codec import MalformedPacket, PacketReader, ReasonCode
from fleetward.edge.mqtt.server import MqttHooks, MqttServer, MqttStats

__all__ = ["MalformedPacket", "MqttHooks", "MqttServer", "MqttStats", "PacketReader",
           "ReasonCode"]
