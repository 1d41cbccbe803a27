"""A fleet of emulated boards: converge time of one task on every board, and memory per board.

Against a real Mosquitto on loopback, one emulator process (``python -m zephyr.host.emulator
--boards N``) runs N boards, each a board core (``libpropeller_board.so``) with its own arena
and MQTT connection, Wasm on one shared wasmtime engine. One ``Task`` with ``placement:
{runtime: wamr, spread: all}`` (``add`` of ``tests/wasm/add.wasm``, from a local directory of
manifests) is applied with the reconciler's library API and ``wait``, as ``propctl apply -f DIR
--wait`` does. Every board fetches the module over MQTT in its small chunks and runs it.

* converge: from the start of the pass to the last of the N ``TaskResult`` messages reporting
  ``Completed`` with ``42`` (stamped in this process's MQTT callback); the pass's own duration
  and stage timings beside it, and the time the N boards took to come online.
* memory per board: VmRSS of the emulator process with N boards minus VmRSS of a process with
  one board after the same work, divided by N - 1; the total VmRSS beside it.

There is no goal; the figures are printed.

    python benchmarks/board_fleet.py [--boards N] [--smoke] [-o json]

Progress goes to stderr, figures to stdout. ``--smoke`` (what CI runs) uses 5 boards. A fleet
that does not converge is an error, with or without ``--smoke``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reconciler.broker import Broker
from reconciler.reconcile import PassOptions, reconcile
from reconciler.source import LocalSource
from schemas.connection import broker_settings
from schemas.messages import Presence, TaskResult, TaskState, decode
from schemas.topics import Kind, Namespace
from tests.broker import Mosquitto
from tests.process import terminate
from zephyr.host.library import ENV_LIBRARY

REPO_ROOT = Path(__file__).resolve().parent.parent
ADD_WASM = REPO_ROOT / "tests" / "wasm" / "add.wasm"
HEARTBEAT_S = 2.0
ONLINE_TIMEOUT_S = 20.0
CONVERGE_TIMEOUT_S = 30.0
IDLE_BEFORE_RSS_S = 1.0
TASK = "sum"

MANIFEST = f"""\
apiVersion: propeller/v1
kind: Task
metadata:
  name: {TASK}
spec:
  module:
    file: add.wasm
  function: add
  args: ["2", "40"]
  placement:
    runtime: wamr
    spread: all
