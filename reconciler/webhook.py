"""Git push webhooks and the HTTP listener of ``propctl serve``.

The verifiers and ``parse_push`` are pure: headers and body in, a verdict or a ``Push`` out. The
``HttpListener`` is the only IO here: it authenticates forge webhooks, hands pushes to a callback
(which decides whether and when a pass runs) and serves ``/healthz``, ``/readyz`` and
``/metrics``. A webhook carries no desired state; it only asks for a pass.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar, cast
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

PROVIDERS = ("github", "gitea", "gitlab", "generic")
SIGNATURE_HEADERS = {
    "github": "X-Hub-Signature-256",
    "gitea": "X-Gitea-Signature",
    "gitlab": "X-Gitlab-Token",
    "generic": "X-Signature-256",
}
EVENT_HEADERS = {
    "github": "X-GitHub-Event",
    "gitea": "X-Gitea-Event",
    "gitlab": "X-Gitlab-Event",
}
PUSH_EVENTS = {"github": "push", "gitea": "push", "gitlab": "Push Hook"}

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NO_SECRET = "no webhook secret configured; start serve with --webhook-secret-file"
LINGER_SECONDS = 2.0  # how long a rejected request's unread body is drained before closing


class BadRequest(ValueError):
    """The webhook body is not the JSON its provider sends."""


@dataclass(frozen=True)
class Push:
    """A push a forge told us about; ``ref`` None means any ref (the generic hook may omit it)."""

    provider: str
    ref: str | None
    commit: str | None

    def targets(self, branch: str) -> bool:
        """Whether this push may change ``branch`` (given as ``main`` or ``refs/heads/main``)."""
        if not self.ref:
            return True
        return self.ref in (branch, f"refs/heads/{branch}")


# -- verification (pure) -----------------------------------------------------------------------


def _raw(value: str) -> bytes:
    # http.server decodes header bytes as latin-1; encoding back recovers what was sent.
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace")


def _hmac_matches(secret: bytes, body: bytes, hexdigest: str) -> bool:
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
    return hmac.compare_digest(expected, _raw(hexdigest.strip().lower()))


def verify_github(secret: bytes, signature: str | None, body: bytes) -> bool:
    """``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>``."""
    if not secret or signature is None or not signature.startswith("sha256="):
        return False
    return _hmac_matches(secret, body, signature.removeprefix("sha256="))


def verify_gitea(secret: bytes, signature: str | None, body: bytes) -> bool:
    """``X-Gitea-Signature: <hex HMAC-SHA256 of the body>``; the ``sha256=`` form is accepted."""
    if not secret or signature is None:
        return False
    return _hmac_matches(secret, body, signature.removeprefix("sha256="))


def verify_gitlab(secret: bytes, token: str | None, body: bytes) -> bool:
    """``X-Gitlab-Token: <secret>``: GitLab sends the secret itself; the body is not signed."""
    del body
    if not secret or token is None:
        return False
    return hmac.compare_digest(secret, _raw(token))


def verify_generic(secret: bytes, signature: str | None, body: bytes) -> bool:
    """``X-Signature-256: sha256=<hex>`` (or bare hex), HMAC-SHA256 of the body."""
    if not secret or signature is None:
        return False
    return _hmac_matches(secret, body, signature.removeprefix("sha256="))


VERIFIERS: dict[str, Callable[[bytes, str | None, bytes], bool]] = {
    "github": verify_github,
    "gitea": verify_gitea,
    "gitlab": verify_gitlab,
    "generic": verify_generic,
}


def header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive lookup, as HTTP header names are."""
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def verify(provider: str, secret: bytes, headers: Mapping[str, str], body: bytes) -> bool:
    """Whether the request carries a valid signature (or token) for ``provider``."""
    if provider not in VERIFIERS:
        raise KeyError(f"unknown webhook provider {provider!r}")
    return VERIFIERS[provider](secret, header(headers, SIGNATURE_HEADERS[provider]), body)


# -- parsing (pure) ----------------------------------------------------------------------------


def event_of(provider: str, headers: Mapping[str, str]) -> str | None:
    """The forge's event name (``push``, ``ping``, ``Push Hook``...); None for generic."""
    name = EVENT_HEADERS.get(provider)
    return header(headers, name) if name else None


