"""Artifacts in OCI registries: references, push, resolve (tag -> digest) and blob fetch.

Wasm modules follow the CNCF Wasm OCI artifact layout: an OCI image manifest whose config has the
media type ``application/vnd.wasm.config.v0+json`` (``{"created", "architecture": "wasm",
"os": "wasip1", "layerDigests"}``) and whose one layer is the module, ``application/wasm``.

Models (the final model of a federated job) use the same shape with their own media types: the
config ``application/vnd.propeller.model.config.v1+json`` (``{"dtype", "shape",
"layerDigests"}``) and one layer ``application/vnd.propeller.model.v1+npy``, the ``.npy`` file.

The HTTP work is oras-py's (``oras.provider.Registry``: blob upload sessions, manifest upload,
blob download, URL building), with its ``do_request`` replaced, for three reasons:
- credentials go out pre-emptively as HTTP basic auth on the session, so no request is sent
  twice (oras answers each 401 by repeating the request, and its basic backend without
  credentials fails with ``AttributeError`` on the first 401);
- oras retries every failure, a refused connection included, sleeping 3, 5, 11, 29 and 83 s,
  so an unreachable registry would take over two minutes to report;
- every failure becomes a typed error here (``RegistryError`` and its subclasses) with a
  message a person can act on, and requests get a timeout.

One ``RegistryClient`` holds one set of credentials and sends them to every registry named in
the references it is given.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.cookiejar import DefaultCookiePolicy
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import oras.auth.utils
import oras.container
import oras.defaults
import oras.provider
import requests

from schemas.connection import ENV_REGISTRY_PASSWORD, ENV_REGISTRY_USERNAME
from schemas.manifests import IMAGE_REFERENCE
from schemas.messages import sha256_digest

log = logging.getLogger(__name__)

WASM_CONFIG_MEDIA_TYPE = "application/vnd.wasm.config.v0+json"
WASM_LAYER_MEDIA_TYPE = "application/wasm"
MODEL_CONFIG_MEDIA_TYPE = "application/vnd.propeller.model.config.v1+json"
MODEL_LAYER_MEDIA_TYPE = "application/vnd.propeller.model.v1+npy"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
ANNOTATION_CREATED = "org.opencontainers.image.created"
ANNOTATION_TITLE = "org.opencontainers.image.title"
DEFAULT_TAG = "latest"

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_WASM_MAGIC = b"\0asm"
_CORE_MODULE_VERSION = b"\x01\x00\x00\x00"
_MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # distribution's own limit for a manifest
_CHUNK = 64 * 1024
_LOOPBACK = re.compile(r"^(localhost|127\.\d+\.\d+\.\d+|\[::1\])(:\d+)?$")


class RegistryError(Exception):
    """A registry operation failed; the message says what to do about it."""


class RegistryUnreachable(RegistryError):
    """The registry could not be reached (refused, timed out, TLS failed, 502/503/504)."""


class CredentialsRefused(RegistryError):
    """The registry answered 401 or 403: no credentials, wrong ones, or not allowed."""


class ArtifactNotFound(RegistryError):
    """The repository, tag, manifest or blob does not exist (404)."""


class NotWasmArtifact(RegistryError):
    """The artifact (or the file to push) is not a Wasm module in the CNCF layout."""


class NotModelArtifact(RegistryError):
    """The artifact (or the bytes to push) is not a ``.npy`` model in the model layout."""


class InvalidReference(ValueError):
    """A string is not a usable OCI reference (or digest)."""


# -- references ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reference:
    """``registry/repository[:tag][@digest]``; a digest, when present, is what is fetched."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        """``registry/repository``, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def identifier(self) -> str:
        """What goes after ``/manifests/``: the digest if there is one, else the tag."""
        found = self.digest or self.tag
        assert found is not None  # parse_reference guarantees one of them
        return found

    def pinned(self, digest: str) -> Reference:
        """The same repository at a manifest digest (no tag): what never changes."""
        return Reference(self.registry, self.repository, None, digest)

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> Reference:
    """Parse ``registry/repository[:tag][@sha256:<hex>]``; no tag and no digest means ``latest``.

    The registry host is required (``localhost:5000/app``, ``ghcr.io/acme/app``): a bare
    ``app:1`` would silently mean Docker Hub, which is rarely what a fleet wants.
    """
    match = re.match(IMAGE_REFERENCE, text)
    if match is None:
        raise InvalidReference(
            f"{text!r} is not an OCI reference: use registry/repository[:tag][@sha256:<64 hex>],"
            " e.g. localhost:5000/app:1"
        )
    registry = match["registry"]
    if not ("." in registry or ":" in registry or registry == "localhost"):
        raise InvalidReference(
            f"{text!r} does not name a registry: start with its host,"
            " e.g. ghcr.io/acme/app:1 or localhost:5000/app:1"
        )
    tag, digest = match["tag"], match["digest"]
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, match["repository"], tag, digest)


