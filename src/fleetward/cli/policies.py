"""``fleetward policy``: what devices may publish, subscribe to and call."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape as rich_escape

from fleetward.cli.common import (
    AdminUrl,
    App,
    CaFile,
    DataDir,
    JsonFlag,
    api,
    err,
    fail,
    out,
    print_json,
    table,
    warn,
)
from fleetward.errors import InvalidInput
from fleetward.policy import parse_document, validate_policy_name

app = App(help="Policies: what devices may publish, subscribe to and call.",
          no_args_is_help=True)


def _policy_name(name: str) -> str:
    """A policy name checked before it becomes a URL path segment."""
    try:
        return validate_policy_name(name)
    except InvalidInput as exc:
        fail(exc)


def _policy_target(type_name: str | None, device: str | None) -> tuple[str, str]:
    if (type_name is None) == (device is None):
        fail(InvalidInput("give either --type T or --device D",
                          hint="e.g. fleetward policy attach sensors-v2 --type sensor"))
    return ("type", type_name) if type_name is not None else ("device", device or "")


def _read_policy_file(path: Path) -> dict[str, Any]:
    """The document in ``path`` (JSON for .json, YAML for .yaml/.yml, else guessed),
    validated here first so that mistakes are named before anything is sent."""
    suffix = path.suffix.lower()
    fmt = "json" if suffix == ".json" else "yaml" if suffix in (".yaml", ".yml") else None
    try:
        data = path.read_bytes()
    except OSError as exc:
        fail(InvalidInput(f"cannot read {path}: {exc.strerror}",
                          hint="pass a readable JSON or YAML file"))
    try:
        return parse_document(data, fmt).to_json()
    except InvalidInput as exc:
        fail(InvalidInput(f"{path}: {exc.message}", hint=exc.hint))


def _attachments_text(items: list[dict[str, str]]) -> str:
    return ", ".join(f"{a['kind']}:{a['target']}" for a in items) or "-"


@app.command("put")
def policy_put(name: str,
               file: Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                                    help="policy document (JSON or YAML)")],
               data_dir: DataDir = None, admin_url: AdminUrl = None,
               ca_file: CaFile = None) -> None:
    """Create or replace a policy from a JSON or YAML file."""
    document = _read_policy_file(file)
    with api(data_dir, admin_url, ca_file) as client:
        stored = client.request("PUT", f"/v1/policies/{_policy_name(name)}", json=document)
    verb = "created" if stored["version"] == 1 else "replaced"
    out.print(f"policy [bold]{rich_escape(name)}[/] {verb} (version {stored['version']}, "
              f"{stored['statements']} statements; attached to "
              f"{rich_escape(_attachments_text(stored['attachments']))})", highlight=False)


@app.command("get")
def policy_get(name: str, as_json: JsonFlag = False, data_dir: DataDir = None,
               admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """Show a policy's statements and where it is attached."""
    with api(data_dir, admin_url, ca_file) as client:
        policy = client.get(f"/v1/policies/{_policy_name(name)}")
    if as_json:
        print_json(policy)
        return
    kind = "built-in" if policy["builtin"] else f"version {policy['version']}"
    out.print(f"policy [bold]{rich_escape(name)}[/] ({kind}); attached to "
              f"{rich_escape(_attachments_text(policy['attachments']))}", highlight=False)
    table(f"Policy {name}", ["sid", "effect", "actions", "resources"],
          [[st.get("sid", f"#{i}"), st["effect"], ", ".join(st["actions"]),
            "\n".join(st["resources"])]
           for i, st in enumerate(policy["document"]["statements"], start=1)])
    if policy.get("error"):
        err.print(f"[bold red]this stored document no longer validates[/] "
                  f"({rich_escape(policy['error'])}); devices it applies to are denied "
                  "everything", highlight=False)


