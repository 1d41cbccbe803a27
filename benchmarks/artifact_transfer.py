"""Fetch a Wasm module through the registry proxy, beside the raw broker and a direct pull.

Against a real Mosquitto and a real OCI registry (CNCF distribution 2.8), both on loopback, for
modules of 1, 10 and 50 MiB (valid core Wasm modules: a header and one custom section of random
bytes, pushed in the CNCF Wasm layout):

* raw broker: the module's bytes published in 256 KiB QoS 1 messages by one client (the same
  paho settings as the proxy's connection) to a subscriber, until the last byte arrives in the
  subscriber's callback. This is the ceiling for anything that moves the module over MQTT.
* (a) direct pull: ``RegistryClient.fetch_blob`` of the Wasm layer (download and sha256).
* (b) proxy, 256 KiB chunks: from publishing an ``ArtifactRequest`` (with ``image``) to holding
  the whole module, reassembled and sha256-verified by ``proplet.transfer.Transfers`` (the
  proplet's own requester logic, resumes included), with the proxy's cache warm. The cold
  figure (the proxy pulls from the registry first) is measured once per size.
* (c) proxy, 16 KiB chunks, warm: what a board asking for small chunks gets.

Goal: (b) reaches at least half the raw broker throughput for every size. MB are decimal
megabytes (10^6 bytes), as in MB/s; the module sizes are MiB. Figures are medians: ``--repeats``
runs per size, ten times as many for 1 MiB (its runs take milliseconds), interleaved so that a
slow moment of the machine hits every figure alike.

Everything but the broker and the registry runs in this one Python process (as the raw
publisher and subscriber do), so the proxy shares the GIL with the requester. Mosquitto runs
with its defaults, like the test fixtures: its queue of 1,000 messages per client overflows when
thousands of 16 KiB chunks arrive faster than the requester takes them, and the requester then
asks again for what it misses after a stall; the report counts those requests.

    python benchmarks/artifact_transfer.py [--repeats N] [--window-mib N] [--smoke] [-o json]

Progress goes to stderr, figures to stdout. The exit code is 1 when the goal is missed (never
with ``--smoke``: 1 MiB only, which is what CI runs).
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proplet.transfer import Timing, Transfers
from reconciler.broker import Broker
from reconciler.proxy import DEFAULT_WINDOW_BYTES, RegistryProxy
from reconciler.registry import PushResult, RegistryClient
from schemas.connection import BrokerSettings, broker_settings
from schemas.messages import ArtifactOffer, ArtifactRequest, decode
from schemas.topics import Kind, Namespace
from tests.broker import Mosquitto
from tests.fleet import EMPTY_MODULE, pad_module
from tests.registry import Registry

MiB = 1024 * 1024
KiB = 1024
SIZES = (1 * MiB, 10 * MiB, 50 * MiB)
LARGE_CHUNK = 256 * KiB
SMALL_CHUNK = 16 * KiB
RAW_MESSAGE = 256 * KiB
GOAL_RATIO = 0.5
SAMPLE_BYTES = 10 * MiB  # per repeat: a 1 MiB module is timed 10 times as often as 10 MiB
TIMEOUT_S = 120.0
REQUESTER = "bench-edge"


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def wasm_module(size: int, seed: int) -> bytes:
    """A core Wasm module of exactly ``size`` bytes: the header and one custom section."""
    return pad_module(EMPTY_MODULE, size, seed)


def runs_for(size: int, repeats: int) -> int:
    """Small modules move in milliseconds: more runs, so that their medians are as steady."""
    return repeats * max(1, SAMPLE_BYTES // size)


def mb_s(size: int, seconds: float) -> float:
    return size / 1e6 / seconds


@dataclass
class SizeFigures:
    size_mib: int
    runs: int
    raw_mb_s: float
    direct_mb_s: float
    proxy_large_mb_s: float
    proxy_large_cold_mb_s: float
    proxy_small_mb_s: float
    large_ratio: float  # (b) / raw
    small_ratio: float  # (c) / raw
    direct_ratio: float  # (a) / raw
    large_resumes: int  # requests beyond the first, over all repeats (lost chunks)
    small_resumes: int
    passed: bool


@dataclass
class Figures:
    repeats: int  # per size: runs_for(size, repeats) timed runs
    large_chunk: int
    small_chunk: int
    raw_message: int
    window_bytes: int | None
    goal_ratio: float
    sizes: list[SizeFigures]
    passed: bool


class Inbox:
    """The requester's connection: artifact messages to a queue, raw bytes counted in place."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.ns: Namespace = settings.namespace
        self.client = Broker(settings, client_id="bench-requester")
        self.client.connect()
        self.messages: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        self._raw_lock = threading.Lock()
        self._raw_expected = 0
        self._raw_received = 0
        self._raw_done = threading.Event()
        self.raw_done_at = 0.0
        self.client.subscribe(
            f"{self.ns.proplet_root(REQUESTER)}/artifacts/#",
            lambda topic, payload, _r: self.messages.put((topic, payload)),
            qos=1,
        )
        self.client.subscribe(self.raw_topic("+"), self._on_raw, qos=1)

    def raw_topic(self, index: str) -> str:
        return f"{self.ns.root}/bench/raw/{index}"

    def expect_raw(self, size: int) -> None:
        with self._raw_lock:
            self._raw_expected, self._raw_received = size, 0
            self._raw_done.clear()

    def _on_raw(self, _topic: str, payload: bytes, _retained: bool) -> None:
        with self._raw_lock:
            self._raw_received += len(payload)
            if self._raw_received >= self._raw_expected:
                self.raw_done_at = time.perf_counter()
                self._raw_done.set()

    def wait_raw(self) -> float:
        if not self._raw_done.wait(TIMEOUT_S):
            raise TimeoutError(f"raw transfer incomplete: {self._raw_received} bytes")
        return self.raw_done_at

    def close(self) -> None:
        self.client.close()


