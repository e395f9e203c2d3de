"""Malformed requests and server-side errors as one structured log line, never raw bytes.

aiohttp reports a request its parser refuses (a NUL byte or a bare CR in a header, a
request line or header over ``max_line_size``/``max_field_size``, a header line without
a colon, obsolete line folding, an invalid method or Content-Length, bad chunked
encoding, bytes that are not HTTP at all) through ``RequestHandler.handle_error``, which
logs ``logger.exception("Error handling request from %s", remote, exc_info=exc)``. The
parser's message quotes the offending bytes (llhttp: ``"<reason>:\\n\\n  b'<raw line>'"``;
``LineTooLong``: the first 100 bytes of the line), so aiohttp's default
``aiohttp.server`` logger wrote a plain-text traceback holding an ``Authorization:
Bearer fwa_…`` value into the server log, and broke the JSON log with it.

The hook is the ``logger=`` option aiohttp passes to every ``RequestHandler`` of a
runner (``web.AppRunner(app, logger=…)``): ``handle_error`` and ``log_exception`` log
only through it, and a ``RequestHandler`` cannot be replaced (``web.Server``
instantiates the class by name). :func:`request_error_logger` gives each HTTP listener
a logger whose one handler turns what aiohttp reports into one structlog line with the
listener name, the peer address, the exception class and a reason that is either a
constant of the parser (llhttp's error reasons are C string constants) or one of ours
— never the bytes the client sent, nor any header value.

The event loop has the same problem one level down: asyncio's default exception
handler logs ``repr()`` of the handle, protocol and transport, and a handle's repr
includes its callback's arguments (``data_received(b'…raw request…')``).
:func:`loop_exception_handler` logs the context's fixed message prefix, the exception
class and its stack frames instead. :func:`scrub_foreign_record` does the same for
records that other ``aiohttp.*``/``asyncio`` loggers send through the standard
``logging`` module (``node.configure_logging`` renders those as JSON too).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import traceback
from collections.abc import MutableMapping
from typing import Any

import structlog
from aiohttp import http_exceptions as hx
from aiohttp import web

log = structlog.get_logger("fleetward.http")
loop_log = structlog.get_logger("fleetward.loop")

__all__ = ["RequestErrorHandler", "exception_fields", "loop_exception_handler",
           "malformed_reason", "request_error_logger", "scrub_foreign_record"]

MAX_REASON_CHARS = 80  # a reason is a short constant phrase; anything longer is not ours
MAX_STACK_FRAMES = 20  # innermost frames of a server-side error kept in the log line
# llhttp's message is "<constant reason>:\n\n  <repr of the raw bytes>\n  <caret>"
# (aiohttp/_http_parser.pyx parser_error_from_errno); BadStatusLine prefixes it with
# "Bad status line:\n  ". Only the constant part before the quoted bytes is kept, and
# only if it looks like a phrase of at most MAX_REASON_CHARS.
_LLHTTP_MESSAGE = re.compile(
    r"(?:Bad status line:\n  )?([A-Za-z][A-Za-z0-9 ,'`/_-]{0,79}):\n\n  (?:b|bytearray\()['\"]")
# Messages aiohttp raises without any client bytes in them (http_parser.py,
# _http_parser.pyx): logged verbatim. Anything else gets the reason of its class.
_CONSTANT_MESSAGES = frozenset({
    "Received HTTPS traffic on an HTTP port", "Too many headers received",
    "Too many trailers received", "Missing 'Host' header in request.",
    "Data after `Connection: close`", "Bad line ending, expected CRLF",
    "Request has invalid `Transfer-Encoding`",
    "Transfer-Encoding can't be present with Content-Length",
    "Not enough data to satisfy transfer length header."})
# Most specific first: the reason of the first class the exception is an instance of.
_CLASS_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (hx.LineTooLong, "request line or header field too long"),
    (hx.BadHttpMethod, "invalid method (not HTTP?)"),
    (hx.BadStatusLine, "invalid request line"),
    (hx.InvalidURLError, "invalid request target"),
    (hx.InvalidHeader, "invalid header"),
    (hx.ContentLengthError, "body shorter than its Content-Length"),
    (hx.TransferEncodingError, "invalid transfer encoding"),
    (hx.ContentEncodingError, "invalid content encoding"),
    (hx.PayloadEncodingError, "invalid payload encoding"),
    (hx.BadHttpMessage, "malformed request"),
    (hx.HttpProcessingError, "HTTP processing error"),
)
# Loggers whose records may carry raw protocol bytes in their arguments or exceptions.
_RAW_BYTES_LOGGERS = ("aiohttp", "asyncio", "uvloop")


def malformed_reason(exc: BaseException) -> str:
    """A short, secret-free reason for an error of aiohttp's HTTP parser.

    Never the message itself unless it is a known constant: parser messages quote the
    offending request line or header, ``Authorization`` values included.
    """
    if isinstance(exc, web.RequestPayloadError):
        # A body error: aiohttp wraps the parser's exception (``__cause__``) in this one.
        cause = exc.__cause__
        return malformed_reason(cause) if isinstance(cause, hx.HttpProcessingError) else (
            "invalid request body")
    message = exc.message if isinstance(exc, hx.HttpProcessingError) else ""
    if message in _CONSTANT_MESSAGES:
        return message
    match = _LLHTTP_MESSAGE.match(message)
    if match:
        return match.group(1)
    for cls, reason in _CLASS_REASONS:
        if isinstance(exc, cls):
            # LineTooLong(line, limit, actual_size): only the limit is ours to log.
            limit = exc.args[1] if isinstance(exc, hx.LineTooLong) and len(exc.args) > 1 else None
            return f"{reason} (limit {limit} bytes)" if isinstance(limit, int) else reason
    return "error"


def exception_fields(exc: BaseException | None) -> dict[str, Any]:
    """``error`` (the class), ``errno`` for OS errors, and ``stack`` (file, line and
    function of the innermost frames): where it failed, without ``str(exc)``, which may
    quote the request's bytes."""
    if exc is None:
        return {}
    fields: dict[str, Any] = {"error": type(exc).__name__}
    if isinstance(exc, OSError) and exc.errno is not None:
        fields["errno"] = exc.errno
    frames = traceback.extract_tb(exc.__traceback__)[-MAX_STACK_FRAMES:]
    if frames:
        fields["stack"] = [f"{frame.filename}:{frame.lineno} in {frame.name}"
                           for frame in frames]
    return fields


