"""Before ``serve`` starts anything: is every listener's port free, and who holds it if not.

Each port is bound the way asyncio's ``create_server`` will bind it (every address the
host resolves to, ``SO_REUSEADDR``, ``IPV6_V6ONLY``) and released again, all of them
before any listener, database or file is touched, so a second ``fleetward serve`` (or
anything else on a port) ends with one line and nothing half-starts.

The holder comes from ``/proc`` (proc(5)): ``/proc/net/tcp`` and ``tcp6`` list listening
sockets (state ``0A``) with their inode, and ``/proc/<pid>/fd/*`` links to
``socket:[<inode>]``. Root reads every process's ``fd`` folder; other users only their
own, so the holder may stay unknown: the port is then reported in use without a pid. A
socket that is bound but not listening holds a port without appearing in either table.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fleetward.config import ListenerConfig
from fleetward.errors import ConfigurationError

PROC = Path("/proc")
_TCP_LISTEN = "0A"  # include/net/tcp_states.h: TCP_LISTEN = 10
MAX_COMMAND_CHARS = 60  # a holder's command line is shortened to this in the message


class PortInUse(ConfigurationError):
    """A listener's port is held by another process (or socket)."""

    problem_type = "port-in-use"


@dataclass(frozen=True, slots=True)
class Port:
    """One listener's address, and the flag and setting that choose its port."""

    listener: str  # e.g. "admin HTTPS"
    host: str
    port: int
    flag: str  # e.g. "--admin-port"
    setting: str  # e.g. "admin_port" in [listeners]

    @property
    def where(self) -> str:
        return f"port {self.port} ({self.listener}) on {self.host or 'every address'}"


# Listener name in node.py → what the operator reads, and how to move it.
_LISTENERS = {
    "public": ("public HTTP", "public_port"),
    "admin": ("admin HTTPS", "admin_port"),
    "device": ("device HTTPS", "device_port"),
    "mqtt": ("MQTT over TLS", "mqtt_port"),
}


def port_of(listeners: ListenerConfig, name: str) -> Port:
    """The ``Port`` of listener ``name`` (public, admin, device or mqtt)."""
    label, setting = _LISTENERS[name]
    return Port(label, listeners.host, int(getattr(listeners, setting)),
                "--" + setting.replace("_", "-"), setting)


def ports_of(listeners: ListenerConfig) -> list[Port]:
    return [port_of(listeners, name) for name in _LISTENERS]


def check_free(ports: Iterable[Port]) -> None:
    """Bind and release every port; raise for the first that cannot be bound.

    Port 0 (any free port) is not checked.

    Raises:
        PortInUse: a port is held; the message names its holder where /proc shows it,
            and any other ports of the list that are held too.
        ConfigurationError: two listeners share a port, the host does not resolve or is
            not an address of this machine, or binding is not permitted.
    """
    ports = [p for p in ports if p.port != 0]
    seen: dict[int, Port] = {}
    for item in ports:
        if item.port in seen:
            raise ConfigurationError(
                f"port {item.port} is configured for both {seen[item.port].listener} and "
                f"{item.listener}",
                hint=f"give one of them another port ({seen[item.port].flag} or {item.flag}, "
                     f"or [listeners] in fleetward.toml)")
        seen[item.port] = item
    busy: list[tuple[Port, OSError]] = []
    for item in ports:
        failure = _try_bind(item)
        if failure is None:
            continue
        if failure.errno != errno.EADDRINUSE:
            raise bind_failed(item, failure)
        busy.append((item, failure))
    if busy:
        first = busy[0][0]
        error = bind_failed(first, busy[0][1])
        if len(busy) > 1:
            others = ", ".join(f"{p.port} ({p.listener})" for p, _ in busy[1:])
            error = PortInUse(f"{error.message}; also in use: {others}", hint=error.hint)
        raise error


