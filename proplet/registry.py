"""Direct pulls from OCI registries: one blob by digest, and the retry schedule of pulls.

A proplet started with ``--pull direct`` fetches a task's module itself from the registry named
by the task's ``image`` (``registry/repository@sha256:<manifest>``): ``GET
/v2/<repository>/blobs/<digest>`` for the module's digest, which is the Wasm layer's. The
reconciler already resolved the manifest, so one request is all a pull takes. The blob streams
into a temp file and is checked against its digest (and the size the task expects) before
anything uses it.

The HTTP is plain ``requests`` (oras-py's own HTTP library) rather than oras' provider: for one
GET the provider would only add retries of a refused connection lasting minutes and a repeated
request per 401. Credentials go out pre-emptively as HTTP basic auth.

``Pulls`` is the schedule (pure, no IO, like ``proplet.transfer.Transfers``): the pulls in
flight, when each is tried again, and the reason a task shows meanwhile.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from proplet.artifacts import TEMP_PREFIX, digest_hex
from schemas.connection import ENV_REGISTRY_PASSWORD, ENV_REGISTRY_USERNAME

if TYPE_CHECKING:
    import requests

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
_LOOPBACK = re.compile(r"^(localhost|127\.\d+\.\d+\.\d+|\[::1\])(:\d+)?$")
_LOGIN_HINT = (
    f"give the proplet --registry-username/--registry-password"
    f" (or {ENV_REGISTRY_USERNAME}/{ENV_REGISTRY_PASSWORD})"
)


class RegistryError(Exception):
    """A pull failed; the message says what to do about it. Worth retrying later."""


class RegistryUnreachable(RegistryError):
    """The registry could not be reached (refused, timed out, TLS failed, 502/503/504)."""


class ContentMismatch(RegistryError):
    """The registry sent bytes that do not hash to the digest (or more than expected)."""


class CredentialsRefused(RegistryError):
    """The registry answered 401 or 403: no credentials, wrong ones, or not allowed."""


class ArtifactNotFound(RegistryError):
    """The repository or the blob does not exist there (404)."""


class InvalidImage(RegistryError):
    """The task's image is not a reference this proplet can pull from."""


# Errors a quick retry will not fix: the task is reported failed, and retried slowly.
PERMANENT: tuple[type[RegistryError], ...] = (CredentialsRefused, ArtifactNotFound, InvalidImage)


@dataclass(frozen=True, slots=True)
class Repository:
    """``registry/repository``: where a blob is pulled from."""

    registry: str
    repository: str

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}"


def parse_image(image: str) -> Repository:
    """The repository of ``registry/repository[:tag][@digest]``; InvalidImage otherwise."""
    from schemas.manifests import IMAGE_REFERENCE  # the manifest models load only here

    match = re.match(IMAGE_REFERENCE, image)
    if match is None:
        raise InvalidImage(f"{image!r} is not an OCI reference (registry/repository@digest)")
    registry = match["registry"]
    if not ("." in registry or ":" in registry or registry == "localhost"):
        raise InvalidImage(f"{image!r} does not name a registry host")
    return Repository(registry, match["repository"])


def _registry_errors(response: requests.Response) -> str:
    """``HTTP 404 BLOB_UNKNOWN: message`` from the registry's error body, or the HTTP reason."""
    import requests  # loaded with the first pull

    try:
        body = response.json()
        parts = [
            f"{e.get('code', '?')}: {e.get('message', '')}".strip()
            for e in body.get("errors", [])
            if isinstance(e, dict)
        ]
    except (ValueError, AttributeError, requests.RequestException):
        parts = []
    detail = "; ".join(parts) or (response.reason or "")
    return f"HTTP {response.status_code} {detail}".strip()


def _os_reason(exc: BaseException) -> str:
    """'connection refused' rather than urllib3's three nested reprs."""
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text) or re.search(
        r"\[SSL: \w+\] ([^'\"(]+)", text
    )
    if found:
        return found.group(1).strip().rstrip(".").lower()
    if "timed out" in text.lower():
        return "timed out"
    return text


