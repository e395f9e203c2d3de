"""The two built-in policies: ``default`` and ``quarantine``.

``default`` applies to a device when neither the device nor its type has any policy
attached; an operator may also attach it explicitly to combine it with others. It lets
a device act as itself and nothing more: connect with its own id, publish its own
telemetry (also on Azure IoT Hub's ``devices/<id>/messages/events/`` topic), events and
command results, subscribe to and receive its own commands, use
the device HTTPS API on its own behalf, re-enroll and download firmware.

``quarantine`` replaces every other policy while a device is quarantined (ARCHITECTURE
§1: "a quarantined device may only reach recovery routes"): its own status, re-enrollment
and firmware download; no MQTT at all.

Both are read-only: ``put`` and ``delete`` refuse their names.
"""

from __future__ import annotations

from types import MappingProxyType

from fleetward.policy.document import NamedPolicy, parse_document

DEFAULT_POLICY_NAME = "default"
QUARANTINE_POLICY_NAME = "quarantine"

_OWN = "devices/${device.id}"

DEFAULT_DOCUMENT = parse_document({"statements": [
    {"sid": "connect-as-self", "effect": "allow", "actions": ["mqtt:connect"],
     "resources": ["${device.id}"]},
    {"sid": "publish-own", "effect": "allow", "actions": ["mqtt:publish"],
     "resources": [f"{_OWN}/telemetry/#", f"{_OWN}/events/#",
                   f"{_OWN}/command-results/+", f"{_OWN}/messages/events/#"]},
    {"sid": "own-commands", "effect": "allow", "actions": ["mqtt:subscribe", "mqtt:receive"],
     "resources": [f"{_OWN}/commands/#"]},
    {"sid": "https-post", "effect": "allow", "actions": ["http:POST"],
     "resources": ["v1/telemetry", "v1/telemetry/+", "v1/events", "v1/events/+",
                   "v1/commands/+/result"]},
    {"sid": "https-get", "effect": "allow", "actions": ["http:GET"],
     "resources": ["v1/devices/self", "v1/commands"]},
    {"sid": "reenroll", "effect": "allow", "actions": ["est:reenroll"], "resources": ["#"]},
    {"sid": "firmware", "effect": "allow", "actions": ["ota:download"], "resources": ["#"]},
]})

QUARANTINE_DOCUMENT = parse_document({"statements": [
    {"sid": "own-status", "effect": "allow", "actions": ["http:GET"],
     "resources": ["v1/devices/self"]},
    {"sid": "reenroll", "effect": "allow", "actions": ["est:reenroll"], "resources": ["#"]},
    {"sid": "firmware", "effect": "allow", "actions": ["ota:download"], "resources": ["#"]},
]})

DEFAULT_POLICY = NamedPolicy(DEFAULT_POLICY_NAME, DEFAULT_DOCUMENT)
QUARANTINE_POLICY = NamedPolicy(QUARANTINE_POLICY_NAME, QUARANTINE_DOCUMENT)

BUILTIN_POLICIES: MappingProxyType[str, NamedPolicy] = MappingProxyType({
    DEFAULT_POLICY_NAME: DEFAULT_POLICY, QUARANTINE_POLICY_NAME: QUARANTINE_POLICY})
