"""The registry proxy against a real Mosquitto and a real OCI registry (CNCF distribution 2.8).

The test plays the requester: it publishes ``ArtifactRequest`` messages on the shared request
topic and collects the offer and the chunks published to its own topics.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from reconciler.broker import Broker
from reconciler.proxy import BlobCache, ProxyStats, RegistryProxy
from reconciler.registry import PushResult, RegistryClient
from schemas.connection import broker_settings
from schemas.messages import ArtifactOffer, ArtifactRequest, chunk_count, decode
from schemas.topics import Kind, Namespace
from tests.broker import Mosquitto
from tests.fleet import EMPTY_MODULE, Fleet, Module, module, pad_module, running_fleet, task
from tests.registry import REGISTRY_USERS, Registry

pytestmark = pytest.mark.integration

WASM = Path(__file__).resolve().parents[1] / "wasm"
KiB = 1024


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def padded_module(size: int, seed: int = 1) -> bytes:
    """A core Wasm module of exactly ``size`` bytes: the header and one custom section."""
    return pad_module(EMPTY_MODULE, size, seed)


def push(
    registry: Registry, path: Path, tag: str, client: RegistryClient | None = None
) -> PushResult:
    with client or RegistryClient(insecure=True) as pusher:
        return pusher.push_wasm(path, f"{registry.address}/{tag}", {})


def blob_gets(registry: Registry, digest: str) -> int:
    """Successful GETs of the blob in the registry's access log.

    The registry logs a request after answering it, so right after a download its line may be
    missing still: ``logged_blob_gets`` waits for it.
    """
    return sum(
        1
        for e in registry.access_log()
        if e.method == "GET" and e.path.endswith(f"/blobs/{digest}") and e.status == 200
    )


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.01)


def logged_blob_gets(registry: Registry, digest: str, at_least: int = 1) -> int:
    wait_until(lambda: blob_gets(registry, digest) >= at_least, what=f"{at_least} blob GET(s)")
    return blob_gets(registry, digest)


@dataclass
class Answer:
    offer: ArtifactOffer
    chunks: dict[int, bytes] = field(default_factory=dict)
    chunk_before_offer: bool = False

    def content(self) -> bytes:
        return b"".join(self.chunks[i] for i in range(self.offer.chunks))


class Requester:
    """Plays a proplet: asks for artifacts and collects what is published to it, by digest."""

    def __init__(self, mosquitto: Mosquitto, proplet: str) -> None:
        self.proplet = proplet
        settings = broker_settings(mosquitto.url)
        self.ns: Namespace = settings.namespace
        self.client = Broker(settings, client_id=f"test-requester-{proplet}")
        self.client.connect()
        self._lock = threading.Lock()
        self._inboxes: dict[str, queue.Queue[tuple[str, bytes]]] = {}
        self.client.subscribe(
            f"{self.ns.proplet_root(proplet)}/artifacts/#", self._on_message, qos=1
        )
        self._probe()

    def _on_message(self, topic: str, payload: bytes, _retained: bool) -> None:
        parsed = self.ns.parse(topic)
        self._inbox("sha256:" + (parsed.digest_hex or "")).put((topic, payload))

    def _inbox(self, digest: str) -> queue.Queue[tuple[str, bytes]]:
        with self._lock:
            return self._inboxes.setdefault(digest, queue.Queue())

    def _probe(self) -> None:
        """Return once the subscription is active (a message to ourselves comes back)."""
        digest = "sha256:" + "0" * 64
        topic = self.ns.artifact_offer(self.proplet, "0" * 64)
        offer = ArtifactOffer(digest=digest, size=0, chunk_size=64, chunks=0)
        self.client.publish(topic, offer.encode())
        assert self._inbox(digest).get(timeout=5)[0] == topic

    def ask(
        self, digest: str, image: str | None, chunk_size: int = 16 * KiB,
        chunks: list[int] | None = None,
    ) -> None:  # fmt: skip
        request = ArtifactRequest(
            proplet=self.proplet, digest=digest, chunk_size=chunk_size, chunks=chunks, image=image
        )
        self.client.publish(self.ns.artifact_request(), request.encode())

    def receive(
        self, digest: str, expect: list[int] | None = None, timeout: float = 10.0
    ) -> Answer:
        """The offer for ``digest`` and the chunks that follow it (``expect``: those indices)."""
        inbox = self._inbox(digest)
        deadline = time.monotonic() + timeout
        answer: Answer | None = None
        early = False
        while True:
            remaining = deadline - time.monotonic()
            try:
                topic, payload = inbox.get(timeout=max(0.0, remaining))
            except queue.Empty:
                raise AssertionError(
                    f"incomplete answer for {digest}: {answer and sorted(answer.chunks)}"
                ) from None
            parsed = self.ns.parse(topic)
            if parsed.kind is Kind.ARTIFACT_OFFER:
                answer = Answer(decode(ArtifactOffer, payload), chunk_before_offer=early)
                if answer.offer.error is not None:
                    return answer
            elif parsed.kind is Kind.ARTIFACT_CHUNK:
                assert parsed.index is not None
                if answer is None:
                    early = True
                    continue
                answer.chunks[parsed.index] = payload
            if answer is not None:
                wanted = expect if expect is not None else range(answer.offer.chunks)
                if all(i in answer.chunks for i in wanted):
                    return answer

    def nothing_for(self, digest: str) -> bool:
        """Nothing arrived for ``digest`` that ``receive`` has not taken."""
        return self._inbox(digest).empty()

    def close(self) -> None:
        self.client.close()


ProxyFactory = Callable[..., RegistryProxy]
RequesterFactory = Callable[[str], Requester]


@pytest.fixture
def requester(broker: Mosquitto) -> Iterator[RequesterFactory]:
    made: list[Requester] = []

    def make(proplet: str) -> Requester:
        made.append(Requester(broker, proplet))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture
def proxy(broker: Mosquitto) -> Iterator[ProxyFactory]:
    """``proxy(client=None, **options)``: a started RegistryProxy with its own connection."""
    made: list[tuple[RegistryProxy, Broker, RegistryClient]] = []

    def make(client: RegistryClient | None = None, **options: Any) -> RegistryProxy:
        settings = broker_settings(broker.url)
        connection = Broker(settings, client_id=f"test-proxy-{len(made)}")
        connection.connect()
        registry_client = client or RegistryClient(insecure=True, timeout=5)
        server = RegistryProxy(connection, settings.namespace, registry_client, **options)
        server.start()
        made.append((server, connection, registry_client))
        # Once a request of our own comes back through the broker, the proxy's subscription is
        # active; then start counting from zero.
        probe = ArtifactRequest(proplet="probe", digest=digest_of(b""), chunk_size=64)
        connection.publish(settings.namespace.artifact_request(), probe.encode())
        wait_until(lambda: server.stats.ignored == 1, what="proxy subscribed")
        server.stats = ProxyStats()
        return server

    yield make
    for server, connection, registry_client in made:
        server.stop()
        connection.close()
        registry_client.close()


@pytest.fixture
def big_module(tmp_path: Path) -> Path:
    """A 600,001-byte module: 37 chunks of 16 KiB, 3 of 256 KiB, the last ones short."""
    path = tmp_path / "big.wasm"
    path.write_bytes(padded_module(600_001))
    return path


# -- the cache (pure) ----------------------------------------------------------------------


def test_blob_cache_evicts_least_recently_used_within_its_byte_bound() -> None:
    cache = BlobCache(10)
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    assert cache.get("a") == b"1234"  # a is now the most recent
    cache.put("c", b"1234")
    assert "b" not in cache
    assert ("a" in cache, "c" in cache, cache.size) == (True, True, 8)
    cache.put("huge", b"x" * 11)
    assert "huge" not in cache
    assert cache.size == 8


# -- serving ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [16 * KiB, 256 * KiB])
@pytest.mark.parametrize("by", ["tag", "digest"])
def test_chunks_reassemble_to_the_exact_module(
    registry: Registry, proxy: ProxyFactory, requester: RequesterFactory, big_module: Path,
    chunk_size: int, by: str,
) -> None:  # fmt: skip
    pushed = push(registry, big_module, "big:v7")  # not "latest": any tag works
    image = str(pushed.reference) if by == "tag" else str(pushed.pinned)
    data = big_module.read_bytes()
    proxy()
    edge = requester("edge-1")

    edge.ask(pushed.layer_digest, image, chunk_size)
    answer = edge.receive(pushed.layer_digest)

    assert answer.offer.error is None
    assert not answer.chunk_before_offer
    assert (answer.offer.size, answer.offer.chunk_size) == (len(data), chunk_size)
    assert answer.offer.chunks == chunk_count(len(data), chunk_size)
    assert answer.content() == data
    assert digest_of(answer.content()) == pushed.layer_digest


def test_a_real_module_by_tag(
    registry: Registry, proxy: ProxyFactory, requester: RequesterFactory
) -> None:
    pushed = push(registry, WASM / "hello.wasm", "tools/hello:1.0")
    proxy()
    edge = requester("edge-1")

    edge.ask(pushed.layer_digest, str(pushed.reference), 4 * KiB)

    answer = edge.receive(pushed.layer_digest)
    assert answer.content() == (WASM / "hello.wasm").read_bytes()
    assert answer.offer.chunks == 8


def test_resume_sends_only_the_missing_chunks_from_the_cache(
    registry: Registry, proxy: ProxyFactory, requester: RequesterFactory, big_module: Path
) -> None:
    pushed = push(registry, big_module, "big:1")
    data = big_module.read_bytes()
    server = proxy()
    edge = requester("edge-1")
    edge.ask(pushed.layer_digest, str(pushed.reference), 16 * KiB)
    first = edge.receive(pushed.layer_digest)
    assert server.stats.chunks_sent == first.offer.chunks == 37

    edge.ask(pushed.layer_digest, str(pushed.reference), 16 * KiB, chunks=[3, 36, 99])
    resumed = edge.receive(pushed.layer_digest, expect=[3, 36])

    assert resumed.offer.chunks == 37
    assert set(resumed.chunks) == {3, 36}  # 99 is past the end: skipped
    assert resumed.chunks[3] == data[3 * 16 * KiB : 4 * 16 * KiB]
    assert resumed.chunks[36] == data[36 * 16 * KiB :]
    wait_until(lambda: server.stats.offers == 2, what="second answer counted")
    assert server.stats.chunks_sent == 37 + 2
    assert (server.stats.pulls, server.stats.cache_hits) == (1, 1)
    assert logged_blob_gets(registry, pushed.layer_digest) == 1


class SlowBlobs(requests.Session):
    """Holds every blob download for a while, so that concurrent requests overlap it."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.blob_gets = 0
        self._lock = threading.Lock()

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        if request.method == "GET" and "/blobs/" in (request.path_url or ""):
            with self._lock:
                self.blob_gets += 1
            time.sleep(self.delay)
        return super().send(request, **kwargs)