class RegistryPuller:
    """Pulls blobs by digest over HTTPS (plain HTTP with ``insecure``), one GET each.

    One set of credentials, sent to every registry the tasks name. ``session`` lets tests see
    every request. ``timeout`` bounds connecting and each wait for data, not a whole download.
    """

    def __init__(
        self,
        username: str | None = None,
        password: str | None = None,
        *,
        insecure: bool = False,
        ca_file: Path | str | None = None,
        timeout: float = 30.0,
        session: requests.Session | None = None,
    ) -> None:
        if (username is None) != (password is None):
            raise ValueError("give both a registry username and a password, or neither")
        self.username = username
        self._auth = (username, password) if username is not None and password is not None else None
        self.insecure = insecure
        self._scheme = "http" if insecure else "https"
        self._verify: bool | str = str(ca_file) if ca_file is not None else True
        self._timeout = (min(timeout, 10.0), timeout)
        # Created on the first pull: an agent that never pulls does not load requests (~10 MB).
        self._session_given = session
        self._warned_plain: set[str] = set()

    @property
    def _session(self) -> requests.Session:
        if self._session_given is None:
            import requests

            self._session_given = requests.Session()
        return self._session_given

    def close(self) -> None:
        if self._session_given is not None:
            self._session_given.close()

    def pull(
        self, image: str, digest: str, dest_dir: Path, *, max_bytes: int | None = None
    ) -> Path:
        """Download blob ``digest`` of ``image``'s repository into a new file in ``dest_dir``.

        The file is returned only once its sha256 matched (and it was at most ``max_bytes``);
        the caller moves it into place or deletes it. Every failure of the registry or of the
        transfer is a ``RegistryError``; the local disk's are ``OSError``.
        """
        digest_hex(digest)  # ValueError before any IO
        repo = parse_image(image)
        what = f"blob {digest} in {repo}"
        response = self._get(repo, f"/v2/{repo.repository}/blobs/{digest}")
        with contextlib.closing(response):
            if response.status_code != 200:
                raise self._failed(response, repo, what)
            dest_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}pull-", dir=dest_dir)
            path = Path(name)
            try:
                with os.fdopen(fd, "wb") as out:
                    actual, size = self._stream(response, out, what, max_bytes, repo)
                    out.flush()
                    os.fsync(out.fileno())
                if actual != digest:
                    raise ContentMismatch(
                        f"{what} does not match its digest: got {actual} ({size} bytes)"
                    )
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        log.info("pulled %s (%d bytes)", what, size)
        return path

    def _stream(
        self,
        response: requests.Response,
        out: IO[bytes],
        what: str,
        max_bytes: int | None,
        repo: Repository,
    ) -> tuple[str, int]:
        import requests  # loaded with the first pull

        hasher = hashlib.sha256()
        size = 0
        try:
            for chunk in response.iter_content(chunk_size=_CHUNK):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise ContentMismatch(
                        f"{what} is larger than the {max_bytes} bytes the task expects"
                    )
                hasher.update(chunk)
                out.write(chunk)
        except requests.RequestException as exc:
            raise RegistryUnreachable(
                f"registry unreachable: lost {repo.registry} while reading {what}"
                f" after {size} bytes: {_os_reason(exc)}"
            ) from None
        return "sha256:" + hasher.hexdigest(), size

    def _get(self, repo: Repository, path: str) -> requests.Response:
        import requests  # loaded with the first pull

        host = repo.registry
        if self.insecure and self._auth and host not in self._warned_plain:
            if not _LOOPBACK.match(host):
                log.warning("sending registry credentials to %s over plain HTTP", host)
            self._warned_plain.add(host)
        try:
            response = self._session.get(
                f"{self._scheme}://{host}{path}",
                auth=self._auth,
                stream=True,
                timeout=self._timeout,
                verify=self._verify,
            )
        except requests.exceptions.SSLError as exc:
            raise RegistryUnreachable(
                f"registry unreachable: TLS with {host} failed ({_os_reason(exc)}); if it serves"
                " plain HTTP (a local test registry), start the proplet with --insecure-registry"
            ) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise RegistryUnreachable(
                f"registry unreachable: cannot reach {host} over {self._scheme}: {_os_reason(exc)}"
            ) from None
        log.debug("GET %s%s -> %s", host, path, response.status_code)
        return response

    def _failed(self, response: requests.Response, repo: Repository, what: str) -> RegistryError:
        errors = _registry_errors(response)
        status = response.status_code
        if status == 404:
            return ArtifactNotFound(f"not found: {what} ({errors})")
        if status in (401, 403):
            return self._refused(response, repo, errors)
        if status in (429, 502, 503, 504):
            return RegistryUnreachable(
                f"registry unreachable: {repo.registry} is unavailable ({errors})"
            )
        return RegistryError(f"registry {repo.registry} failed on {what}: {errors}")

    def _refused(
        self, response: requests.Response, repo: Repository, errors: str
    ) -> CredentialsRefused:
        prefix = f"registry refused the credentials for {repo}"
        if "bearer" in response.headers.get("Www-Authenticate", "").lower():
            return CredentialsRefused(
                f"{prefix}: it wants a bearer token (token auth), which proplets do not support"
                f" yet; run the proplet with --pull mqtt ({errors})"
            )
        if self.username is None:
            return CredentialsRefused(
                f"{prefix}: none were given and it requires a login; {_LOGIN_HINT} ({errors})"
            )
        if response.status_code == 403:
            return CredentialsRefused(f"{prefix}: user {self.username!r} is not allowed ({errors})")
        return CredentialsRefused(
            f"{prefix}: wrong password for user {self.username!r}, or no such user ({errors})"
        )