def bind_failed(item: Port, exc: OSError) -> ConfigurationError:
    """The error for a listener that could not bind (before start-up or during it)."""
    if exc.errno == errno.EADDRINUSE:
        pids = holders(item.port)
        if pids:
            who = (f"pid {pids[0]}" if len(pids) == 1
                   else "pids " + ", ".join(str(p) for p in pids))
            command = describe_process(pids[0])
            message = f"{item.where} is in use by {who}" + (f" ({command})" if command else "")
            first = (f"stop pid {pids[0]} (another `fleetward serve` on this host?)"
                     if "fleetward" in command else f"stop pid {pids[0]}")
        else:
            message = f"{item.where} is in use"
            first = (f"find the holder with `ss -ltnp 'sport = :{item.port}'` (as root) "
                     "and stop it")
        return PortInUse(message, hint=f"{first}, or choose another port: fleetward serve "
                                       f"{item.flag} N (or [listeners] {item.setting} in "
                                       "fleetward.toml)")
    if exc.errno == errno.EACCES:
        return ConfigurationError(
            f"not permitted to listen on {item.where}",
            hint=f"ports below 1024 need root or CAP_NET_BIND_SERVICE; choose another with "
                 f"{item.flag} (or [listeners] {item.setting} in fleetward.toml)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ConfigurationError(
            f"cannot listen on {item.where}: {item.host} is not an address of this host",
            hint="pass --host with an address of this machine, or 0.0.0.0 for all "
                 "(or [listeners] host in fleetward.toml)")
    return ConfigurationError(f"cannot listen on {item.where}: {exc.strerror or exc}",
                              hint="check --host and the port ([listeners] in fleetward.toml)")


def _try_bind(item: Port) -> OSError | None:
    """Bind every address ``item.host`` resolves to, as asyncio would; then release them."""
    host = item.host or None  # asyncio: "" and None mean every interface
    try:
        infos = socket.getaddrinfo(host, item.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigurationError(
            f"cannot resolve the listener host {item.host!r}: {exc.strerror}",
            hint="pass --host with an address or name of this machine "
                 "(or [listeners] host in fleetward.toml)") from None
    opened: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(
                (i[0], i[1], i[2], i[3], i[4]) for i in infos):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:
                # e.g. IPv6 disabled in the kernel: asyncio's create_server skips such
                # an address family too (base_events.create_server, "socket.error").
                continue
            opened.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                return exc
        return None
    finally:
        for sock in opened:
            sock.close()


def holders(port: int, proc: Path = PROC) -> list[int]:
    """The pids holding a listening TCP socket on ``port`` (sorted; empty if unknown)."""
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _TCP_LISTEN or fields[9] == "0":
                continue
            try:
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
            except (IndexError, ValueError):
                continue
    if not inodes:
        return []
    links = {f"socket:[{inode}]" for inode in inodes}
    pids: list[int] = []
    try:
        entries = [e for e in os.scandir(proc) if e.name.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            fds = list(os.scandir(os.path.join(entry.path, "fd")))
        except OSError:  # another user's process (not root), or it just ended
            continue
        for fd in fds:
            try:
                if os.readlink(fd.path) in links:
                    pids.append(int(entry.name))
                    break
            except OSError:
                continue
    return sorted(pids)


def describe_process(pid: int, proc: Path = PROC) -> str:
    """A short, printable name for ``pid``: the program and its first word, e.g.
    ``fleetward serve`` (also for ``python -m fleetward.server serve``); "" if unknown."""
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return ""
    argv = [arg.decode("utf-8", "replace") for arg in raw.split(b"\0") if arg]
    if not argv:
        return ""
    program, rest = os.path.basename(argv[0]), argv[1:]
    if program.startswith("python") and rest:
        if rest[0] == "-m" and len(rest) > 1:
            program, rest = rest[1], rest[2:]
        elif not rest[0].startswith("-"):
            program, rest = os.path.basename(rest[0]), rest[1:]
    if program in ("fleetward.server", "fleetward.cli.main"):
        program = "fleetward"
    words = [program, *rest[:1]] if rest and not rest[0].startswith("-") else [program]
    text = " ".join(words)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= MAX_COMMAND_CHARS else text[:MAX_COMMAND_CHARS - 1] + "…"