def _payload(headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    content_type = (header(headers, "Content-Type") or "").split(";")[0].strip().lower()
    try:
        if content_type == "application/x-www-form-urlencoded":
            # GitHub's form content type: the JSON is in the ``payload`` field.
            fields = parse_qs(body.decode("utf-8"), strict_parsing=False)
            if "payload" not in fields:
                raise BadRequest("form body without a 'payload' field")
            data = json.loads(fields["payload"][0])
        elif not body.strip():
            data = {}
        else:
            data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(f"malformed JSON: {err}") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


def _text(data: Mapping[str, Any], *keys: str) -> str | None:
    """The first of ``keys`` with a non-empty value, which must be a string."""
    for key in keys:
        value = data.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise BadRequest(f"{key!r} must be a string")
        return value
    return None


def parse_push(provider: str, headers: Mapping[str, str], body: bytes) -> Push | None:
    """The push this (already verified) request announces; None for other events (ping...).

    Raises ``BadRequest`` when a push's body is not a JSON object.
    """
    if provider == "generic":
        data = _payload(headers, body)
        return Push(provider, _text(data, "ref"), _text(data, "after", "commit"))
    if provider not in PUSH_EVENTS:
        raise KeyError(f"unknown webhook provider {provider!r}")
    if event_of(provider, headers) != PUSH_EVENTS[provider]:
        return None
    data = _payload(headers, body)
    if provider == "gitlab":
        # checkout_sha is null when the branch was deleted; after is then all zeros.
        return Push(provider, _text(data, "ref"), _text(data, "checkout_sha", "after"))
    return Push(provider, _text(data, "ref"), _text(data, "after"))


# -- the HTTP listener -------------------------------------------------------------------------

OnPush = Callable[[Push], tuple[bool, str]]
OnWebhook = Callable[[str, str], None]
"""Called with (provider, result), result one of accepted, ignored, unauthorized, bad_request."""


class _CallbackFailed(Exception):
    """A listener callback raised; the cause is chained."""


def _call(fn: Callable[..., _T], *args: Any) -> _T:
    try:
        return fn(*args)
    except Exception as err:
        raise _CallbackFailed(getattr(fn, "__name__", repr(fn))) from err


class _Rejected(Exception):
    def __init__(self, status: HTTPStatus, error: str, *, allow: str | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.allow = allow


class HttpListener:
    """Webhooks, health, readiness and metrics on one HTTP port, served from daemon threads.

    Callbacks run on the request's thread; an exception in one becomes a 500 and is logged.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        secret: bytes | None,
        on_push: OnPush,
        health: Callable[[], bool],
        ready: Callable[[], bool],
        metrics: Callable[[], str],
        max_body: int = 1 << 20,
        request_timeout: float = 10.0,
        on_webhook: OnWebhook | None = None,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.secret = secret or None  # an empty secret would let anyone sign
        self.on_push = on_push
        self.health = health
        self.ready = ready
        self.metrics = metrics
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.on_webhook = on_webhook
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the listener is already started")
        server_class = _Server6 if ":" in self.host else _Server
        self._server = server_class((self.host, self.requested_port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"http-listener-{self.port}",
            daemon=True,
        )
        self._thread.start()
        logger.info("listening on %s", self.url)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the listener is not started")
        return int(self._server.socket.getsockname()[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()
        self._server = self._thread = None

    def __enter__(self) -> HttpListener:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def record(self, provider: str, result: str) -> None:
        if self.on_webhook is None:
            return
        try:
            self.on_webhook(provider, result)
        except Exception:
            logger.exception("the webhook metrics callback failed")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 resets connections when a burst of pushes arrives.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], listener: HttpListener) -> None:
        self.listener = listener
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the host's FQDN, a DNS lookup we do not need.
        socketserver.TCPServer.server_bind(self)
        self.server_name = self.listener.host
        self.server_port = int(self.socket.getsockname()[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.exception("unhandled error serving %s", client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "propeller"
    sys_version = ""
    _responded = False

    @property
    def listener(self) -> HttpListener:
        return cast(_Server, self.server).listener

    def setup(self) -> None:
        # A per-read timeout while reading the request line and headers; the body gets a
        # deadline for the whole of it (see _read_body).
        super().setup()
        self.connection.settimeout(self.listener.request_timeout)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    # -- routing ---------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._responded = False
        self._guard(self._get)

    def do_POST(self) -> None:
        self._responded = False
        self._guard(self._post)

    def handle_expect_100(self) -> bool:
        # Refuse before the client sends a body we would not read.
        if self.command == "POST":
            try:
                self._precheck_post()
            except _Rejected as rejected:
                self._reject(rejected)
                return False
        return super().handle_expect_100()

    def _path(self) -> str:
        return urlsplit(self.path).path

    def _provider(self) -> str | None:
        path = self._path()
        if path.startswith("/webhook/"):
            provider = path.removeprefix("/webhook/")
            return provider if provider in PROVIDERS else None
        return None

    def _get(self) -> None:
        path = self._path()
        listener = self.listener
        if path == "/healthz":
            ok = _call(listener.health)
            self._text(200 if ok else 503, "ok" if ok else "unhealthy")
        elif path == "/readyz":
            ok = _call(listener.ready)
            self._text(200 if ok else 503, "ok" if ok else "not ready")
        elif path == "/metrics":
            body = _call(listener.metrics).encode()
            self._send(HTTPStatus.OK, body, METRICS_CONTENT_TYPE)
        elif self._provider() is not None:
            self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use POST"}, allow="POST")
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def _precheck_post(self) -> tuple[str, int, bytes]:
        """Provider, body length and secret, or ``_Rejected`` before any of the body is read."""
        provider = self._provider()
        if provider is None:
            if self._path() in ("/healthz", "/readyz", "/metrics"):
                raise _Rejected(HTTPStatus.METHOD_NOT_ALLOWED, "use GET", allow="GET")
            raise _Rejected(HTTPStatus.NOT_FOUND, "not found")
        secret = self.listener.secret
        if secret is None:
            self.listener.record(provider, "unauthorized")
            raise _Rejected(HTTPStatus.FORBIDDEN, NO_SECRET)
        declared = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") is not None or declared is None:
            self.listener.record(provider, "bad_request")
            raise _Rejected(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        try:
            length = int(declared)
            if length < 0:
                raise ValueError(declared)
        except ValueError:
            self.listener.record(provider, "bad_request")
            raise _Rejected(HTTPStatus.BAD_REQUEST, "invalid Content-Length") from None
        if length > self.listener.max_body:
            self.listener.record(provider, "bad_request")
            raise _Rejected(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body larger than {self.listener.max_body} bytes",
            )
        return provider, length, secret

    def _post(self) -> None:
        listener = self.listener
        try:
            provider, length, secret = self._precheck_post()
        except _Rejected as rejected:
            self._reject(rejected)
            return
        body = self._read_body(length)
        if body is None:
            return
        headers = dict(self.headers.items())
        if not verify(provider, secret, headers, body):
            logger.warning(
                "webhook %s from %s: invalid signature", provider, self.client_address[0]
            )
            listener.record(provider, "unauthorized")
            self._json(HTTPStatus.UNAUTHORIZED, {"error": "invalid signature"})
            return
        try:
            push = parse_push(provider, headers, body)
        except BadRequest as err:
            listener.record(provider, "bad_request")
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
            return
        if push is None:
            event = event_of(provider, headers)
            listener.record(provider, "ignored")
            reason = f"{provider} event {event!r} is not a push; nothing to do"
            self._json(HTTPStatus.OK, {"accepted": False, "reason": reason})
            return
        accepted, message = _call(listener.on_push, push)
        logger.info(
            "webhook %s push to %s (%s): %s",
            provider,
            push.ref or "any ref",
            push.commit or "?",
            message,
        )
        listener.record(provider, "accepted" if accepted else "ignored")
        self._json(HTTPStatus.ACCEPTED, {"accepted": bool(accepted), "reason": message})

    def _read_body(self, length: int) -> bytes | None:
        """Exactly ``length`` bytes within one deadline, so a slow drip cannot hold a thread."""
        deadline = time.monotonic() + self.listener.request_timeout
        chunks: list[bytes] = []
        remaining = length
        try:
            while remaining > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("request body deadline")
                self.connection.settimeout(left)
                chunk = self.rfile.read1(min(remaining, 1 << 16))
                if not chunk:
                    self.close_connection = True  # the client gave up mid-body
                    return None
                chunks.append(chunk)
                remaining -= len(chunk)
        except TimeoutError:
            self._json(HTTPStatus.REQUEST_TIMEOUT, {"error": "request body too slow"}, close=True)
            return None
        self.connection.settimeout(self.listener.request_timeout)
        return b"".join(chunks)

    # -- responses -------------------------------------------------------------------------

    def _guard(self, handler: Callable[[], None]) -> None:
        try:
            handler()
        except _CallbackFailed as err:
            logger.error(
                "%s %s: callback %s failed", self.command, self.path, err, exc_info=err.__cause__
            )
            self._fail()
        except OSError as err:  # the client went away, a write timed out...
            logger.debug("connection error serving %s: %s", self.client_address, err)
            self.close_connection = True
        except Exception:
            logger.exception("error handling %s %s", self.command, self.path)
            self._fail()

    def _fail(self) -> None:
        if self._responded:  # too late for a status: cut the response short
            self.close_connection = True
            return
        try:
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})
        except OSError:
            self.close_connection = True

    def _reject(self, rejected: _Rejected) -> None:
        """Answer without reading the body, then close: drain it briefly so the client can
        read our answer instead of a connection reset."""
        self._json(rejected.status, {"error": rejected.error}, allow=rejected.allow, close=True)
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_SECONDS
            while (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                if not self.rfile.read1(1 << 16):
                    break
        except OSError:
            pass

    def _json(
        self,
        status: int,
        payload: Mapping[str, object],
        *,
        allow: str | None = None,
        close: bool = False,
    ) -> None:
        body = json.dumps(payload).encode()
        self._send(status, body, "application/json", allow=allow, close=close)

    def _text(self, status: int, text: str) -> None:
        self._send(status, text.encode(), "text/plain; charset=utf-8")

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        *,
        allow: str | None = None,
        close: bool = False,
    ) -> None:
        self._responded = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if allow is not None:
            self.send_header("Allow", allow)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)