# -- the schedule ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between attempts: doubling from ``initial`` up to ``maximum`` seconds.

    Errors in ``PERMANENT`` (not found, credentials refused) wait ``maximum`` straight away:
    someone has to fix the registry or the manifest first.
    """

    initial: float = 1.0
    maximum: float = 30.0

    def delay(self, failures: int) -> float:
        return float(min(self.maximum, self.initial * 2 ** max(0, failures - 1)))


@dataclass(slots=True)
class Pull:
    """One digest this proplet pulls from a registry."""

    digest: str
    image: str
    size: int | None
    attempts: int = 0  # started so far
    failures: int = 0  # in a row
    running: bool = False
    next_try: float = 0.0
    error: RegistryError | None = None
    reason: str | None = None

    @property
    def permanent(self) -> bool:
        """The last error needs a person (wrong reference, credentials), not just time."""
        return isinstance(self.error, PERMANENT)


def _seconds(delay: float) -> str:
    return f"{delay:.0f}s" if delay >= 10 else f"{delay:.1f}s"


class Pulls:
    """Every pull in flight for one proplet: at most ``parallel`` running at once."""

    def __init__(
        self,
        backoff: Backoff | None = None,
        *,
        parallel: int = 4,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.backoff = backoff or Backoff()
        self.parallel = parallel
        self._jitter = jitter  # in [0, 1): spreads the retries of a fleet by up to 20 %
        self._pulls: dict[str, Pull] = {}

    def __contains__(self, digest: str) -> bool:
        return digest in self._pulls

    def get(self, digest: str) -> Pull | None:
        return self._pulls.get(digest)

    def want(self, digest: str, image: str, size: int | None, now: float) -> Pull | None:
        """Add a pull, due now; returns it when it is new, None when it was already known.

        A pull that is waiting to retry and is now wanted from another image is tried at once.
        """
        pull = self._pulls.get(digest)
        if pull is None:
            pull = Pull(digest, image, size, next_try=now)
            self._pulls[digest] = pull
            return pull
        if pull.image != image and not pull.running:
            pull.image, pull.size, pull.next_try, pull.failures = image, size, now, 0
        return None

    def drop(self, digest: str) -> None:
        self._pulls.pop(digest, None)

    def due(self, now: float) -> list[Pull]:
        """Pulls to start now, marked running; at most as many as there are free slots."""
        free = self.parallel - sum(1 for p in self._pulls.values() if p.running)
        started = []
        for pull in sorted(self._pulls.values(), key=lambda p: p.next_try):
            if free <= 0 or pull.next_try > now:
                break
            if pull.running:
                continue
            pull.running = True
            pull.attempts += 1
            free -= 1
            started.append(pull)
        return started

    def finished(self, digest: str, error: RegistryError | None, now: float) -> Pull | None:
        """Record how an attempt ended; returns the pull (None if it was dropped meanwhile).

        On success the pull is done and forgotten; on an error its retry is scheduled and its
        ``reason`` says what happened and when it is tried again.
        """
        pull = self._pulls.get(digest)
        if pull is None or not pull.running:
            return None
        pull.running = False
        if error is None:
            del self._pulls[digest]
            pull.error = pull.reason = None
            return pull
        pull.error = error
        pull.failures += 1
        delay = self.backoff.maximum if pull.permanent else self.backoff.delay(pull.failures)
        delay *= 1.0 + 0.2 * self._jitter()
        pull.next_try = now + delay
        pull.reason = f"{error} (retry {pull.attempts + 1} in {_seconds(delay)})"
        return pull

    def next_deadline(self) -> float | None:
        """When the next retry is due; None when none waits or every slot is busy."""
        waiting = [p.next_try for p in self._pulls.values() if not p.running]
        running = len(self._pulls) - len(waiting)
        if not waiting or running >= self.parallel:
            return None
        return min(waiting)