def test_concurrent_requests_for_one_blob_share_one_pull(
    registry: Registry, proxy: ProxyFactory, requester: RequesterFactory, big_module: Path
) -> None:
    pushed = push(registry, big_module, "big:1")
    session = SlowBlobs(delay=0.5)
    server = proxy(RegistryClient(insecure=True, session=session))
    edges = [requester(f"edge-{n}") for n in range(3)]

    for edge in edges:
        edge.ask(pushed.layer_digest, str(pushed.reference), 64 * KiB)
    edges[0].ask(pushed.layer_digest, str(pushed.reference), 64 * KiB)  # asked again: dropped

    for edge in edges:
        assert edge.receive(pushed.layer_digest).content() == big_module.read_bytes()
    assert session.blob_gets == 1
    assert logged_blob_gets(registry, pushed.layer_digest) == 1
    wait_until(lambda: server.stats.offers == 3, what="three answers")
    assert (server.stats.pulls, server.stats.joined, server.stats.duplicates) == (1, 2, 1)
    assert server.stats.chunks_sent == 3 * 10


def test_two_identical_requests_at_once_pull_once(
    registry: Registry, proxy: ProxyFactory, requester: RequesterFactory, big_module: Path
) -> None:
    pushed = push(registry, big_module, "big:1")
    proxy()
    one, two = requester("edge-1"), requester("edge-2")

    one.ask(pushed.layer_digest, str(pushed.reference), 64 * KiB)
    two.ask(pushed.layer_digest, str(pushed.reference), 64 * KiB)

    assert one.receive(pushed.layer_digest).content() == big_module.read_bytes()
    assert two.receive(pushed.layer_digest).content() == big_module.read_bytes()
    assert logged_blob_gets(registry, pushed.layer_digest) == 1