def _peer(record: logging.LogRecord) -> str:
    """aiohttp passes ``request.remote`` (the peer's IP) as the one argument; anything
    that is not an IP address is not logged."""
    args = record.args if isinstance(record.args, tuple) else ()
    if len(args) == 1 and isinstance(args[0], str):
        try:
            return str(ipaddress.ip_address(args[0]))
        except ValueError:
            pass
    return "unknown"


def _template(text: object) -> str:
    """A log message template or context message, cut before the first quoted,
    bracketed or interpolated part (reprs of objects and bytes live there)."""
    head = re.split(r"[(<'\"{:\[%=]", str(text), maxsplit=1)[0].strip()
    return head[:MAX_REASON_CHARS] or "unnamed"


class RequestErrorHandler(logging.Handler):
    """Receives what one listener's aiohttp ``RequestHandler`` logs; writes one
    structured line per record. Never raises (a failing handler would print a
    ``--- Logging error ---`` traceback of its own to stderr)."""

    def __init__(self, listener: str) -> None:
        super().__init__(logging.DEBUG)
        self.listener = listener

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._emit(record)
        except Exception:
            log.error("http error report failed", listener=self.listener)

    def _emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, hx.HttpProcessingError | web.RequestPayloadError):
            # aiohttp logs non-HTTP bytes at the start of a connection at debug level
            # (scanners, TLS on a plain port): routine noise, still one line. A body
            # error is reported when aiohttp drains the body after the response
            # ("Unhandled exception", no peer given).
            emit = log.info if record.levelno < logging.WARNING else log.warning
            emit("malformed http request", listener=self.listener, peer=_peer(record),
                 status=400, error=type(exc).__name__, reason=malformed_reason(exc))
        elif exc is not None:
            # An exception that escaped problem_middleware (its own 500 path logs
            # earlier): aiohttp answers 500. Class and frames, not the message.
            log.error("http request failed", listener=self.listener, peer=_peer(record),
                      **exception_fields(exc))
        elif record.levelno >= logging.INFO:
            log.log(record.levelno, "http server event", listener=self.listener,
                    detail=_template(record.msg))


def request_error_logger(listener: str) -> logging.Logger:
    """The ``logger=`` for ``web.AppRunner`` of the HTTP listener ``listener``.

    Not registered with ``logging`` (nothing else can attach a handler that would
    print raw records) and not propagating to the root logger.
    """
    logger = logging.Logger(f"fleetward.http.{listener}", logging.DEBUG)
    logger.propagate = False
    logger.addHandler(RequestErrorHandler(listener))
    return logger


def loop_exception_handler(loop: asyncio.AbstractEventLoop,
                           context: dict[str, Any]) -> None:
    """For ``loop.set_exception_handler``: "Fatal error on transport", "Exception in
    callback …", SSL errors, "Task exception was never retrieved" as one line, without
    the reprs of handles, protocols and transports the default handler prints."""
    try:
        exc = context.get("exception")
        loop_log.error("event loop error", reason=_template(context.get("message", "")),
                       **exception_fields(exc if isinstance(exc, BaseException) else None))
    except Exception:
        loop_log.error("event loop error")


def scrub_foreign_record(logger: Any, method_name: str,
                         event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor for records from the standard ``logging`` module (a
    ``ProcessorFormatter`` ``foreign_pre_chain`` step): names the logger, and for
    aiohttp and asyncio keeps the message template but not its arguments, and the
    exception's class and frames but not its message."""
    record = event_dict.get("_record")
    if not isinstance(record, logging.LogRecord):
        return event_dict
    event_dict["logger"] = record.name
    if record.name.split(".", 1)[0] in _RAW_BYTES_LOGGERS:
        event_dict["event"] = _template(record.msg)
        event_dict.pop("positional_args", None)
        exc_info = event_dict.pop("exc_info", None)
        if isinstance(exc_info, tuple) and len(exc_info) == 3:
            event_dict.update(exception_fields(exc_info[1]))
        event_dict.pop("stack_info", None)
    return event_dict
