"""Webhook verification and push parsing: pure functions, tested with tables."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable

import pytest

from reconciler.webhook import (
    BadRequest,
    Push,
    parse_push,
    verify,
    verify_generic,
    verify_gitea,
    verify_github,
    verify_gitlab,
)

SECRET = b"s3cret"
BODY = b'{"ref": "refs/heads/main", "after": "abc123"}'


def sign(body: bytes, secret: bytes = SECRET) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


GOOD = sign(BODY)
Verifier = Callable[[bytes, str | None, bytes], bool]


@pytest.mark.parametrize(
    ("provider", "headers", "body", "valid"),
    [
        # github: sha256=<hex> only
        ("github", {"X-Hub-Signature-256": f"sha256={GOOD}"}, BODY, True),
        ("github", {"x-hub-signature-256": f"sha256={GOOD}"}, BODY, True),
        ("github", {"X-Hub-Signature-256": f"sha256={GOOD.upper()}"}, BODY, True),
        ("github", {"X-Hub-Signature-256": f"sha256={sign(BODY, b'other')}"}, BODY, False),
        ("github", {"X-Hub-Signature-256": f"sha256={GOOD}"}, BODY + b" ", False),
        ("github", {}, BODY, False),
        ("github", {"X-Hub-Signature-256": GOOD}, BODY, False),
        ("github", {"X-Hub-Signature-256": f"sha1={GOOD}"}, BODY, False),
        ("github", {"X-Hub-Signature-256": "sha256="}, BODY, False),
        ("github", {"X-Signature-256": f"sha256={GOOD}"}, BODY, False),
        # gitea: bare hex, sha256= tolerated
        ("gitea", {"X-Gitea-Signature": GOOD}, BODY, True),
        ("gitea", {"X-Gitea-Signature": f"sha256={GOOD}"}, BODY, True),
        ("gitea", {"X-Gitea-Signature": sign(BODY, b"other")}, BODY, False),
        ("gitea", {"X-Gitea-Signature": GOOD}, b'{"ref": "refs/heads/evil"}', False),
        ("gitea", {}, BODY, False),
        ("gitea", {"X-Gitea-Signature": f"sha1={GOOD}"}, BODY, False),
        ("gitea", {"X-Hub-Signature-256": f"sha256={GOOD}"}, BODY, False),
        # gitlab: the token is the secret; the body is not signed
        ("gitlab", {"X-Gitlab-Token": "s3cret"}, BODY, True),
        ("gitlab", {"X-Gitlab-Token": "s3cret"}, b"anything", True),
        ("gitlab", {"X-Gitlab-Token": "wrong"}, BODY, False),
        ("gitlab", {"X-Gitlab-Token": "s3cret "}, BODY, False),
        ("gitlab", {"X-Gitlab-Token": ""}, BODY, False),
        ("gitlab", {}, BODY, False),
        ("gitlab", {"X-Gitlab-Token": f"sha256={GOOD}"}, BODY, False),
        # generic: sha256=<hex> or bare hex
        ("generic", {"X-Signature-256": f"sha256={GOOD}"}, BODY, True),
        ("generic", {"X-Signature-256": GOOD}, BODY, True),
        ("generic", {"X-Signature-256": f"sha256={sign(BODY, b'x')}"}, BODY, False),
        ("generic", {"X-Signature-256": f"sha256={GOOD}"}, b"", False),
        ("generic", {}, BODY, False),
        ("generic", {"X-Signature-256": f"sha512={GOOD}"}, BODY, False),
        ("generic", {"X-Signature-256": "sha256=zz\u00e9"}, BODY, False),
        ("generic", {"X-Signature-256": "sha256=" + "\u20ac" * 64}, BODY, False),
        ("gitlab", {"X-Gitlab-Token": "s3cr\u20ac"}, BODY, False),
    ],
)
def test_verify(provider: str, headers: dict[str, str], body: bytes, valid: bool) -> None:
    assert verify(provider, SECRET, headers, body) is valid


@pytest.mark.parametrize("verifier", [verify_github, verify_gitea, verify_gitlab, verify_generic])
def test_an_empty_secret_verifies_nothing(verifier: Verifier) -> None:
    empty_mac = hmac.new(b"", BODY, hashlib.sha256).hexdigest()
    for value in ("", f"sha256={empty_mac}", empty_mac, None):
        assert verifier(b"", value, BODY) is False


def test_a_gitlab_token_arrives_as_http_server_decodes_it() -> None:
    secret = "s\u00e9cr\u20act".encode()
    # http.server hands header values over decoded as latin-1
    assert verify_gitlab(secret, secret.decode("latin-1"), BODY)
    assert not verify_gitlab(secret, "s\u00e9cr", BODY)


def test_verify_rejects_an_unknown_provider() -> None:
    with pytest.raises(KeyError):
        verify("bitbucket", SECRET, {}, BODY)


def payload(**fields: object) -> bytes:
    return json.dumps(fields).encode()


PUSH = payload(ref="refs/heads/main", after="abc123", before="000")


@pytest.mark.parametrize(
    ("provider", "headers", "body", "expected"),
    [
        ("github", {"X-GitHub-Event": "push"}, PUSH, Push("github", "refs/heads/main", "abc123")),
        ("github", {"x-github-event": "push"}, PUSH, Push("github", "refs/heads/main", "abc123")),
        (
            "github",
            {"X-GitHub-Event": "push"},
            payload(ref="refs/heads/feature", after="def"),
            Push("github", "refs/heads/feature", "def"),
        ),
        (
            "github",
            {"X-GitHub-Event": "push", "Content-Type": "application/x-www-form-urlencoded"},
            b"payload=%7B%22ref%22%3A%22refs%2Fheads%2Fmain%22%2C%22after%22%3A%22f00%22%7D",
            Push("github", "refs/heads/main", "f00"),
        ),
        ("github", {"X-GitHub-Event": "ping"}, payload(zen="hi", hook_id=1), None),
        ("github", {"X-GitHub-Event": "pull_request"}, PUSH, None),
        ("github", {"X-GitHub-Event": "ping"}, b"{not json", None),  # not a push: body unused
        ("github", {}, PUSH, None),
        ("gitea", {"X-Gitea-Event": "push"}, PUSH, Push("gitea", "refs/heads/main", "abc123")),
        ("gitea", {"X-Gitea-Event": "create"}, PUSH, None),
        ("gitea", {"X-Gitea-Event": "issues"}, PUSH, None),
        (
            "gitlab",
            {"X-Gitlab-Event": "Push Hook"},
            payload(ref="refs/heads/main", after="aaa", checkout_sha="bbb"),
            Push("gitlab", "refs/heads/main", "bbb"),
        ),
        (
            "gitlab",
            {"X-Gitlab-Event": "Push Hook"},
            payload(ref="refs/heads/gone", after="0" * 40, checkout_sha=None),
            Push("gitlab", "refs/heads/gone", "0" * 40),
        ),
        ("gitlab", {"X-Gitlab-Event": "Tag Push Hook"}, PUSH, None),
        ("gitlab", {"X-Gitlab-Event": "Merge Request Hook"}, PUSH, None),
        ("generic", {}, PUSH, Push("generic", "refs/heads/main", "abc123")),
        ("generic", {}, payload(ref="main", commit="c1"), Push("generic", "main", "c1")),
        ("generic", {}, payload(ref=""), Push("generic", None, None)),
        ("generic", {}, payload(), Push("generic", None, None)),
        ("generic", {}, b"", Push("generic", None, None)),
    ],
)
def test_parse_push(
    provider: str, headers: dict[str, str], body: bytes, expected: Push | None
) -> None:
    assert parse_push(provider, headers, body) == expected


@pytest.mark.parametrize(
    ("provider", "headers", "body"),
    [
        ("github", {"X-GitHub-Event": "push"}, b'{"ref": "refs/heads/main"'),
        ("github", {"X-GitHub-Event": "push"}, b"[1, 2]"),
        ("github", {"X-GitHub-Event": "push"}, payload(ref=["refs/heads/main"])),
        (
            "github",
            {"X-GitHub-Event": "push", "Content-Type": "application/x-www-form-urlencoded"},
            b"other=1",
        ),
        ("gitea", {"X-Gitea-Event": "push"}, b"\xff\xfe\xfa"),
        ("gitlab", {"X-Gitlab-Event": "Push Hook"}, b"nope"),
        ("generic", {}, b"{"),
        ("generic", {}, b'"main"'),
        ("generic", {}, payload(ref="main", after=42)),
    ],
)
def test_parse_push_rejects_malformed_bodies(
    provider: str, headers: dict[str, str], body: bytes
) -> None:
    with pytest.raises(BadRequest):
        parse_push(provider, headers, body)


def test_bad_request_is_a_value_error() -> None:
    assert issubclass(BadRequest, ValueError)


@pytest.mark.parametrize(
    ("ref", "branch", "targets"),
    [
        ("refs/heads/main", "main", True),
        ("refs/heads/main", "refs/heads/main", True),
        ("main", "main", True),
        ("refs/heads/feature", "main", False),
        ("refs/heads/main-old", "main", False),
        ("refs/tags/main", "main", False),
        (None, "main", True),
        ("", "main", True),
    ],
)
def test_push_targets(ref: str | None, branch: str, targets: bool) -> None:
    assert Push("github", ref, None).targets(branch) is targets