def test_a_blob_larger_than_the_cache_is_pulled_again(
    registry: Registry, proxy: ProxyFactory, requester: RequesterFactory, big_module: Path
) -> None:
    pushed = push(registry, big_module, "big:1")
    server = proxy(cache_bytes=100_000)
    edge = requester("edge-1")

    for _ in range(2):
        edge.ask(pushed.layer_digest, str(pushed.reference), 256 * KiB)
        assert edge.receive(pushed.layer_digest).content() == big_module.read_bytes()

    assert server.stats.pulls == 2
    assert len(server.cache) == 0
    assert logged_blob_gets(registry, pushed.layer_digest, at_least=2) == 2


def test_a_request_without_an_image_is_left_to_the_reconciler(
    registry: Registry, proxy: ProxyFactory, requester: RequesterFactory
) -> None:
    pushed = push(registry, WASM / "add.wasm", "add:1")
    server = proxy()
    edge = requester("edge-1")

    edge.ask(pushed.layer_digest, None)

    wait_until(lambda: server.stats.ignored == 1, what="request seen")
    assert edge.nothing_for(pushed.layer_digest)
    assert (server.stats.requests, server.stats.pulls) == (0, 0)
    assert blob_gets(registry, pushed.layer_digest) == 0


# -- faults ---------------------------------------------------------------------------------


