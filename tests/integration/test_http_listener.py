"""The HTTP listener of ``propctl serve`` over real sockets on 127.0.0.1."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from reconciler.webhook import HttpListener, Push

pytestmark = pytest.mark.integration

SECRET = b"webhook-secret"
PUSH_BODY = json.dumps({"ref": "refs/heads/main", "after": "c0ffee", "before": "0" * 40}).encode()


def sign(body: bytes, secret: bytes = SECRET) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def signed_headers(provider: str, body: bytes, secret: bytes = SECRET) -> dict[str, str]:
    """What each forge sends with a push."""
    return {
        "github": {"X-GitHub-Event": "push", "X-Hub-Signature-256": f"sha256={sign(body, secret)}"},
        "gitea": {"X-Gitea-Event": "push", "X-Gitea-Signature": sign(body, secret)},
        "gitlab": {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": secret.decode()},
        "generic": {"X-Signature-256": f"sha256={sign(body, secret)}"},
    }[provider] | {"Content-Type": "application/json"}


@dataclass
class Recorder:
    """The callbacks a listener is given, with switches a test flips."""

    pushes: list[Push] = field(default_factory=list)
    webhooks: list[tuple[str, str]] = field(default_factory=list)
    healthy: bool = True
    is_ready: bool = False
    fail: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_push(self, push: Push) -> tuple[bool, str]:
        if self.fail:
            raise RuntimeError("boom")
        with self.lock:
            self.pushes.append(push)
        return push.targets("main"), "pass queued" if push.targets("main") else "other ref"

    def on_webhook(self, provider: str, result: str) -> None:
        with self.lock:
            self.webhooks.append((provider, result))

    def health(self) -> bool:
        return self.healthy

    def ready(self) -> bool:
        return self.is_ready

    def metrics(self) -> str:
        if self.fail:
            raise RuntimeError("boom")
        return "# HELP x X.\n# TYPE x counter\nx 1\n"


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        assert self.headers["Content-Type"] == "application/json"
        return json.loads(self.body)


Start = Callable[..., tuple[HttpListener, Recorder]]


@pytest.fixture
def start() -> Iterator[Start]:
    listeners: list[HttpListener] = []

    def _start(**kwargs: Any) -> tuple[HttpListener, Recorder]:
        recorder = Recorder()
        options: dict[str, Any] = {"secret": SECRET, **kwargs}
        listener = HttpListener(
            "127.0.0.1",
            0,
            on_push=recorder.on_push,
            on_webhook=recorder.on_webhook,
            health=recorder.health,
            ready=recorder.ready,
            metrics=recorder.metrics,
            **options,
        )
        listener.start()
        listeners.append(listener)
        return listener, recorder

    yield _start
    for listener in listeners:
        listener.stop()


def request(
    listener: HttpListener,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> Reply:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", listener.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        if own:
            conn.close()


def post(listener: HttpListener, provider: str, body: bytes, headers: dict[str, str]) -> Reply:
    return request(listener, "POST", f"/webhook/{provider}", body, headers)


PROVIDERS = ["github", "gitea", "gitlab", "generic"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_signed_push_is_accepted(start: Start, provider: str) -> None:
    listener, rec = start()
    reply = post(listener, provider, PUSH_BODY, signed_headers(provider, PUSH_BODY))
    assert reply.status == 202
    assert reply.json() == {"accepted": True, "reason": "pass queued"}
    assert rec.pushes == [Push(provider, "refs/heads/main", "c0ffee")]
    assert rec.webhooks == [(provider, "accepted")]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_push_to_another_ref_is_acknowledged_and_ignored(start: Start, provider: str) -> None:
    listener, rec = start()
    body = json.dumps({"ref": "refs/heads/feature", "after": "beef"}).encode()
    reply = post(listener, provider, body, signed_headers(provider, body))
    assert reply.status == 202
    assert reply.json() == {"accepted": False, "reason": "other ref"}
    assert rec.webhooks == [(provider, "ignored")]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_bad_signature_is_refused_and_runs_nothing(start: Start, provider: str) -> None:
    listener, rec = start()
    forged = signed_headers(provider, PUSH_BODY, secret=b"guessed")
    unsigned = {"X-GitHub-Event": "push", "X-Gitea-Event": "push", "X-Gitlab-Event": "Push Hook"}
    tampered = signed_headers(provider, PUSH_BODY)
    for headers, body in ((forged, PUSH_BODY), (unsigned, PUSH_BODY)):
        reply = post(listener, provider, body, headers)
        assert reply.status == 401
        assert reply.json() == {"error": "invalid signature"}
    if provider != "gitlab":  # GitLab's token does not cover the body
        reply = post(listener, provider, PUSH_BODY.replace(b"main", b"evil"), tampered)
        assert reply.status == 401
    assert rec.pushes == []
    assert {result for _, result in rec.webhooks} == {"unauthorized"}


def test_without_a_secret_webhooks_are_forbidden(start: Start) -> None:
    listener, rec = start(secret=None)
    reply = post(listener, "github", PUSH_BODY, signed_headers("github", PUSH_BODY))
    assert reply.status == 403
    assert reply.json() == {
        "error": "no webhook secret configured; start serve with --webhook-secret-file"
    }
    listener2, rec2 = start(secret=b"")
    assert post(listener2, "generic", b"{}", signed_headers("generic", b"{}", b"")).status == 403
    assert rec.pushes == rec2.pushes == []


def test_a_ping_is_acknowledged_without_a_pass(start: Start) -> None:
    listener, rec = start()
    body = b'{"zen": "Keep it logically awesome.", "hook_id": 1}'
    headers = signed_headers("github", body) | {"X-GitHub-Event": "ping"}
    reply = post(listener, "github", body, headers)
    assert reply.status == 200
    assert reply.json()["accepted"] is False
    assert "ping" in reply.json()["reason"]
    assert rec.pushes == []
    assert rec.webhooks == [("github", "ignored")]


def test_malformed_json_is_a_bad_request(start: Start) -> None:
    listener, rec = start()
    body = b'{"ref": "refs/heads/main",'
    reply = post(listener, "generic", body, signed_headers("generic", body))
    assert reply.status == 400
    assert "malformed JSON" in reply.json()["error"]
    assert rec.pushes == []
    assert rec.webhooks == [("generic", "bad_request")]


def test_an_oversized_body_is_refused_unread(start: Start) -> None:
    listener, rec = start(max_body=1024)
    body = json.dumps({"ref": "refs/heads/main", "pad": "x" * 4096}).encode()
    reply = post(listener, "generic", body, signed_headers("generic", body))
    assert reply.status == 413
    assert reply.headers["Connection"] == "close"
    assert rec.pushes == []

    # A client announcing a huge body is answered before it sends any of it.
    conn = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=5)
    conn.putrequest("POST", "/webhook/github")
    conn.putheader("Content-Length", str(10**9))
    conn.endheaders()
    started = time.monotonic()
    response = conn.getresponse()
    assert response.status == 413
    assert time.monotonic() - started < 1.0
    conn.close()
    assert rec.pushes == []
    assert rec.webhooks == [("generic", "bad_request"), ("github", "bad_request")]


def test_expect_100_continue_is_refused_before_the_body(start: Start) -> None:
    listener, _ = start(max_body=1024)
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as sock:
        sock.sendall(
            b"POST /webhook/generic HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
        )
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 413 ")


def test_a_body_without_a_length_is_refused(start: Start) -> None:
    listener, rec = start()
    conn = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=5)
    conn.putrequest("POST", "/webhook/generic")
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 411
    conn.close()
    assert rec.pushes == []


def test_a_slow_body_times_out(start: Start) -> None:
    listener, rec = start(request_timeout=0.5)
    body = b'{"ref": "refs/heads/main"}'
    headers = signed_headers("generic", body)
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(
            f"POST /webhook/generic HTTP/1.1\r\nHost: x\r\n{head}"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        started = time.monotonic()
        # drip the body a byte at a time, each well within the per-read timeout
        reply = b""
        for byte in body[:-1]:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sock.settimeout(0.1)
            try:
                reply = sock.recv(4096)
            except TimeoutError:
                continue
            break
        sock.settimeout(5)
        reply = reply or sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < 2.5
    assert rec.pushes == []


def test_wrong_methods_and_paths(start: Start) -> None:
    listener, rec = start()
    reply = request(listener, "GET", "/webhook/github")
    assert reply.status == 405
    assert reply.headers["Allow"] == "POST"
    reply = request(listener, "POST", "/healthz", b"{}", {"Content-Type": "application/json"})
    assert reply.status == 405
    assert reply.headers["Allow"] == "GET"
    reply = post(listener, "bitbucket", PUSH_BODY, signed_headers("github", PUSH_BODY))
    assert reply.status == 404
    assert reply.json() == {"error": "not found"}
    assert request(listener, "GET", "/nothing").status == 404
    assert request(listener, "GET", "/webhook/").status == 404
    assert rec.pushes == []
    assert rec.webhooks == []  # an unknown provider never becomes a metric label


def test_health_and_readiness_follow_their_callables(start: Start) -> None:
    listener, rec = start()
    reply = request(listener, "GET", "/healthz")
    assert (reply.status, reply.body) == (200, b"ok")
    assert request(listener, "GET", "/readyz").status == 503
    rec.is_ready = True
    reply = request(listener, "GET", "/readyz")
    assert (reply.status, reply.body) == (200, b"ok")
    rec.healthy = False
    assert request(listener, "GET", "/healthz").status == 503
    assert request(listener, "GET", "/healthz?verbose=1").status == 503


def test_metrics_are_prometheus_text(start: Start) -> None:
    listener, _ = start()
    reply = request(listener, "GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert reply.body == b"# HELP x X.\n# TYPE x counter\nx 1\n"


def test_a_failing_callback_is_a_500_and_the_server_lives_on(
    start: Start, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    listener, rec = start()
    rec.fail = True
    with caplog.at_level(logging.DEBUG, logger="reconciler.webhook"):
        reply = post(listener, "github", PUSH_BODY, signed_headers("github", PUSH_BODY))
        assert reply.status == 500
        assert reply.json() == {"error": "internal error"}
        assert request(listener, "GET", "/metrics").status == 500
        rec.fail = False
        reply = post(listener, "github", PUSH_BODY, signed_headers("github", PUSH_BODY))
        assert reply.status == 202
    assert len(rec.pushes) == 1
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)
    assert any("POST /webhook/github" in r.getMessage() for r in caplog.records)
    assert capfd.readouterr().err == ""  # logs go through logging, never straight to stderr


def test_keep_alive_connections_serve_several_requests(start: Start) -> None:
    listener, rec = start()
    conn = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=5)
    try:
        for _ in range(3):
            reply = request(
                listener, "POST", "/webhook/gitea", PUSH_BODY,
                signed_headers("gitea", PUSH_BODY), conn=conn,
            )  # fmt: skip
            assert reply.status == 202
        assert request(listener, "GET", "/healthz", conn=conn).status == 200
    finally:
        conn.close()
    assert len(rec.pushes) == 3


def test_a_burst_from_four_threads_is_answered_in_full(start: Start) -> None:
    listener, rec = start()
    statuses: list[int] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        provider = PROVIDERS[index]
        conn = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=10)
        try:
            for n in range(25):
                body = json.dumps({"ref": "refs/heads/main", "after": f"{index}-{n}"}).encode()
                reply = request(
                    listener, "POST", f"/webhook/{provider}", body,
                    signed_headers(provider, body), conn=conn if n % 2 else None,
                )  # fmt: skip
                with lock:
                    statuses.append(reply.status)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert statuses == [202] * 100
    assert len(rec.pushes) == 100
    assert len({p.commit for p in rec.pushes}) == 100


def test_stop_releases_the_port() -> None:
    listener = HttpListener(
        "127.0.0.1", 0, secret=SECRET, on_push=lambda p: (True, ""),
        health=lambda: True, ready=lambda: True, metrics=lambda: "",
    )  # fmt: skip
    with listener:
        port = listener.port
        assert listener.url == f"http://127.0.0.1:{port}"
        assert request(listener, "GET", "/healthz").status == 200
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    listener.stop()  # idempotent