def _check_digest(digest: str) -> str:
    if not _DIGEST.match(digest):
        raise InvalidReference(f"{digest!r} is not a digest: use sha256:<64 lowercase hex>")
    return digest


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PushResult:
    reference: Reference  # as pushed (with its tag)
    manifest_digest: str
    layer_digest: str
    size: int  # of the layer (the module or the model), in bytes

    @property
    def pinned(self) -> Reference:
        return self.reference.pinned(self.manifest_digest)


@dataclass(frozen=True, slots=True)
class Manifest:
    """A manifest as the registry served it; ``digest`` is the sha256 of ``content``."""

    reference: Reference
    digest: str
    media_type: str
    content: bytes = field(repr=False)
    document: Mapping[str, Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class Resolved:
    """Where a reference points now: the manifest digest and its one layer of the kind asked."""

    reference: Reference  # as asked (tag or digest)
    manifest_digest: str
    layer_digest: str
    size: int  # of the layer, in bytes
    config_media_type: str
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def pinned(self) -> Reference:
        return self.reference.pinned(self.manifest_digest)


# -- the Wasm artifact layout (pure) ------------------------------------------------------


def check_wasm_module(data: bytes, what: str) -> None:
    """Refuse anything but a core Wasm module (what wasmtime and WAMR proplets run)."""
    if data[:4] != _WASM_MAGIC:
        raise NotWasmArtifact(f"{what} is not a WebAssembly module (no \\0asm header)")
    if data[4:8] != _CORE_MODULE_VERSION:
        raise NotWasmArtifact(
            f"{what} is a WebAssembly component or an unknown version ({data[4:8].hex()}):"
            " proplets run core modules (wasip1)"
        )


def wasm_config(layer_digest: str, created: str) -> bytes:
    """The config blob of the CNCF Wasm layout for one core module."""
    config = {"created": created, "architecture": "wasm", "os": "wasip1",
              "layerDigests": [layer_digest]}  # fmt: skip
    return json.dumps(config, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class ArtifactKind:
    """What one kind of artifact is made of: its layer's media type and how to name its errors."""

    noun: str  # "Wasm", "model"
    layer_media_type: str
    error: type[RegistryError]
    hint: str  # what to push instead of an image index


WASM_ARTIFACT = ArtifactKind(
    "Wasm", WASM_LAYER_MEDIA_TYPE, NotWasmArtifact, "push the module itself, e.g. with propctl push"
)
MODEL_ARTIFACT = ArtifactKind(
    "model", MODEL_LAYER_MEDIA_TYPE, NotModelArtifact, "push the .npy file itself"
)


def artifact_layer(
    manifest: Mapping[str, Any], what: str, kind: ArtifactKind
) -> tuple[str, int, str]:
    """(layer digest, size, config media type) of the one ``kind`` layer, or ``kind.error``.

    Accepted: any image manifest whose layers include exactly one layer of the kind's media
    type, whatever its config (e.g. ``oras push ref m.wasm:application/wasm``).
    """
    media_type = manifest.get("mediaType")
    if media_type in (OCI_INDEX, DOCKER_LIST) or "manifests" in manifest:
        raise kind.error(
            f"{what} is an image index (several platforms), not a {kind.noun} artifact: {kind.hint}"
        )
    config = manifest.get("config")
    layers = manifest.get("layers")
    if not isinstance(config, Mapping) or not isinstance(layers, list):
        raise kind.error(f"{what} is not an image manifest (no config or layers)")
    config_type = str(config.get("mediaType", ""))
    found = [
        x for x in layers if isinstance(x, Mapping) and x.get("mediaType") == kind.layer_media_type
    ]
    if len(found) != 1:
        kinds = ", ".join(
            sorted({str(x.get("mediaType")) for x in layers if isinstance(x, Mapping)})
        )
        raise kind.error(
            f"{what} is not a {kind.noun} artifact: expected one {kind.layer_media_type} layer,"
            f" found {len(found)} (config {config_type or '?'}; layers: {kinds or 'none'})"
        )
    digest, size = found[0].get("digest"), found[0].get("size")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise kind.error(f"{what}: the {kind.noun} layer has no sha256 digest ({digest!r})")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise kind.error(f"{what}: the {kind.noun} layer has no valid size ({size!r})")
    return digest, size, config_type


def wasm_layer(manifest: Mapping[str, Any], what: str) -> tuple[str, int, str]:
    """(layer digest, size, config media type) of a Wasm artifact manifest, or NotWasmArtifact.

    Accepted: the CNCF layout (Wasm config media type), or any image manifest whose layers
    include exactly one ``application/wasm`` (e.g. ``oras push ref m.wasm:application/wasm``).
    """
    return artifact_layer(manifest, what, WASM_ARTIFACT)


def npy_header(data: bytes, what: str) -> tuple[str, tuple[int, ...]]:
    """(dtype, shape) from the header of ``.npy`` bytes, checked against their length.

    Only the header is parsed, so a large model is not copied; ``NotModelArtifact`` when the
    bytes are not one ``.npy`` array that loads without pickle.
    """
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported")
    except (ValueError, EOFError, SyntaxError) as exc:
        raise NotModelArtifact(f"{what} is not a .npy array: {exc}") from None
    if dtype.hasobject:
        raise NotModelArtifact(f"{what} holds Python objects (dtype {dtype}), not numbers")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - stream.tell() != expected:
        raise NotModelArtifact(
            f"{what}: the header says {dtype.str} of shape {tuple(shape)} ({expected} bytes),"
            f" but {len(data) - stream.tell()} bytes follow it"
        )
    return dtype.str, tuple(int(d) for d in shape)


def model_config(data: bytes, layer_digest: str, what: str) -> bytes:
    """The config blob of a model artifact: the array's dtype and shape, and the layer."""
    dtype, shape = npy_header(data, what)
    config = {"dtype": dtype, "shape": list(shape), "layerDigests": [layer_digest]}
    return json.dumps(config, separators=(",", ":")).encode()


def _push_target(ref: Reference | str) -> Reference:
    """``ref`` parsed, and refused unless it names a tag: a push cannot target a digest."""
    ref = parse_reference(ref) if isinstance(ref, str) else ref
    if ref.digest is not None or ref.tag is None:
        raise InvalidReference(f"{ref}: push to a tag (registry/repository:tag), not a digest")
    return ref


def _timestamp(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc_now() -> datetime.datetime:
    # SOURCE_DATE_EPOCH (reproducible-builds.org) makes pushes reproducible: the same module and
    # annotations give the same manifest digest, so re-pushing it does not move the tag.
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    if epoch.isdigit():
        return datetime.datetime.fromtimestamp(int(epoch), tz=datetime.UTC)
    return datetime.datetime.now(tz=datetime.UTC)


# -- HTTP ----------------------------------------------------------------------------------


def _registry_errors(response: requests.Response) -> str:
    """``CODE: message`` of the registry's error body, or the HTTP reason."""
    try:
        body = response.json()
        parts = [
            f"{e.get('code', '?')}: {e.get('message', '')}".strip()
            for e in body.get("errors", [])
            if isinstance(e, dict)
        ]
    except (ValueError, AttributeError):
        parts = []
    detail = "; ".join(parts) or (response.reason or "")
    return f"HTTP {response.status_code} {detail}".strip()


def _repository_of(url: str) -> str:
    parts = urlsplit(url)
    path = parts.path.removeprefix("/v2/")
    for marker in ("/manifests/", "/blobs/", "/tags/"):
        if marker in path:
            return f"{parts.netloc}/{path.split(marker)[0]}"
    return parts.netloc


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


class _Transport(oras.provider.Registry):  # type: ignore[misc]  # oras is untyped
    """oras' registry provider with pre-emptive credentials, no retries and typed errors."""

    def __init__(
        self,
        *,
        authorization: str | None,
        user: str | None,
        insecure: bool,
        tls_verify: bool | str,
        timeout: float,
        session: requests.Session | None,
    ) -> None:
        super().__init__(insecure=insecure, tls_verify=tls_verify, auth_backend="basic")
        if session is not None:
            session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
            self.session = session
            self.auth.session = session
        if authorization is not None:
            self.session.headers["Authorization"] = authorization
        self.user = user
        self.timeout = timeout

    def do_request(
        self,
        url: str,
        method: str = "GET",
        data: Any = None,
        headers: dict[str, str] | None = None,
        json: Any = None,
        stream: bool = False,
    ) -> requests.Response:
        host = urlsplit(url).netloc
        try:
            response = self.session.request(
                method,
                url,
                data=data,
                json=json,
                headers=headers or {},
                stream=stream,
                verify=self._tls_verify,
                timeout=self.timeout,
            )
        except requests.exceptions.SSLError as exc:
            raise RegistryUnreachable(
                f"TLS with registry {host} failed ({_os_reason(exc)}); if it serves plain HTTP"
                " (a local test registry), connect insecurely (plain HTTP)"
            ) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise RegistryUnreachable(
                f"cannot reach registry {host} over {self.prefix}: {_os_reason(exc)}"
            ) from None
        log.debug("%s %s -> %s", method, url, response.status_code)
        status = response.status_code
        if status in (401, 403) or status >= 500:
            with contextlib.closing(response):
                errors = _registry_errors(response)  # reads the (small) error body first
            if status in (401, 403):
                raise self._refused(response, url, errors)
            if status in (502, 503, 504):
                raise RegistryUnreachable(
                    f"registry {host} is unavailable ({errors}); try again later"
                )
            raise RegistryError(f"registry {host} failed: {errors}")
        return response

    def _refused(self, response: requests.Response, url: str, errors: str) -> CredentialsRefused:
        what = _repository_of(url)
        if "bearer" in response.headers.get("Www-Authenticate", "").lower():
            # Token auth (Docker Hub, ghcr.io) needs a token server round trip; not done yet.
            return CredentialsRefused(
                f"registry refused the credentials for {what}: it wants a bearer token"
                f" (token auth), which this client does not support yet ({errors})"
            )
        if self.user is None:
            return CredentialsRefused(
                f"registry refused the credentials for {what}: none were given and it requires"
                f" a login ({errors})"
            )
        if response.status_code == 403:
            return CredentialsRefused(
                f"registry refused the credentials for {what}: user {self.user!r} is not"
                f" allowed ({errors})"
            )
        return CredentialsRefused(
            f"registry refused the credentials for {what}: wrong password for user"
            f" {self.user!r}, or no such user ({errors})"
        )


class RegistryClient:
    """Push, resolve and fetch Wasm artifacts; every failure is a ``RegistryError``.

    ``insecure`` speaks plain HTTP (a registry on loopback); ``ca_file`` verifies HTTPS against
    a private CA. ``session`` lets tests see every request (a ``requests.Session`` subclass).
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
        clock: Callable[[], datetime.datetime] = _utc_now,
    ) -> None:
        if (username is None) != (password is None):
            raise ValueError("give both a registry username and a password, or neither")
        authorization = None
        if username is not None and password is not None:
            authorization = "Basic " + oras.auth.utils.get_basic_auth(username, password)
        self.insecure = insecure
        self._clock = clock
        self._warned_plain: set[str] = set()
        self._oras = _Transport(
            authorization=authorization,
            user=username,
            insecure=insecure,
            tls_verify=str(ca_file) if ca_file is not None else True,
            timeout=timeout,
            session=session,
        )

    @classmethod
    def from_env(cls, *, insecure: bool = False, **kwargs: Any) -> RegistryClient:
        """Credentials from PROPELLER_REGISTRY_USERNAME / PROPELLER_REGISTRY_PASSWORD, if set."""
        username = os.environ.get(ENV_REGISTRY_USERNAME) or None
        password = os.environ.get(ENV_REGISTRY_PASSWORD) if username else None
        if username and password is None:
            raise ValueError(f"{ENV_REGISTRY_USERNAME} is set but {ENV_REGISTRY_PASSWORD} is not")
        return cls(username, password, insecure=insecure, **kwargs)

    def close(self) -> None:
        self._oras.session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------

    def _container(self, ref: Reference) -> Any:
        # Built from our parse, not oras': its regex reads a first path component with a dot
        # ("a.b/app") as a registry, and a host without one ("localhost/app") as a namespace.
        container = oras.container.Container(ref.repository, registry=ref.registry)
        namespace, _, repository = ref.repository.rpartition("/")
        container.registry = ref.registry
        container.namespace = namespace or None
        container.repository = repository
        container.tag = ref.tag
        container.digest = ref.digest
        if self.insecure and self._oras.user and ref.registry not in self._warned_plain:
            if not _LOOPBACK.match(ref.registry):
                log.warning("sending registry credentials to %s over plain HTTP", ref.registry)
            self._warned_plain.add(ref.registry)
        return container

    def _url(self, path: str) -> str:
        return f"{self._oras.prefix}://{path}"

    # -- push ----------------------------------------------------------------------------

    def push_wasm(
        self,
        path: Path | str,
        ref: Reference | str,
        annotations: Mapping[str, str] | None = None,
    ) -> PushResult:
        """Push a core Wasm module as a CNCF Wasm artifact under ``ref``'s tag.

        The manifest gets ``org.opencontainers.image.created`` and the given annotations (which
        win over it); the layer is titled with the file name. Raises ``OSError`` when the file
        cannot be read, ``NotWasmArtifact`` when it is not a core module.
        """
        ref = _push_target(ref)
        path = Path(path)
        data = path.read_bytes()
        check_wasm_module(data, str(path))
        created = _timestamp(self._clock())
        return self.push_blob_artifact(
            data,
            ref,
            file_name=path.name,
            layer_media_type=WASM_LAYER_MEDIA_TYPE,
            config_media_type=WASM_CONFIG_MEDIA_TYPE,
            config=wasm_config(sha256_digest(data), created),
            annotations={ANNOTATION_CREATED: created, **(annotations or {})},
        )

    def push_model(
        self,
        data: bytes,
        ref: Reference | str,
        annotations: Mapping[str, str] | None = None,
        *,
        file_name: str = "model.npy",
    ) -> PushResult:
        """Push a ``.npy`` model as a model artifact under ``ref``'s tag.

        The config records the array's dtype and shape, read from the ``.npy`` header.
        ``NotModelArtifact`` when ``data`` is not one ``.npy`` array.
        """
        ref = _push_target(ref)
        config = model_config(data, sha256_digest(data), f"model for {ref}")
        return self.push_blob_artifact(
            data,
            ref,
            file_name=file_name,
            layer_media_type=MODEL_LAYER_MEDIA_TYPE,
            config_media_type=MODEL_CONFIG_MEDIA_TYPE,
            config=config,
            annotations=annotations,
        )

    def push_blob_artifact(
        self,
        data: bytes,
        ref: Reference | str,
        *,
        file_name: str,
        layer_media_type: str,
        config_media_type: str,
        config: bytes,
        annotations: Mapping[str, str] | None = None,
    ) -> PushResult:
        """Push ``data`` as the one layer of an OCI image manifest under ``ref``'s tag.

        The layer is titled ``file_name``; ``config`` is uploaded as the config blob. The
        manifest gets ``org.opencontainers.image.created`` and the given annotations (which win
        over it). The manifest digest is computed from the bytes sent and checked against the
        one the registry answers with.
        """
        ref = _push_target(ref)
        layer_digest = sha256_digest(data)
        created = _timestamp(self._clock())
        container = self._container(ref)

        layer = {"mediaType": layer_media_type, "digest": layer_digest, "size": len(data),
                 "annotations": {ANNOTATION_TITLE: file_name}}  # fmt: skip
        config_descriptor = {"mediaType": config_media_type, "digest": sha256_digest(config),
                             "size": len(config)}  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="propeller-push-") as tmp:
            # oras uploads from files; the layer goes from a copy of the bytes we were given.
            layer_file = Path(tmp, "layer")
            layer_file.write_bytes(data)
            config_file = Path(tmp, "config.json")
            config_file.write_bytes(config)
            self._upload_blob(layer_file, container, layer, ref)
            self._upload_blob(config_file, container, config_descriptor, ref)

        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_descriptor,
            "layers": [layer],
            "annotations": {ANNOTATION_CREATED: created, **(annotations or {})},
        }
        response = self._oras.upload_manifest(manifest, container)
        if response.status_code not in (200, 201):
            raise self._failed(response, f"upload of the manifest for {ref}")
        sent = response.request.body
        digest = sha256_digest(sent if isinstance(sent, bytes) else str(sent).encode())
        echoed = response.headers.get("Docker-Content-Digest")
        if echoed is not None and echoed != digest:
            raise RegistryError(
                f"registry {ref.registry} stored the manifest for {ref} as {echoed},"
                f" but what was sent hashes to {digest}"
            )
        log.info("pushed %s (%s, %d bytes) as %s", ref, layer_digest, len(data), digest)
        return PushResult(ref, digest, layer_digest, len(data))

    def _upload_blob(
        self, file: Path, container: Any, descriptor: dict[str, Any], ref: Reference
    ) -> None:
        what = f"upload of blob {descriptor['digest']} to {ref.name}"
        try:
            # HEAD (already there?), then POST + PUT; oras raises ValueError when the upload
            # session cannot start (no Location in the answer).
            response = self._oras.upload_blob(str(file), container, descriptor)
        except ValueError as exc:
            raise RegistryError(f"{what} failed: {exc}") from None
        if response.status_code not in (200, 201, 202):
            raise self._failed(response, what)

    def _failed(self, response: requests.Response, what: str) -> RegistryError:
        errors = _registry_errors(response)
        if response.status_code == 404:
            return ArtifactNotFound(f"not found: {what} ({errors})")
        return RegistryError(f"{what} failed: {errors}")

    # -- resolve -------------------------------------------------------------------------

    def fetch_manifest(self, ref: Reference | str) -> Manifest:
        """The manifest ``ref`` names now; its digest is checked against the content."""
        ref = parse_reference(ref) if isinstance(ref, str) else ref
        container = self._container(ref)
        accept = ", ".join((OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST))
        url = self._url(container.manifest_url())
        response = self._oras.do_request(url, "GET", headers={"Accept": accept}, stream=True)
        with contextlib.closing(response):
            if response.status_code != 200:
                raise self._failed(response, str(ref))
            content = response.raw.read(_MAX_MANIFEST_BYTES + 1, decode_content=True)
        if len(content) > _MAX_MANIFEST_BYTES:
            raise RegistryError(f"{ref}: manifest larger than {_MAX_MANIFEST_BYTES} bytes")
        digest = sha256_digest(content)
        expected = ref.digest or response.headers.get("Docker-Content-Digest")
        if expected is not None and expected != digest:
            raise RegistryError(
                f"{ref}: the registry sent a manifest that hashes to {digest}, not {expected}"
            )
        try:
            document = json.loads(content)
        except ValueError as exc:
            raise RegistryError(f"{ref}: the manifest is not JSON ({exc})") from None
        if not isinstance(document, dict):
            raise RegistryError(f"{ref}: the manifest is not a JSON object")
        media_type = str(
            document.get("mediaType") or response.headers.get("Content-Type", "").split(";")[0]
        )
        return Manifest(ref, digest, media_type, content, document)

    def resolve(self, ref: Reference | str, kind: ArtifactKind = WASM_ARTIFACT) -> Resolved:
        """Where ``ref`` points now: manifest digest, and its ``kind`` layer's digest and size.

        A tag is looked up (so a moved tag gives a new digest); a digest is checked. An
        artifact without exactly one layer of the kind raises ``kind.error``.
        """
        manifest = self.fetch_manifest(ref)
        layer_digest, size, config_type = artifact_layer(
            manifest.document, str(manifest.reference), kind
        )
        raw = manifest.document.get("annotations") or {}
        annotations = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        return Resolved(
            manifest.reference, manifest.digest, layer_digest, size, config_type, annotations
        )

    # -- blobs ---------------------------------------------------------------------------

    def iter_blob(
        self, ref: Reference | str, digest: str, chunk_size: int = _CHUNK
    ) -> Iterator[bytes]:
        """Stream a blob's chunks; raises ``RegistryError`` after the last one on a mismatch.

        Consumers must not trust the chunks until the iteration ended without an error;
        ``download_blob`` does that for files.
        """
        ref = parse_reference(ref) if isinstance(ref, str) else ref
        _check_digest(digest)
        container = self._container(ref)
        response = self._oras.get_blob(container, digest, stream=True)
        with contextlib.closing(response):
            if response.status_code != 200:
                raise self._failed(response, f"blob {digest} in {ref.name}")
            hasher = hashlib.sha256()
            try:
                for chunk in response.iter_content(chunk_size=chunk_size):
                    hasher.update(chunk)
                    yield chunk
            except requests.RequestException as exc:
                raise RegistryUnreachable(
                    f"lost registry {ref.registry} while reading blob {digest}: {_os_reason(exc)}"
                ) from None
        if "sha256:" + hasher.hexdigest() != digest:
            raise RegistryError(
                f"blob {digest} from {ref.name} does not match its digest"
                f" (got sha256:{hasher.hexdigest()})"
            )

    def fetch_blob(self, ref: Reference | str, digest: str) -> bytes:
        """A whole blob, in memory, after checking its sha256."""
        return b"".join(self.iter_blob(ref, digest))

    def pull_model(self, ref: Reference | str) -> bytes:
        """The ``.npy`` bytes of the model artifact ``ref`` names, checked against its digest.

        The layer is fetched from the manifest digest the reference resolved to, so a tag that
        moves meanwhile cannot mix two artifacts.
        """
        resolved = self.resolve(ref, MODEL_ARTIFACT)
        data = self.fetch_blob(resolved.pinned, resolved.layer_digest)
        if len(data) != resolved.size:
            raise RegistryError(
                f"{resolved.reference}: the model layer is {len(data)} bytes,"
                f" the manifest says {resolved.size}"
            )
        npy_header(data, f"the model in {resolved.reference}")
        return data

    def download_blob(self, ref: Reference | str, digest: str, dest: Path | str) -> int:
        """Stream a blob into ``dest`` (atomically, only once verified); returns its size."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in self.iter_blob(ref, digest):
                    out.write(chunk)
                    size += len(chunk)
            os.replace(tmp_name, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        return size