def test_an_unknown_reference_is_answered_not_found(
    registry: Registry, proxy: ProxyFactory, requester: RequesterFactory
) -> None:
    pushed = push(registry, WASM / "add.wasm", "add:1")
    proxy()
    edge = requester("edge-1")
    missing = digest_of(b"never pushed")

    edge.ask(missing, f"{registry.address}/add:1")
    edge.ask(pushed.layer_digest, f"{registry.address}/nothing-here:1")

    for digest in (missing, pushed.layer_digest):
        answer = edge.receive(digest)
        assert answer.offer.error is not None
        assert answer.offer.error.startswith("not found:")
        assert (answer.offer.size, answer.offer.chunks, answer.chunks) == (0, 0, {})


def test_an_invalid_reference_is_answered_with_the_reason(
    proxy: ProxyFactory, requester: RequesterFactory
) -> None:
    proxy()
    edge = requester("edge-1")
    digest = digest_of(b"x")

    edge.ask(digest, "acme/hello:1")  # no registry host: would silently mean Docker Hub

    error = edge.receive(digest).offer.error
    assert error is not None and "does not name a registry" in error


def test_credentials_refused_then_accepted(
    auth_registry: Registry, proxy: ProxyFactory, requester: RequesterFactory
) -> None:
    alice = RegistryClient("alice", REGISTRY_USERS["alice"], insecure=True)
    pushed = push(auth_registry, WASM / "hello.wasm", "private/hello:2", alice)
    image = str(pushed.reference)
    anonymous = proxy()
    edge = requester("edge-1")

    edge.ask(pushed.layer_digest, image)
    error = edge.receive(pushed.layer_digest).offer.error
    assert error is not None and "registry refused the credentials" in error
    assert "none were given" in error

    anonymous.stop()
    logged_in = proxy(RegistryClient("alice", REGISTRY_USERS["alice"], insecure=True))
    edge.ask(pushed.layer_digest, image)
    answer = edge.receive(pushed.layer_digest)
    assert answer.offer.error is None
    assert answer.content() == (WASM / "hello.wasm").read_bytes()
    assert logged_in.stats.pulls == 1


