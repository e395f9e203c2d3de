"""web/request_errors.py: what the parser, the event loop and other libraries report
about a malformed request reaches the log as JSON, without the request's bytes.

The end-to-end check against a real server is
``tests/integration/test_malformed_requests.py``; these pin the pieces, including the
parser messages of aiohttp's pure-Python parser (``AIOHTTP_NO_EXTENSIONS``), which the
integration test does not run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from aiohttp import http_exceptions as hx
from aiohttp import web

from fleetward.web.request_errors import exception_fields, malformed_reason

SECRET = "fwa_0123456789abcdef.SeCrEtSeCrEtSeCrEtSeCrEt"
RAW = f"Authorization: Bearer {SECRET}\x00".encode()


@pytest.mark.parametrize("exc,reason", [
    # llhttp (the C parser): "<constant reason>:\n\n  <repr of the raw line>\n  <caret>"
    (hx.BadHttpMessage(f"Invalid header value char:\n\n  {RAW!r}\n      ^"),
     "Invalid header value char"),
    (hx.BadStatusLine(error=f"Bad status line:\n  Expected HTTP/:\n\n  {RAW!r}\n  ^"),
     "Expected HTTP/"),
    (hx.BadHttpMethod(error=f"Invalid method encountered:\n\n  {RAW!r}\n  ^"),
     "Invalid method encountered"),
    # The pure-Python parser quotes the raw bytes without a constant prefix.
    (hx.InvalidHeader(RAW), "invalid header"),
    (hx.BadStatusLine(f"GET /?token={SECRET} HTTP/9"), "invalid request line"),
    (hx.BadHttpMethod(f"G@T{SECRET}"), "invalid method (not HTTP?)"),
    (hx.InvalidURLError(f"/{SECRET}"), "invalid request target"),
    (hx.InvalidURLError(SECRET.replace("_", "").replace(".", "")), "invalid request target"),
    (hx.LineTooLong(RAW[:100] + b"...", 8190), "request line or header field too long "
     "(limit 8190 bytes)"),
    (hx.TransferEncodingError(f"zz{SECRET}"), "invalid transfer encoding"),
    (hx.BadHttpMessage(f"Duplicate '{SECRET}' header found."), "malformed request"),
    (hx.BadHttpMessage("Too many headers received"), "Too many headers received"),
    (hx.BadHttpMethod(error="Received HTTPS traffic on an HTTP port"),
     "Received HTTPS traffic on an HTTP port"),
])
def test_reason_names_the_rule_never_the_bytes(exc: Exception, reason: str) -> None:
    assert malformed_reason(exc) == reason
    assert "Secr" not in malformed_reason(exc)


def test_a_body_error_gets_the_reason_of_its_cause() -> None:
    wrapped = web.RequestPayloadError(f"Can not decode: {SECRET}")
    wrapped.__cause__ = hx.ContentEncodingError(f"Can not decode content-encoding: {SECRET}")
    assert malformed_reason(wrapped) == "invalid content encoding"
    assert malformed_reason(web.RequestPayloadError(SECRET)) == "invalid request body"


def test_exception_fields_keep_the_frames_not_the_message() -> None:
    try:
        raise ValueError(SECRET)
    except ValueError as exc:
        fields = exception_fields(exc)
    assert fields["error"] == "ValueError"
    assert "test_exception_fields_keep_the_frames_not_the_message" in fields["stack"][-1]
    assert SECRET not in json.dumps(fields)


# One process with the server's logging configuration, fed every path that used to
# print raw bytes: aiohttp's request handler logger, asyncio's exception handler (whose
# default prints a callback's arguments), foreign loggers and warnings.
SCRIPT = textwrap.dedent(f"""
    import asyncio, logging, warnings
    from aiohttp import http_exceptions as hx
    from fleetward.node import configure_logging
    from fleetward.web.request_errors import loop_exception_handler, request_error_logger

    SECRET = {SECRET!r}
    configure_logging("info")
    raw = ("Authorization: Bearer " + SECRET + "\\x00").encode()
    bad = hx.BadHttpMessage("Invalid header value char:\\n\\n  " + repr(raw) + "\\n  ^")
    logger = request_error_logger("admin")
    logger.exception("Error handling request from %s", "192.0.2.7", exc_info=bad)
    logger.debug("Error handling request from %s", "192.0.2.7",
                 exc_info=hx.BadHttpMethod("G@T " + SECRET))
    try:
        raise KeyError(SECRET)
    except KeyError as exc:
        logger.exception("Error handling request from %s", "not an address", exc_info=exc)
    logger.exception(f"Web-handler should return a response instance, got {{SECRET!r}}")

    def data_received(data):
        raise ValueError(data)
    loop = asyncio.new_event_loop()
    handle = loop.call_soon(data_received, raw)
    try:
        data_received(raw)
    except ValueError as exc:
        loop_exception_handler(loop, {{"message": f"Exception in callback {{handle!r}}",
                                      "exception": exc, "handle": handle}})
    loop_exception_handler(loop, {{"message": "Fatal error on transport", "exception":
                                  ConnectionResetError(104, SECRET)}})
    loop.close()
    logging.getLogger("aiohttp.server").error("Error handling request from %s", SECRET,
                                              exc_info=bad)
    logging.getLogger("asyncio").error("Exception in callback %r", SECRET)
    logging.getLogger("alembic.runtime").warning("Running upgrade %s", "abc")
    warnings.warn("a warning", UserWarning, stacklevel=1)
""")


def test_every_path_logs_one_json_line_without_the_secret() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=60, check=True)
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert SECRET not in done.stderr and "SeCrEt" not in done.stderr
    events = [(line.get("listener"), line["event"]) for line in lines]
    assert events[:9] == [
        ("admin", "malformed http request"), ("admin", "malformed http request"),
        ("admin", "http request failed"), ("admin", "http server event"),
        (None, "event loop error"), (None, "event loop error"),
        (None, "Error handling request from"), (None, "Exception in callback"),
        (None, "Running upgrade abc")], events
    assert len(lines) == 10 and "UserWarning: a warning" in lines[9]["event"]
    assert lines[9]["logger"] == "py.warnings"
    malformed, non_http, failed, handler_event, callback, fatal = lines[:6]
    assert handler_event["detail"] == "Web-handler should return a response instance, got"
    assert malformed == {**malformed, "peer": "192.0.2.7", "level": "warning",
                         "error": "BadHttpMessage", "reason": "Invalid header value char"}
    assert non_http["level"] == "info"  # aiohttp's debug: scanners, TLS on a plain port
    assert failed["peer"] == "unknown" and failed["error"] == "KeyError"
    assert callback["reason"] == "Exception in callback" and callback["error"] == "ValueError"
    assert fatal == {**fatal, "error": "ConnectionResetError", "errno": 104}
    assert lines[6]["logger"] == "aiohttp.server" and lines[6]["error"] == "BadHttpMessage"