class Bench:
    def __init__(self, tmp: Path, window_bytes: int | None) -> None:
        self.tmp = tmp
        self.mosquitto = Mosquitto(tmp / "broker")
        self.registry = Registry(tmp / "registry")
        self.window_bytes = window_bytes
        self._connections: list[Broker] = []
        self.inbox: Inbox | None = None
        self.proxy: RegistryProxy | None = None
        self.registry_client = RegistryClient(insecure=True)
        self.puller = RegistryClient(insecure=True)

    def start(self) -> None:
        self.mosquitto.start()
        self.registry.start()
        settings = broker_settings(self.mosquitto.url)
        self.ns = settings.namespace
        self.inbox = Inbox(settings)
        proxy_connection = self._connect(settings, "bench-proxy")
        self.proxy = RegistryProxy(
            proxy_connection, self.ns, self.registry_client,
            cache_bytes=256 * MiB, window_bytes=self.window_bytes,
        )  # fmt: skip
        self.proxy.start()
        self.raw_publisher = self._connect(settings, "bench-raw-publisher")
        self._wait_subscribed()

    def _connect(self, settings: BrokerSettings, client_id: str) -> Broker:
        connection = Broker(settings, client_id=client_id)
        connection.connect()
        self._connections.append(connection)
        return connection

    def _wait_subscribed(self) -> None:
        """Subscriptions take effect in order: once probes come back, all are active."""
        assert self.inbox is not None and self.proxy is not None
        self.inbox.expect_raw(1)
        self.raw_publisher.publish(self.inbox.raw_topic("probe"), b"x")
        self.inbox.wait_raw()
        probe = ArtifactRequest(proplet="probe", digest="sha256:" + "0" * 64, chunk_size=64)
        deadline = time.monotonic() + 10
        while self.proxy.stats.ignored == 0:
            self.raw_publisher.publish(self.ns.artifact_request(), probe.encode())
            time.sleep(0.05)
            if time.monotonic() > deadline:
                raise TimeoutError("the proxy does not receive requests")

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        if self.inbox is not None:
            self.inbox.close()
        for connection in self._connections:
            connection.close()
        self.registry_client.close()
        self.puller.close()
        self.registry.stop()
        self.mosquitto.stop()

    def push(self, data: bytes, tag: str) -> PushResult:
        path = self.tmp / f"{tag}.wasm"
        path.write_bytes(data)
        with RegistryClient(insecure=True) as client:
            result = client.push_wasm(path, f"{self.registry.address}/bench/module:{tag}", {})
        path.unlink()
        return result

    # -- the measurements ---------------------------------------------------------------------

    def raw(self, data: bytes) -> float:
        """Seconds to move ``data`` in 256 KiB QoS 1 messages from one client to another."""
        assert self.inbox is not None
        self.inbox.expect_raw(len(data))
        started = time.perf_counter()
        for index, start in enumerate(range(0, len(data), RAW_MESSAGE)):
            self.raw_publisher.publish(
                self.inbox.raw_topic(str(index)), data[start : start + RAW_MESSAGE]
            )
        return self.inbox.wait_raw() - started

    def direct(self, pushed: PushResult) -> float:
        started = time.perf_counter()
        blob = self.puller.fetch_blob(pushed.reference, pushed.layer_digest)
        elapsed = time.perf_counter() - started
        if len(blob) != pushed.size:
            raise RuntimeError("direct pull returned the wrong size")
        return elapsed

    def through_proxy(self, pushed: PushResult, chunk_size: int) -> tuple[float, int]:
        """Seconds from the request to the verified module, and how many times it asked again."""
        assert self.inbox is not None
        inbox = self.inbox
        transfers = Transfers(REQUESTER, chunk_size, Timing(stall=1.0))
        started = time.perf_counter()
        request = transfers.want(pushed.layer_digest, str(pushed.reference), started, pushed.size)
        assert request is not None
        self._ask(request)
        asked = 1
        deadline = started + TIMEOUT_S
        while True:
            now = time.perf_counter()
            if now > deadline:
                raise TimeoutError(f"no complete module within {TIMEOUT_S} s")
            due_at = transfers.next_deadline() or now + 1.0
            try:
                topic, payload = inbox.messages.get(timeout=max(0.001, due_at - now))
            except queue.Empty:
                for again in transfers.due(time.perf_counter()):
                    self._ask(again)
                    asked += 1
                continue
            parsed = self.ns.parse(topic)
            if parsed.kind is Kind.ARTIFACT_OFFER:
                error = transfers.on_offer(decode(ArtifactOffer, payload), time.perf_counter())
                if error is not None:
                    raise RuntimeError(f"the proxy refused: {error}")
            elif parsed.kind is Kind.ARTIFACT_CHUNK and parsed.index is not None:
                digest = "sha256:" + (parsed.digest_hex or "")
                content = transfers.on_chunk(digest, parsed.index, payload, time.perf_counter())
                if content is not None:
                    elapsed = time.perf_counter() - started
                    if len(content) != pushed.size:
                        raise RuntimeError("reassembled module has the wrong size")
                    if asked > 1:
                        self._drain()
                    return elapsed, asked - 1

    def _ask(self, request: ArtifactRequest) -> None:
        assert self.inbox is not None
        self.inbox.client.publish(self.ns.artifact_request(), request.encode())

    def _drain(self) -> None:
        """Let duplicate chunks from a resume settle so they do not count in the next run."""
        assert self.inbox is not None
        while True:
            try:
                self.inbox.messages.get(timeout=0.2)
            except queue.Empty:
                return