def test_registry_down_is_reported_then_served_once_it_is_back(
    registry: Registry, proxy: ProxyFactory, requester: RequesterFactory, big_module: Path
) -> None:
    pushed = push(registry, big_module, "big:1")
    server = proxy()
    edge = requester("edge-1")
    registry.stop()

    edge.ask(pushed.layer_digest, str(pushed.reference))
    error = edge.receive(pushed.layer_digest).offer.error
    assert error is not None and error.startswith("registry unreachable:")
    assert "connection refused" in error

    registry.start()
    edge.ask(pushed.layer_digest, str(pushed.reference))
    assert edge.receive(pushed.layer_digest).content() == big_module.read_bytes()
    assert server.stats.refusals == 1


class BrokenBlobs(requests.Session):
    """Fails every blob download with an error the registry client does not expect."""

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        if "/blobs/" in (request.path_url or ""):
            raise RuntimeError("boom")
        return super().send(request, **kwargs)


def test_an_unexpected_failure_is_still_answered(
    registry: Registry, proxy: ProxyFactory, requester: RequesterFactory
) -> None:
    pushed = push(registry, WASM / "add.wasm", "add:1")
    server = proxy(RegistryClient(insecure=True, session=BrokenBlobs()))
    edge = requester("edge-1")

    edge.ask(pushed.layer_digest, str(pushed.reference))

    error = edge.receive(pushed.layer_digest).offer.error
    assert error == f"pull of {pushed.layer_digest} from {registry.address}/add failed: boom"
    assert server.stats.refusals == 1


def stored_blob(registry: Registry, digest: str) -> Path:
    hex_digest = digest.removeprefix("sha256:")
    path = registry.storage_path / "docker/registry/v2/blobs/sha256" / hex_digest[:2]
    return path / hex_digest / "data"


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_content_that_does_not_match_its_digest_is_never_sent(
    registry: Registry, proxy: ProxyFactory, requester: RequesterFactory, big_module: Path,
    damage: str,
) -> None:  # fmt: skip
    pushed = push(registry, big_module, "big:1")
    stored = stored_blob(registry, pushed.layer_digest)
    original = stored.read_bytes()
    assert original == big_module.read_bytes()
    if damage == "flipped":
        middle = len(original) // 2
        stored.write_bytes(
            original[:middle] + bytes([original[middle] ^ 0xFF]) + original[middle + 1 :]
        )
    else:
        stored.write_bytes(original[: len(original) - 1000])
    server = proxy()
    edge = requester("edge-1")

    edge.ask(pushed.layer_digest, str(pushed.reference))
    answer = edge.receive(pushed.layer_digest)

    assert answer.offer.error is not None
    assert answer.offer.error.startswith("digest mismatch:")
    assert answer.chunks == {}
    assert edge.nothing_for(pushed.layer_digest)
    assert server.stats.chunks_sent == 0
    assert pushed.layer_digest not in server.cache

    stored.write_bytes(original)  # repaired: the next request (the requester's retry) works
    edge.ask(pushed.layer_digest, str(pushed.reference))
    assert edge.receive(pushed.layer_digest).content() == original


# -- end to end: a real proplet that gets OCI modules over MQTT -----------------------------


@pytest.fixture
def fleet(broker: Mosquitto, tmp_path: Path) -> Iterator[Fleet]:
    with running_fleet(broker, tmp_path / "fleet") as f:
        yield f


def test_a_proplet_runs_a_module_the_proxy_pulled_and_reports_what_it_cannot_get(
    registry: Registry, proxy: ProxyFactory, fleet: Fleet
) -> None:
    add = module("add")
    pushed = push(registry, WASM / "add.wasm", "math/add:2024.1")
    assert pushed.layer_digest == add.digest
    server = proxy()
    fleet.start_proplet("edge-1", "--pull", "mqtt", "--chunk-size", "64")
    missing = f"{registry.address}/math/add:no-such-tag"

    fleet.desire("edge-1", [
        task("sum", add, function="add", args=["2", "40"], image=str(pushed.reference)),
        task("gone", Module("gone", b"\0asm\x01\0\0\0"), function="f", image=missing),
    ])  # fmt: skip

    result = fleet.wait_result("edge-1", "sum", timeout=20)
    assert (result.state.value, result.result) == ("Completed", ["42"])
    status = fleet.wait_task(
        "edge-1",
        "gone",
        lambda t: t.state.value == "Failed" and "not found" in (t.reason or ""),
        timeout=20,
    )
    assert "(retrying)" in (status.reason or "")
    assert server.stats.bytes_pulled == 167 and server.stats.refusals >= 1
    assert server.stats.chunks_sent >= 3  # 167 bytes in the 64-byte chunks the proplet asked for
    assert fleet.server.chunks_sent == 0  # the reconciler's server had nothing to give


