"""The README, run word for word as a new user would run it.

Every ```sh block after the README's "A short tour" heading is executed verbatim, in
order, in one bash session (``set -euo pipefail``: any failing command, also inside a
pipeline, fails the test and names its README line), in a fresh folder that looks like
a clone after ``make run``: ``.venv`` (the test's own virtual environment),
``docs/`` (the example files the tour reads) and ``fleetward-data`` (initialised and
served on free ports, as ``make run`` would). The only substitution is the value of
the listener variables the README itself defines (``PUBLIC_URL=…``, ``DEVICE_URL=…``,
``MQTT_PORT=…``), so the ports can be free ones. ``PATH`` is stripped of the virtual
environment, so the README's own ``. .venv/bin/activate`` is what makes ``fleetward``
available, as in a new shell.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import FLEETWARD, REPO, RunningServer, free_port, start_server, stop_server

README = REPO / "README.md"
TOUR_HEADING = "## A short tour"
LISTENER_VARIABLES = ("PUBLIC_URL", "DEVICE_URL", "MQTT_PORT")
TOUR_TIMEOUT_SECONDS = 300  # the whole tour; it takes ≈ 20-40 s on the 2-core CI machine
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")


@dataclass(frozen=True, slots=True)
class ShellBlock:
    line: int  # 1-based line of the block's first command in the README
    text: str


def shell_blocks(markdown: str, after_heading: str = TOUR_HEADING) -> list[ShellBlock]:
    """The ```sh blocks that follow ``after_heading`` (the two commands above it are what
    this test replaces by its own server, and ``make test`` is what runs this test)."""
    lines = markdown.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == after_heading)
    except StopIteration:
        raise AssertionError(f"the README has no {after_heading!r} heading") from None
    blocks: list[ShellBlock] = []
    index = start
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        body_start = index + 1
        index = body_start
        while index < len(lines) and not lines[index].startswith("```"):
            index += 1
        if index == len(lines):
            raise AssertionError(f"README line {body_start}: unclosed code block")
        if opening["lang"] == "sh":
            blocks.append(ShellBlock(body_start + 1, "\n".join(lines[body_start:index])))
        index += 1
    return blocks


def bind_listener_variables(blocks: list[ShellBlock],
                            values: dict[str, str]) -> list[ShellBlock]:
    """Give the README's own listener variables the test server's values.

    Raises:
        AssertionError: a variable is not defined exactly once at the start of a line.
    """
    bound = []
    counts = dict.fromkeys(values, 0)
    for block in blocks:
        text = block.text
        for name, value in values.items():
            text, n = re.subn(rf"^{name}=\S+", f"{name}={value}", text, flags=re.MULTILINE)
            counts[name] += n
        bound.append(ShellBlock(block.line, text))
    wrong = {name: n for name, n in counts.items() if n != 1}
    assert not wrong, f"the README must define each of these once: {wrong}"
    return bound


@dataclass(frozen=True, slots=True)
class TourScript:
    text: str
    readme_lines: dict[int, int]  # script line -> README line

    def explain(self, stderr: str) -> str:
        """``stderr`` with the failing command's README line named."""
        found = re.search(r"^tour line (\d+): (.*)$", stderr, flags=re.MULTILINE)
        if found is None:
            return stderr
        readme_line = self.readme_lines.get(int(found[1]), 0)
        return f"README line {readme_line}: {found[2]}\n{stderr}"


def tour_script(blocks: list[ShellBlock]) -> TourScript:
    """One bash script: strict mode, and a trap that names the line that failed."""
    header = ["set -Eeuo pipefail",
              "trap 'echo \"tour line $LINENO: command failed (exit $?): $BASH_COMMAND\" >&2' ERR"]
    lines, readme_lines = list(header), {}
    for block in blocks:
        for offset, line in enumerate(block.text.splitlines()):
            lines.append(line)
            readme_lines[len(lines)] = block.line + offset
    return TourScript("\n".join(lines) + "\n", readme_lines)


def new_shell_env(home: Path) -> dict[str, str]:
    """A new login shell's environment: no virtual environment, no Fleetward settings."""
    venv_bin = str(Path(sys.prefix) / "bin")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FLEETWARD_") and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep)
                                  if p and Path(p).resolve() != Path(venv_bin).resolve())
    env["HOME"] = str(home)
    return env


def run_tour(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TOUR_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL)


# --- the harness itself must be able to fail ---------------------------------------------

SAMPLE = """# Sample
```sh
make run
```
## A short tour
```sh
PUBLIC_URL=http://127.0.0.1:8080
echo one
```
Some text.
```text
not run
```
```sh
{second}
echo after
```
"""


def test_only_sh_blocks_after_the_tour_heading_are_run() -> None:
    blocks = shell_blocks(SAMPLE.format(second="echo two"))
    assert [b.text for b in blocks] == ["PUBLIC_URL=http://127.0.0.1:8080\necho one",
                                        "echo two\necho after"]
    assert blocks[0].line == 7


@pytest.mark.parametrize("broken", ["false", "false | cat", "(exit 3)", "nosuchcommand-x"])
def test_a_failing_readme_command_fails_the_tour_and_names_its_line(
        tmp_path: Path, broken: str) -> None:
    blocks = shell_blocks(SAMPLE.format(second=broken))
    script = tour_script(blocks)
    result = run_tour(script.text, tmp_path, new_shell_env(tmp_path))
    assert result.returncode != 0
    assert script.explain(result.stderr).startswith("README line 15: command failed"), \
        result.stderr
    assert "after" not in result.stdout