"""


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def proc_status_kb(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status, e.g. VmRSS."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/{pid}/status")


def kb_to_mb(kb: float) -> float:
    return kb * 1024 / 1e6


class Watch:
    """Presence and task results of the fleet, stamped on arrival in the MQTT callback."""

    def __init__(self, client: Broker, ns: Namespace) -> None:
        self.ns = ns
        self._cond = threading.Condition()
        self.online: dict[str, float] = {}
        self.completed: dict[str, float] = {}
        self.failed: dict[str, str] = {}
        client.subscribe(f"{ns.root}/proplets/+/presence", self._on_message, qos=0)
        client.subscribe(ns.fleet_results(), self._on_message, qos=0)

    def _on_message(self, topic: str, payload: bytes, _retained: bool) -> None:
        stamp = time.perf_counter()
        if not payload:
            return
        parsed = self.ns.parse(topic)
        with self._cond:
            if parsed.kind is Kind.PRESENCE and decode(Presence, payload).online:
                self.online.setdefault(parsed.proplet, stamp)
            elif parsed.kind is Kind.RESULT and parsed.task == TASK:
                result = decode(TaskResult, payload)
                if result.state is TaskState.COMPLETED and result.result == ["42"]:
                    self.completed.setdefault(parsed.proplet, stamp)
                else:
                    self.failed[parsed.proplet] = f"{result.state}: {result.error}"
            self._cond.notify_all()

    def wait(
        self, what: str, count: int, timeout: float, process: subprocess.Popen[bytes]
    ) -> float:
        """perf_counter when ``count`` boards are online / completed; raises on a failure."""
        seen = self.online if what == "online" else self.completed
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(seen) < count:
                if self.failed:
                    raise RuntimeError(f"tasks failed: {dict(list(self.failed.items())[:5])}")
                if process.poll() is not None:
                    raise RuntimeError(f"the emulator exited with code {process.returncode}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(seen)} of {count} boards {what} after {timeout} s")
                self._cond.wait(min(remaining, 0.5))
            return max(seen.values())


@dataclass
class Round:
    boards: int
    online_s: float  # emulator started -> every board's presence online
    converge_s: float  # pass started -> every board's result Completed
    pass_s: float  # reconcile() with wait, start to return
    timings: dict[str, float]
    rss_kb: int
    peak_kb: int


def run_round(tmp: Path, boards: int) -> Round:
    """One emulator process with ``boards`` boards, on its own broker, through one apply."""
    work = tmp / f"round-{boards}"
    manifests = work / "fleet"
    manifests.mkdir(parents=True)
    (manifests / "sum.yaml").write_text(MANIFEST)
    shutil.copyfile(ADD_WASM, manifests / "add.wasm")
    mosquitto = Mosquitto(work / "broker")
    process: subprocess.Popen[bytes] | None = None
    client: Broker | None = None
    log_path = work / "emulator.log"
    try:
        mosquitto.start()
        settings = broker_settings(mosquitto.url)
        client = Broker(settings, client_id=f"board-fleet-{boards}")
        client.connect()
        watch = Watch(client, settings.namespace)
        # The broker comes from the command line; only the library's location is inherited.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("PROPELLER_") or k == ENV_LIBRARY
        }
        env["PYTHONPATH"] = str(REPO_ROOT)
        progress(f"starting {boards} board(s) in one emulator process on {mosquitto.url}")
        started = time.perf_counter()
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "zephyr.host.emulator", "--broker", mosquitto.url,
                 "--boards", str(boards), "--heartbeat", str(HEARTBEAT_S)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work,
            )  # fmt: skip
        try:
            online_at = watch.wait("online", boards, ONLINE_TIMEOUT_S, process)
            progress(f"  online in {online_at - started:.2f} s; applying {TASK} (spread: all)")
            pass_started = time.perf_counter()
            result = reconcile(
                LocalSource(manifests),
                settings,
                PassOptions(wait=True, timeout=CONVERGE_TIMEOUT_S, cache_dir=work / "cache"),
            )
            pass_s = time.perf_counter() - pass_started
            if result.failed:
                outcomes = {
                    (o.action.proplet, o.outcome, o.detail)
                    for o in result.outcomes
                    if o.outcome != "completed"
                }
                raise RuntimeError(f"apply failed: {sorted(outcomes, key=str)[:5]}")
            completed_at = watch.wait("completed", boards, CONVERGE_TIMEOUT_S, process)
        except (RuntimeError, TimeoutError):
            progress(f"emulator log tail:\n{log_path.read_text(errors='replace')[-3000:]}")
            raise
        progress(f"  {boards} result(s) Completed {completed_at - pass_started:.2f} s after apply")
        time.sleep(IDLE_BEFORE_RSS_S)  # let the last reports and frees settle before reading RSS
        return Round(
            boards=boards,
            online_s=online_at - started,
            converge_s=completed_at - pass_started,
            pass_s=pass_s,
            timings={k: round(v, 4) for k, v in result.timings.items()},
            rss_kb=proc_status_kb(process.pid, "VmRSS"),
            peak_kb=proc_status_kb(process.pid, "VmHWM"),
        )
    finally:
        if process is not None:
            terminate(process, 30)
        if client is not None:
            client.close()
        mosquitto.stop()


@dataclass
class Figures:
    boards: int
    converge_s: float
    pass_s: float
    per_board_ms: float  # converge_s / boards
    online_s: float
    timings: dict[str, float]
    rss_mb: float
    rss_peak_mb: float
    rss_one_board_mb: float
    per_board_kb: float


def measure(boards: int, tmp: Path) -> Figures:
    baseline = run_round(tmp, 1)
    fleet = run_round(tmp, boards)
    per_board_kb = (fleet.rss_kb - baseline.rss_kb) / max(1, boards - 1)
    return Figures(
        boards=boards,
        converge_s=fleet.converge_s,
        pass_s=fleet.pass_s,
        per_board_ms=fleet.converge_s / boards * 1e3,
        online_s=fleet.online_s,
        timings=fleet.timings,
        rss_mb=kb_to_mb(fleet.rss_kb),
        rss_peak_mb=kb_to_mb(fleet.peak_kb),
        rss_one_board_mb=kb_to_mb(baseline.rss_kb),
        per_board_kb=per_board_kb * 1024 / 1000,
    )


def report(f: Figures) -> str:
    stages = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in f.timings.items())
    return "\n".join(
        (
            f"converge: {f.boards} boards, one task each, apply -> all Completed"
            f" {f.converge_s:.2f} s ({f.per_board_ms:.1f} ms per board);"
            f" the pass itself {f.pass_s:.2f} s ({stages})",
            f"  {f.boards} boards came online in {f.online_s:.2f} s",
            f"memory: {f.per_board_kb:.0f} kB per board"
            f" ((RSS with {f.boards} - RSS with 1) / {max(1, f.boards - 1)});"
            f" total RSS {f.rss_mb:.1f} MB (peak {f.rss_peak_mb:.1f} MB),"
            f" one board {f.rss_one_board_mb:.1f} MB",
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--boards", type=int, default=200, help="boards (default 200)")
    parser.add_argument("--smoke", action="store_true", help="5 boards (CI)")
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")
    options = parser.parse_args(argv)
    boards = 5 if options.smoke else max(2, options.boards)
    with tempfile.TemporaryDirectory(prefix="board-fleet-") as tmp_name:
        figures = measure(boards, Path(tmp_name))
    if options.output == "json":
        print(json.dumps(asdict(figures)))
    else:
        print(report(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