# -- propctl proxy --------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[2]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PROPELLER_")}


@pytest.mark.parametrize("stop_with", [signal.SIGTERM, signal.SIGINT])
def test_propctl_proxy_serves_with_credentials_from_the_environment_until_stopped(
    broker: Mosquitto, auth_registry: Registry, requester: RequesterFactory, tmp_path: Path,
    stop_with: signal.Signals,
) -> None:  # fmt: skip
    alice = RegistryClient("alice", REGISTRY_USERS["alice"], insecure=True)
    pushed = push(auth_registry, WASM / "hello.wasm", "private/hello:2", alice)
    env = clean_env()
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        PROPELLER_REGISTRY_USERNAME="alice",
        PROPELLER_REGISTRY_PASSWORD=REGISTRY_USERS["alice"],
    )
    stderr_path = tmp_path / "proxy.err"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "propctl", "proxy", "--insecure", "--broker", broker.url,
             "--cache-size", "64Mi"],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr,
        )  # fmt: skip
    try:
        edge = requester("edge-1")
        answer = None
        for _ in range(50):  # until its subscription is active
            edge.ask(pushed.layer_digest, str(pushed.reference), 8 * KiB)
            with contextlib.suppress(AssertionError):
                answer = edge.receive(pushed.layer_digest, timeout=0.2)
                break
        assert answer is not None, stderr_path.read_text()
        assert answer.content() == (WASM / "hello.wasm").read_bytes()

        process.send_signal(stop_with)
        out, _ = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    logs = stderr_path.read_text()
    assert process.returncode == 0, logs
    assert out == b""  # logs go to stderr
    assert "answering artifact requests on m/default/c/default/artifacts/request" in logs
    assert f"pulled {pushed.layer_digest}" in logs
    assert "1 pull(s)" in logs


def test_propctl_proxy_refuses_half_a_login(broker: Mosquitto) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "propctl", "proxy", "--broker", broker.url,
         "--registry-username", "alice"],
        cwd=REPO_ROOT, env={**clean_env(), "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "error: give both --registry-username and --registry-password" in done.stderr


def test_a_proplet_waits_out_a_registry_outage_and_damaged_content(
    registry: Registry, proxy: ProxyFactory, fleet: Fleet
) -> None:
    add = module("add")
    pushed = push(registry, WASM / "add.wasm", "math/add:1")
    stored = stored_blob(registry, pushed.layer_digest)
    proxy()
    fleet.start_proplet("edge-1", "--pull", "mqtt")
    registry.stop()

    fleet.desire("edge-1", [
        task("sum", add, function="add", args=["2", "40"], image=str(pushed.reference)),
    ])  # fmt: skip

    def failed_with(text: str) -> Callable[[Any], bool]:
        return lambda t: t.state.value == "Failed" and text in (t.reason or "")

    fleet.wait_task("edge-1", "sum", failed_with("registry unreachable"), timeout=20)
    stored.write_bytes(b"\0asm\x01\0\0\0" + bytes(len(add.data) - 8))  # same size, other bytes
    registry.start()
    fleet.wait_task("edge-1", "sum", failed_with("digest mismatch"), timeout=20)
    assert ("edge-1", "sum") not in fleet.observed.results  # never ran

    stored.write_bytes(add.data)
    result = fleet.wait_result("edge-1", "sum", timeout=20)
    assert (result.state.value, result.result) == ("Completed", ["42"])