def measure(sizes: tuple[int, ...], repeats: int, window_bytes: int | None) -> Figures:
    results: list[SizeFigures] = []
    with tempfile.TemporaryDirectory(prefix="artifact-transfer-") as tmp_name:
        bench = Bench(Path(tmp_name), window_bytes)
        try:
            bench.start()
            assert bench.proxy is not None
            progress(f"broker {bench.mosquitto.url}, registry {bench.registry.url}")
            for size in sizes:
                label = f"{size // MiB} MiB"
                data = wasm_module(size, seed=size)
                pushed = bench.push(data, f"{size // MiB}mib")
                progress(f"{label}: pushed {pushed.layer_digest[:19]}...; warm-up")
                bench.raw(data)
                bench.direct(pushed)
                bench.proxy.cache.clear()
                cold, cold_resumes = bench.through_proxy(pushed, LARGE_CHUNK)
                raw_s, direct_s, large_s, small_s = [], [], [], []
                large_resumes, small_resumes = cold_resumes, 0
                runs = runs_for(size, repeats)
                for n in range(runs):
                    raw_s.append(bench.raw(data))
                    seconds, resumes = bench.through_proxy(pushed, LARGE_CHUNK)
                    large_s.append(seconds)
                    large_resumes += resumes
                    seconds, resumes = bench.through_proxy(pushed, SMALL_CHUNK)
                    small_s.append(seconds)
                    small_resumes += resumes
                    direct_s.append(bench.direct(pushed))
                    if (n + 1) % max(1, runs // 5):
                        continue
                    progress(
                        f"{label} {n + 1}/{runs}: raw {mb_s(size, raw_s[-1]):.0f},"
                        f" proxy 256 KiB {mb_s(size, large_s[-1]):.0f},"
                        f" 16 KiB {mb_s(size, small_s[-1]):.0f},"
                        f" direct {mb_s(size, direct_s[-1]):.0f} MB/s"
                    )
                raw = mb_s(size, statistics.median(raw_s))
                large = mb_s(size, statistics.median(large_s))
                small = mb_s(size, statistics.median(small_s))
                direct = mb_s(size, statistics.median(direct_s))
                results.append(
                    SizeFigures(
                        size_mib=size // MiB,
                        runs=runs,
                        raw_mb_s=raw,
                        direct_mb_s=direct,
                        proxy_large_mb_s=large,
                        proxy_large_cold_mb_s=mb_s(size, cold),
                        proxy_small_mb_s=small,
                        large_ratio=large / raw,
                        small_ratio=small / raw,
                        direct_ratio=direct / raw,
                        large_resumes=large_resumes,
                        small_resumes=small_resumes,
                        passed=large >= GOAL_RATIO * raw,
                    )
                )
            stats = bench.proxy.stats
            progress(
                f"proxy: {stats.pulls} pull(s), {stats.cache_hits} cache hit(s),"
                f" {stats.offers} answer(s), {stats.chunks_sent} chunk(s),"
                f" {stats.duplicates} duplicate request(s)"
            )
        finally:
            bench.close()
    return Figures(
        repeats=repeats,
        large_chunk=LARGE_CHUNK,
        small_chunk=SMALL_CHUNK,
        raw_message=RAW_MESSAGE,
        window_bytes=window_bytes,
        goal_ratio=GOAL_RATIO,
        sizes=results,
        passed=all(s.passed for s in results),
    )


def verdict(passed: bool) -> str:
    return "PASS" if passed else "MISSED"


def report(f: Figures) -> str:
    lines = []
    for s in f.sizes:
        resumes = ""
        if s.large_resumes or s.small_resumes:
            resumes = f"; asked again {s.large_resumes}x (256 KiB), {s.small_resumes}x (16 KiB)"
        lines.append(
            f"{s.size_mib} MiB: raw broker {s.raw_mb_s:.0f} MB/s;"
            f" proxy 256 KiB chunks {s.proxy_large_mb_s:.0f} MB/s ({s.large_ratio:.2f}x raw,"
            f" goal >= {f.goal_ratio:g}x: {verdict(s.passed)});"
            f" 16 KiB chunks {s.proxy_small_mb_s:.0f} MB/s ({s.small_ratio:.2f}x raw);"
            f" direct pull {s.direct_mb_s:.0f} MB/s ({s.direct_ratio:.2f}x raw)"
        )
        lines.append(
            f"  cold proxy (pull, verify, then send) 256 KiB chunks"
            f" {s.proxy_large_cold_mb_s:.0f} MB/s{resumes}"
        )
    window = f"{f.window_bytes // MiB} MiB" if f.window_bytes else "none"
    runs = "/".join(str(s.runs) for s in f.sizes)
    lines.append(
        f"medians of {runs} run(s); raw = {f.raw_message // KiB} KiB QoS 1 messages, one"
        f" publisher to one subscriber; proxy send window {window}; MB = 10^6 bytes"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=5,
        help="timed runs per size; 10x that for 1 MiB (default 5)",
    )  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="1 MiB only, 10 runs (CI)")
    parser.add_argument(
        "--window-mib",
        type=int,
        default=DEFAULT_WINDOW_BYTES // MiB,
        help="proxy send window per answer in MiB; 0 for none (default %(default)s)",
    )
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")
    options = parser.parse_args(argv)
    sizes = SIZES[:1] if options.smoke else SIZES
    repeats = 1 if options.smoke else max(1, options.repeats)
    window = options.window_mib * MiB or None
    figures = measure(sizes, repeats, window)
    if options.output == "json":
        print(json.dumps(asdict(figures)))
    else:
        print(report(figures))
    return 0 if figures.passed or options.smoke else 1


if __name__ == "__main__":
    raise SystemExit(main())
