"""Policy decision cost: a compiled policy against a plain dict lookup, same run.

The policy is what a typical device connects with: the built-in ``default`` policy plus
a type policy with a deny and a wildcard subscription grant, compiled once for device
``sensor-0042`` exactly as the gate does per connection. The requests mix what the
listeners ask per packet: own telemetry (allowed), another device's topic (denied, no
match), a denied config topic, a command delivery (``mqtt:receive``), an HTTPS route and
a subscription check.

Two policy figures: ``decide`` as listeners call it (a device repeats its topics, so
after the first packet an answer comes from the connection's small decision cache) and
``decide_uncached`` (the first sight of every topic: deny and allow trie walks).

The baseline is the cheapest possible authorisation: one ``dict.get`` on
``(action, resource)`` with the answers precomputed, in the same loop shape. The ratio
shows what topic matching, deny-first evaluation and wildcards cost on top of that.

Usage:
    python bench/policy.py [--decisions N] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable

from fleetward.policy import (
    DEFAULT_POLICY,
    NamedPolicy,
    PolicyVariables,
    compile_policies,
    parse_document,
)

DEVICE = PolicyVariables("sensor-0042", "sensor", "acme", "5f3a9c")
TYPE_POLICY = NamedPolicy("sensor-fleet", parse_document({"statements": [
    {"sid": "fleet-broadcast", "effect": "allow", "actions": ["mqtt:subscribe", "mqtt:receive"],
     "resources": ["types/${device.type}/broadcast/#"]},
    {"sid": "no-config", "effect": "deny", "actions": ["mqtt:publish"],
     "resources": ["devices/+/config/#"]},
    {"sid": "tenant", "effect": "allow", "actions": ["mqtt:publish"],
     "resources": ["tenants/${device.owner}/devices/${device.id}/#"]},
]}))
REQUESTS: list[tuple[str, str]] = [
    ("mqtt:publish", "devices/sensor-0042/telemetry/temperature"),
    ("mqtt:publish", "devices/sensor-0042/telemetry/humidity"),
    ("mqtt:publish", "devices/sensor-0042/events/boot"),
    ("mqtt:publish", "devices/sensor-0043/telemetry/temperature"),
    ("mqtt:publish", "devices/sensor-0042/config/wifi"),
    ("mqtt:receive", "devices/sensor-0042/commands/reboot"),
    ("mqtt:receive", "types/sensor/broadcast/firmware"),
    ("http:POST", "v1/telemetry/temperature"),
    ("http:GET", "v1/devices/self"),
    ("mqtt:subscribe", "devices/sensor-0042/commands/+"),
]


def measure(decide: Callable[[str, str], object], decisions: int) -> float:
    """Nanoseconds per call over ``decisions`` calls (after a warm-up)."""
    rounds = max(1, decisions // len(REQUESTS))
    for action, resource in REQUESTS * 50:
        decide(action, resource)
    start = time.perf_counter_ns()
    for _ in range(rounds):
        for action, resource in REQUESTS:
            decide(action, resource)
    elapsed = time.perf_counter_ns() - start
    return elapsed / (rounds * len(REQUESTS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=1_000_000)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    compiled = compile_policies([DEFAULT_POLICY, TYPE_POLICY], DEVICE)
    answers = {(a, r): compiled.decide(a, r).allowed for a, r in REQUESTS}
    if sorted(answers.values()) != [False, False] + [True] * (len(REQUESTS) - 2):
        print(f"unexpected decisions: {answers}", file=sys.stderr)  # the bench must measure
        return 1  # the policy it claims to, not one that denies (or allows) everything

    compile_ns = measure(lambda a, r: compile_policies([DEFAULT_POLICY, TYPE_POLICY], DEVICE),
                         max(len(REQUESTS), args.decisions // 100))
    policy_ns = measure(compiled.decide, args.decisions)
    uncached_ns = measure(compiled.decide_uncached, args.decisions)
    baseline_ns = measure(lambda a, r: answers.get((a, r)), args.decisions)
    ratio, uncached_ratio = policy_ns / baseline_ns, uncached_ns / baseline_ns
    if args.json:
        print(json.dumps({"policy_ns": policy_ns, "uncached_ns": uncached_ns,
                          "baseline_ns": baseline_ns, "ratio": ratio,
                          "uncached_ratio": uncached_ratio, "compile_us": compile_ns / 1000,
                          "decisions": args.decisions, "python": platform.python_version()}))
        return 0
    print(f"policy: {policy_ns:.0f} ns/decision  [N={args.decisions}, default + 1 type "
          f"policy, {len(REQUESTS)} request kinds repeated, Python "
          f"{platform.python_version()}]")
    print(f"policy-uncached: {uncached_ns:.0f} ns/decision  [first sight of a topic: "
          f"deny and allow trie walks]")
    print(f"baseline: {baseline_ns:.0f} ns/lookup  [dict.get on (action, resource), "
          f"answers precomputed]")
    print(f"compile: {compile_ns / 1000:.1f} us/connection  [variables resolved, tries built]")
    print(f"ratio policy/baseline: {ratio:.1f}")
    print(f"ratio policy-uncached/baseline: {uncached_ratio:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