def test_listener_variables_must_each_be_defined_once() -> None:
    blocks = shell_blocks(SAMPLE.format(second="PUBLIC_URL=http://other:1"))
    with pytest.raises(AssertionError, match="PUBLIC_URL"):
        bind_listener_variables(blocks, {"PUBLIC_URL": "http://127.0.0.1:1"})
    bound = bind_listener_variables(shell_blocks(SAMPLE.format(second="echo")),
                                    {"PUBLIC_URL": "http://127.0.0.1:1"})
    assert bound[0].text.startswith("PUBLIC_URL=http://127.0.0.1:1\n")


def test_the_new_shell_has_no_fleetward_on_path(tmp_path: Path) -> None:
    result = run_tour("command -v fleetward || echo missing", tmp_path,
                      new_shell_env(tmp_path))
    assert result.stdout.strip() == "missing"


# --- the README's tour ---------------------------------------------------------------------


@pytest.fixture
def clone(tmp_path: Path) -> Iterator[tuple[Path, RunningServer]]:
    """A folder like the clone after ``make run``, with its server running."""
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").exists() or not (venv / "bin" / "fleetward").exists():
        pytest.fail(f"run the tests from the project's virtual environment (make test); "
                    f"{venv} has no bin/activate with fleetward")
    folder = tmp_path / "clone"
    folder.mkdir()
    (folder / ".venv").symlink_to(venv, target_is_directory=True)
    (folder / "docs").symlink_to(REPO / "docs", target_is_directory=True)
    server = start_server(folder / "fleetward-data")
    try:
        yield folder, server
    finally:
        stop_server(server)


def test_the_readme_tour_runs_word_for_word(clone: tuple[Path, RunningServer]) -> None:
    """Slow (≈ 30-50 s): the whole tour against a real server (EST, MQTT, HTTPS, the agent,
    tokens and SAS, a second ``fleetward init``); every step depends on the one before
    it."""
    folder, server = clone
    blocks = bind_listener_variables(shell_blocks(README.read_text(encoding="utf-8")), {
        "PUBLIC_URL": server.public_url,
        "DEVICE_URL": f"https://127.0.0.1:{server.device_port}",
        "MQTT_PORT": str(server.mqtt_port),
    })
    home = folder.parent / "home"
    home.mkdir()
    script = tour_script(blocks)
    result = run_tour(script.text, folder, new_shell_env(home))
    assert result.returncode == 0, (f"the README tour failed:\n--- stderr\n"
                                    f"{script.explain(result.stderr)}"
                                    f"\n--- stdout\n{result.stdout}")
    # What the tour did is in the server, not only in its exit code.
    with server.admin() as admin:
        messages = admin.get("/v1/devices/sensor-0002/messages").json()["items"]
        assert [m["payload"] for m in messages] == [{"celsius": 21.5}, {"celsius": 21.7}]
        agent_messages = admin.get("/v1/devices/sensor-0003/messages").json()["items"]
        assert len(agent_messages) == 3
        commands = admin.get("/v1/devices/sensor-0002/commands").json()["items"]
        assert [(c["name"], c["status"], c["result"]) for c in commands] == [
            ("ping", "succeeded", {"pong": 1})]
        assert admin.get("/v1/devices/sensor-0001").json()["state"] == "compromised"
        assert admin.get("/v1/devices/sensor-0002").json()["state"] == "active"
        # Devices without certificates: the token agent's readings over MQTT, the SAS
        # device's over MQTT (Azure's topic) and HTTPS, and sensor-0002's tokens revoked.
        token_messages = admin.get("/v1/devices/sensor-0004/messages").json()["items"]
        assert len(token_messages) == 3 and {m["channel"] for m in token_messages} == {"mqtt"}
        sas_messages = admin.get("/v1/devices/sensor-0005/messages").json()["items"]
        assert [(m["channel"], m["message_type"], m["payload"]) for m in sas_messages] == [
            ("mqtt", "message", {"celsius": 19.0}),
            ("https", "temperature", {"celsius": 19.5})]
        assert admin.get("/v1/devices/sensor-0004/credentials").json()["items"][0][
            "kind"] == "public_key"
    sans = subprocess.run(["openssl", "x509", "-in", str(folder / "prod-data/certs/server.pem"),
                           "-noout", "-ext", "subjectAltName"], capture_output=True, text=True,
                          check=True).stdout
    assert "DNS:mqtt.example.com" in sans and "DNS:iot.example.com" in sans


def test_make_run_serves_the_data_dir_and_says_how_to_reach_it(tmp_path: Path) -> None:
    """`make run` on an initialised data directory (free ports, so that it cannot collide
    with anything on this machine) starts the server and prints the line that tells a new
    shell how to get the CLI."""
    data_dir = tmp_path / "data"
    public_port, admin_port = free_port(), free_port()
    subprocess.run([*FLEETWARD, "init", "--data-dir", str(data_dir), "--public-port",
                    str(public_port), "--admin-port", str(admin_port), "--device-port",
                    str(free_port()), "--mqtt-port", str(free_port())],
                   check=True, capture_output=True, timeout=120)
    log_path = tmp_path / "make-run.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(["make", "--no-print-directory", "run",
                                    f"DATA_DIR={data_dir}"], cwd=REPO, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{public_port}/healthz",
                             timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(20)
    assert (f"in another shell, here: . .venv/bin/activate && export "
            f"FLEETWARD_DATA_DIR={data_dir}") in log_path.read_text()