@app.command("list")
def policy_list(as_json: JsonFlag = False, data_dir: DataDir = None,
                admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """List policies and where they are attached."""
    with api(data_dir, admin_url, ca_file) as client:
        items = client.get("/v1/policies")["items"]
    if as_json:
        print_json(items)
        return
    table("Policies", ["name", "version", "statements", "attached to"],
          [[p["name"], "built-in" if p["builtin"] else p["version"], p["statements"],
            _attachments_text(p["attachments"])] for p in items])


@app.command("delete")
def policy_delete(name: str, data_dir: DataDir = None, admin_url: AdminUrl = None,
                  ca_file: CaFile = None) -> None:
    """Delete a policy (detach it everywhere first)."""
    with api(data_dir, admin_url, ca_file) as client:
        client.delete(f"/v1/policies/{_policy_name(name)}")
    out.print(f"policy [bold]{rich_escape(name)}[/] deleted", highlight=False)


PolicyType = Annotated[str | None, typer.Option("--type", help="a device type")]
PolicyDevice = Annotated[str | None, typer.Option("--device", help="a device id")]


@app.command("attach")
def policy_attach(name: str, type_name: PolicyType = None, device: PolicyDevice = None,
                  data_dir: DataDir = None, admin_url: AdminUrl = None,
                  ca_file: CaFile = None) -> None:
    """Attach a policy to a device type or a device; applies to live sessions."""
    kind, target = _policy_target(type_name, device)
    with api(data_dir, admin_url, ca_file) as client:
        result = client.post(f"/v1/policies/{_policy_name(name)}/attachments",
                             {kind: target})
    note = "" if result["changed"] else " (it already was)"
    out.print(f"policy [bold]{rich_escape(name)}[/] attached to {kind} "
              f"{rich_escape(target)}{note}", highlight=False)
    _print_effective(result)


@app.command("detach")
def policy_detach(name: str, type_name: PolicyType = None, device: PolicyDevice = None,
                  data_dir: DataDir = None, admin_url: AdminUrl = None,
                  ca_file: CaFile = None) -> None:
    """Detach a policy from a device type or a device."""
    kind, target = _policy_target(type_name, device)
    with api(data_dir, admin_url, ca_file) as client:
        result = client.request("DELETE", f"/v1/policies/{_policy_name(name)}/attachments",
                                params={kind: target})
    out.print(f"policy [bold]{rich_escape(name)}[/] detached from {kind} "
              f"{rich_escape(target)}", highlight=False)
    _print_effective(result)


def _print_effective(result: dict[str, Any] | None) -> None:
    """What now applies to the attachment's target (the server's ``effective``), and its
    warnings on stderr, e.g. a type whose devices lost mqtt:connect."""
    effective = result.get("effective") if isinstance(result, dict) else None
    if not isinstance(effective, dict) or result is None:  # a server from before it
        return
    if effective["kind"] == "type":
        who = f"devices of type {effective['target']} without policies of their own"
    else:
        who = f"device {effective['target']}"
    if effective["implicit_default"]:
        applies = "default (built-in; nothing is attached"
        applies += " to the type)" if effective["kind"] == "type" else " to it or its type)"
    elif effective["kind"] == "type":
        applies = ", ".join(effective["policies"])
    else:
        applies = ", ".join(
            f"{p} (device)" if p in effective["device_policies"] else
            f"{p} (type {effective['device_type']})" for p in effective["policies"])
    out.print(f"now applies to {who}: {applies}", markup=False, highlight=False)
    if effective["quarantined"]:
        out.print(f"device {effective['target']} is quarantined: only the quarantine "
                  "policy applies until it is released", markup=False, highlight=False)
    for warning in result.get("warnings") or []:
        warn(warning["message"], warning["hint"])


def _print_explanation(result: dict[str, Any], action: str, resource: str,
                       device: str) -> None:
    """One line per fact, never truncated (a table would cut resources at 80 columns).
    Every value is escaped: a topic may contain Rich markup such as "[bold]"."""
    def line(text: str) -> None:
        out.print(text, highlight=False, soft_wrap=True)

    e = rich_escape
    verdict = "[bold green]ALLOW[/]" if result["allowed"] else "[bold red]DENY[/]"
    line(f"{verdict} {e(action)} on {e(repr(resource))} for device {e(device)}")
    line(f"reason: {e(result['reason'])}")
    line("policies applied: " + ("quarantine (the device is quarantined)"
                                 if result["quarantined"] else e(", ".join(result["policies"]))))
    if not result["matched"]:
        line("no statement matched: denied by default")
    for m in result["matched"]:
        colour = "green" if m["effect"] == "allow" else "red"
        line(f"  matched: [{colour}]{m['effect']}[/] policy '{e(m['policy'])}' statement "
             f"'{e(m['statement'])}' resource {e(repr(m['resource']))} "
             f"(written {e(repr(m['template']))})")
    for u in result["unusable_resources"]:
        line(f"  unusable: {u['effect']} policy '{e(u['policy'])}' statement "
             f"'{e(u['statement'])}' resource {e(repr(u['template']))}: {e(u['reason'])} "
             f"→ {u['treated_as']}")


@app.command("test")
def policy_test(device: Annotated[str, typer.Option("--device", help="device id")],
                action: Annotated[str, typer.Option(
                    "--action", help="mqtt:connect|publish|subscribe|receive, http:<METHOD>, "
                                     "est:reenroll, ota:download")],
                resource: Annotated[str, typer.Option(
                    "--resource", help="topic, topic filter (subscribe), client id "
                                       "(connect), request path without '/' (http)")],
                cert_serial: Annotated[str | None, typer.Option(
                    "--cert-serial", help="hex serial, to resolve ${cert.serial}")] = None,
                as_json: JsonFlag = False, data_dir: DataDir = None,
                admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """Explain whether a device may do something, and which statement decided it.

    Exit code 0 when allowed, 1 when denied.
    """
    body: dict[str, Any] = {"device_id": device, "action": action, "resource": resource}
    if cert_serial is not None:
        body["cert_serial"] = cert_serial
    with api(data_dir, admin_url, ca_file) as client:
        result = client.post("/v1/policies/test", body)
    if as_json:
        print_json(result)
    else:
        _print_explanation(result, action, resource, device)
    raise typer.Exit(0 if result["allowed"] else 1)
