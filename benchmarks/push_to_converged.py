"""From ``git push`` to every changed task Running, through a post-receive webhook and serve.

Everything is real and on loopback: Mosquitto, 10 proplet processes (``python -m proplet``,
16 slots each), a bare Git repository with 100 daemon tasks in files of 10
(``tests/wasm/sleepy.wasm``: a WASI command that sleeps in one-second naps, so a hundred of them
leave the CPUs idle) and ``propctl serve`` as a subprocess (``--interval 300s``, so only webhooks
trigger passes, ``--listen`` on a free port, ``-vv`` for its stage log lines). The bare
repository has an executable ``post-receive`` hook (Python, stdlib only) that posts the signed
generic webhook (``X-Signature-256: sha256=<HMAC-SHA256 of the body>``, body
``{"ref": ..., "after": ...}``) with the secret file serve reads.

Each push changes the spec of 10 random tasks (an env var), commits, and is timed from just
before ``git push`` until every changed task is reported Running with a spec hash other than the
one it had (this process's own MQTT subscription to the retained state messages, QoS 0; the new
hash is then checked against the desired set serve published). p50 and p90 over ``--pushes``
pushes (after one untimed warm-up push); goal: p50 < 1 s for 100 tasks on 10 proplets.

The total splits into consecutive parts, median of each printed:

* git push + hook: the ``git push`` command; the hook runs inside it (the pass overlaps its end);
* push -> pass start: from before ``git push`` to the start of serve's pass (``last_pass_at`` of
  the reconciler status serve publishes after each pass);
* fetch+load, observe, plan: between the pass start and serve's log lines (``revision ...`` of
  the loader at debug level, ``observed ...``, ``planned ...``; millisecond stamps);
* converge: from ``planned`` to the end of the pass (start + ``last_pass_seconds``): publish the
  changed desired sets and wait until the proplets report the new generation, then the pass's
  bookkeeping; ``published ...`` splits off the publish;
* last changed task reported Running, relative to the end of the pass (before it when the
  proplets were quicker than serve's bookkeeping: the status publish, its state file).

``propeller_pass_duration_seconds`` from ``/metrics`` checks that each push ran exactly one pass
and gives its duration. The peer, measured in the same run on the same fleet: the same kind of
change pushed with the hook moved aside (after the timed pushes), then ``propctl apply --wait``
run as from a terminal (a subprocess, interpreter start-up included), timed from before the push
to every changed task Running (the same end point) and to the command's exit. The push without
the hook also shows what the hook (a Python start-up and one HTTP request) adds to ``git push``.

    python benchmarks/push_to_converged.py [--smoke] [--pushes N] [-o json]

Progress goes to stderr, figures to stdout. The exit code is 1 when the goal is missed (never
with ``--smoke``, which is what CI runs: 3 pushes, 20 tasks on 3 proplets). A push that does not
converge, or that runs other than one pass, is an error, with or without ``--smoke``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reconciler.broker import Broker
from reconciler.source import ENV_CACHE_DIR
from schemas.connection import broker_settings
from schemas.messages import (
    DecodeError,
    DesiredSet,
    ReconcilerStatus,
    ReportedState,
    TaskState,
    decode,
)
from schemas.topics import Namespace
from tests.broker import Mosquitto, free_port
from tests.fleet import REPO_ROOT, WASM_DIR, Fleet, Proplet
from tests.gitrepo import GitRepo

GOAL_S = 1.0
MAX_TASKS = 16
HEARTBEAT = "5s"  # the agent's default; the test fleet's 0.5 s adds messages for nothing
TASKS_PER_FILE = 10
MANIFESTS = "manifests"
MODULE = "modules/sleepy.wasm"
ONLINE_TIMEOUT_S = 120.0
STEP_TIMEOUT_S = 60.0
# Between pushes: serve starts at most one webhook-triggered pass a second (a burst of pushes
# coalesces), so pushes a second apart each get a pass of their own right away.
SETTLE_S = 1.0
ENV_BROKER = "PROPELLER_BROKER"

HOOK = """\
#!{python}
# post-receive: ask propctl serve for a pass with a signed generic webhook, one per pushed ref.
import hashlib, hmac, json, sys, urllib.request

URL = {url!r}
SECRET_FILE = {secret_file!r}

secret = open(SECRET_FILE, "rb").read().strip()
for line in sys.stdin:
    _old, new, ref = line.split()
    body = json.dumps({{"ref": ref, "after": new}}).encode()
    signature = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    request = urllib.request.Request(URL, data=body, method="POST", headers={{
        "Content-Type": "application/json", "X-Signature-256": signature}})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print("webhook:", response.status, response.read().decode())
    except Exception as exc:
        print("webhook failed:", exc)
        sys.exit(1)
"""


@dataclass(frozen=True)
class Size:
    tasks: int
    proplets: int
    pushes: int
    changed: int  # tasks changed per push
    peer_runs: int


FULL = Size(tasks=100, proplets=10, pushes=20, changed=10, peer_runs=5)
SMOKE = Size(tasks=20, proplets=3, pushes=3, changed=2, peer_runs=1)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in 0..100)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    known = [v for v in values if not math.isnan(v)]
    return statistics.median(known) if known else math.nan


# -- the Git side -------------------------------------------------------------------------------


def run_git(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """git with a fixed identity and no user config (like ``tests.gitrepo.git``)."""
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    done = subprocess.run(
        ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.org", *args],
        cwd=cwd, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done


class Manifests:
    """``n`` daemon tasks over files of ``TASKS_PER_FILE``; each task has a VERSION env var."""

    def __init__(self, repo: GitRepo, n: int) -> None:
        self.repo = repo
        self.names = [f"d{i:03d}" for i in range(n)]
        self.versions = dict.fromkeys(self.names, 0)

    def write(self) -> None:
        for f in range(0, len(self.names), TASKS_PER_FILE):
            documents = [
                "apiVersion: propeller/v1\n"
                "kind: Task\n"
                f"metadata: {{name: {name}}}\n"
                f"spec: {{module: {{file: {MODULE}}}, env: {{VERSION: '{self.versions[name]}'}},"
                " daemon: true}\n"
                for name in self.names[f : f + TASKS_PER_FILE]
            ]
            self.repo.write(
                f"{MANIFESTS}/tasks-{f // TASKS_PER_FILE:02d}.yaml", "---\n".join(documents)
            )

    def bump(self, names: Sequence[str]) -> None:
        for name in names:
            self.versions[name] += 1
        self.write()


def install_hook(bare: Path, url: str, secret_file: Path) -> Path:
    hook = bare / "hooks" / "post-receive"
    hook.write_text(HOOK.format(python=sys.executable, url=url, secret_file=str(secret_file)))
    hook.chmod(0o755)
    return hook


# -- watching the fleet -------------------------------------------------------------------------


@dataclass
class Converged:
    at: float  # wall clock when the last changed task was first reported Running, new hash
    hashes: dict[str, tuple[str, str]]  # task -> (proplet, new spec hash)


class Watcher:
    """This process's own view: retained states, desired sets and serve's status, stamped.

    While armed with the old spec hashes of the changed tasks, each state message is checked in
    the MQTT callback, so the moment a task is first reported Running with another hash is its
    arrival time here.
    """

    def __init__(self, url: str, ns: Namespace) -> None:
        self.ns = ns
        self._cond = threading.Condition()
        self.states: dict[str, ReportedState] = {}
        self.desired: dict[str, DesiredSet] = {}
        self.status: ReconcilerStatus | None = None
        self._old: dict[str, str] = {}
        self._seen: dict[str, tuple[float, str, str]] = {}  # task -> (wall, proplet, hash)
        self.client = Broker(broker_settings(url), client_id="push-bench")
        self.client.connect()
        self.client.subscribe(f"{ns.root}/proplets/+/state", self._on_state, qos=0)
        self.client.subscribe(f"{ns.root}/proplets/+/desired", self._on_desired, qos=0)
        self.client.subscribe(ns.status(), self._on_status, qos=0)

    def close(self) -> None:
        self.client.close()

    def _on_state(self, topic: str, payload: bytes, _retained: bool) -> None:
        now = time.time()
        if not payload:
            return
        try:
            state = decode(ReportedState, payload)
        except DecodeError:
            return
        with self._cond:
            self.states[state.proplet] = state
            for task in state.tasks:
                old = self._old.get(task.name)
                if (
                    old is not None
                    and task.name not in self._seen
                    and task.spec_hash != old
                    and task.state is TaskState.RUNNING
                ):
                    self._seen[task.name] = (now, state.proplet, task.spec_hash)
            self._cond.notify_all()

    def _on_desired(self, topic: str, payload: bytes, _retained: bool) -> None:
        if not payload:
            return
        try:
            desired = decode(DesiredSet, payload)
        except DecodeError:
            return
        with self._cond:
            self.desired[topic.split("/")[-2]] = desired
            self._cond.notify_all()

    def _on_status(self, _topic: str, payload: bytes, _retained: bool) -> None:
        if not payload:
            return
        try:
            status = decode(ReconcilerStatus, payload)
        except DecodeError:
            return
        with self._cond:
            self.status = status
            self._cond.notify_all()

    def wait(
        self, predicate: Callable[[], bool], what: str, timeout: float = STEP_TIMEOUT_S
    ) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")

    def running(self) -> dict[str, tuple[str, str]]:
        """task -> (proplet, spec hash) of every task reported Running (call with the lock)."""
        found = {}
        for proplet, state in self.states.items():
            for task in state.tasks:
                if task.state is TaskState.RUNNING:
                    found[task.name] = (proplet, task.spec_hash)
        return found

    def wait_all_running(self, names: Sequence[str], timeout: float = STEP_TIMEOUT_S) -> None:
        self.wait(lambda: set(names) <= set(self.running()), f"{len(names)} tasks Running", timeout)

    def arm(self, names: Sequence[str]) -> None:
        """Watch ``names``: record when each is first reported Running with a new spec hash."""
        with self._cond:
            running = self.running()
            missing = [n for n in names if n not in running]
            if missing:
                raise RuntimeError(f"tasks not Running before the push: {missing}")
            self._old = {n: running[n][1] for n in names}
            self._seen = {}

    def converged(self, timeout: float = STEP_TIMEOUT_S) -> Converged:
        names = list(self._old)
        self.wait(
            lambda: len(self._seen) == len(names), f"{len(names)} changed tasks Running", timeout
        )
        with self._cond:
            seen, self._old = dict(self._seen), {}
            # The new hash must be the one serve (or apply) published for that task.
            for name, (_at, proplet, spec_hash) in seen.items():
                desired = self.desired.get(proplet)
                wanted = (
                    next((t.spec_hash for t in desired.tasks if t.name == name), None)
                    if desired
                    else None
                )
                if wanted != spec_hash:
                    raise RuntimeError(f"{name} on {proplet} runs {spec_hash}, desired {wanted}")
        return Converged(
            max(at for at, _p, _h in seen.values()), {n: (p, h) for n, (_a, p, h) in seen.items()}
        )

    def wait_status(
        self, revision: str, passes: int, timeout: float = STEP_TIMEOUT_S
    ) -> ReconcilerStatus:
        """serve's status after its ``passes``-th pass, which applied ``revision``."""

        def done() -> bool:
            s = self.status
            return s is not None and s.passes >= passes and s.last_attempted_revision == revision

        self.wait(done, f"serve's pass {passes} at {revision[:12]}", timeout)
        assert self.status is not None
        return self.status


# -- serve, its log and its metrics -------------------------------------------------------------

_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ ([\w.]+): (.*)$")


def log_time(date: str, millis: str) -> float:
    return time.mktime(time.strptime(date, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000


class ServeLog:
    """Reads the lines serve logged since the last read; stamps are local time, milliseconds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read(self) -> list[tuple[float, str, str]]:
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        lines = []
        for raw in data[:end].decode(errors="replace").splitlines():
            match = _LOG_LINE.match(raw)
            if match:
                lines.append((log_time(match[1], match[2]), match[3], match[4]))
        return lines

    def tail(self, chars: int = 4000) -> str:
        return self.path.read_text(errors="replace")[-chars:]


def first(lines: Sequence[tuple[float, str, str]], logger: str, prefix: str, after: float) -> float:
    for stamp, name, message in lines:
        if name == logger and message.startswith(prefix) and stamp >= after:
            return stamp
    return math.nan


def pass_metrics(listen: str) -> tuple[float, int]:
    """(sum, count) of ``propeller_pass_duration_seconds`` from serve's /metrics."""
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("propeller_pass_duration_seconds_sum", "propeller_pass_duration_seconds_count"):
            values[name] = float(value)
    return values["propeller_pass_duration_seconds_sum"], int(
        values["propeller_pass_duration_seconds_count"]
    )


def wait_ready(listen: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"propctl serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://{listen}/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"propctl serve not ready on {listen} within {timeout:g} s")


# -- one push -------------------------------------------------------------------------------------


@dataclass
class PushFigures:
    total_s: float  # before git push -> every changed task Running, new hash
    git_push_s: float  # the git push command, hook included
    to_pass_s: float  # before git push -> pass start
    to_webhook_s: float  # before git push -> serve logged the webhook (part of to_pass_s)
    fetch_load_s: float
    observe_s: float
    plan_s: float
    converge_s: float  # planned -> pass end
    publish_s: float  # planned -> desired sets published (part of converge)
    after_pass_s: float  # pass end -> last changed task Running
    pass_s: float  # the pass, from /metrics
    hook_output: str


@dataclass
class PeerFigures:
    total_s: float  # before git push -> every changed task Running
    exit_s: float  # before git push -> propctl apply --wait exited
    git_push_s: float  # without the hook
    apply_s: float  # the propctl apply --wait subprocess
    timings: dict[str, float]  # apply's own stage timings (-o json)


class Bench:
    def __init__(self, tmp: Path, size: Size) -> None:
        self.tmp = tmp
        self.size = size
        self.rng = random.Random(7)
        self.mosquitto = Mosquitto(tmp / "broker")
        self.fleet: Fleet | None = None
        self.watcher: Watcher | None = None
        self.serve: subprocess.Popen[bytes] | None = None
        self.log: ServeLog | None = None
        self.listen = f"127.0.0.1:{free_port()}"
        self.repo = GitRepo(tmp / "git")
        self.manifests = Manifests(self.repo, size.tasks)
        self.cache = tmp / "cache"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            ENV_CACHE_DIR: str(self.cache),
        }
        self.passes = 0
        self.hook: Path | None = None

    @property
    def w(self) -> Watcher:
        assert self.watcher is not None
        return self.watcher

    def start(self) -> None:
        size = self.size
        self.mosquitto.start()
        self.env[ENV_BROKER] = self.mosquitto.url
        progress(
            f"broker {self.mosquitto.url}; {size.proplets} proplets, {size.tasks} daemon tasks"
        )
        self.repo.copy(WASM_DIR / "sleepy.wasm", MODULE)
        self.manifests.write()
        first_sha = self.repo.push(f"{size.tasks} daemons")
        secret_file = self.tmp / "webhook-secret"
        secret_file.write_text(secrets.token_hex(32))
        self.hook = install_hook(
            self.repo.bare, f"http://{self.listen}/webhook/generic", secret_file
        )

        (self.tmp / "fleet").mkdir()
        self.fleet = Fleet(self.mosquitto, self.tmp / "fleet")
        for n in range(size.proplets):
            self.fleet.start_proplet(
                f"p{n:02d}", "--max-tasks", str(MAX_TASKS), "--heartbeat", HEARTBEAT,
                wait=False, verbose=False,
            )  # fmt: skip
        ids = [p.id for p in self.fleet.proplets]
        self.fleet.wait(
            lambda o: all(o.presence.get(p) is True and p in o.states for p in ids),
            timeout=ONLINE_TIMEOUT_S,
            what=f"{len(ids)} proplets online",
        )
        # This process watches with its own client; the fleet's observer would decode every
        # message twice, and its artifact server must not answer for serve.
        self.fleet.server.stop()
        self.fleet.client.close()
        self.watcher = Watcher(self.mosquitto.url, self.fleet.ns)

        log_path = self.tmp / "serve.log"
        command = [
            sys.executable, "-m", "propctl", "serve", "--repo", self.repo.url, "--ref", "main",
            "--path", MANIFESTS, "--interval", "300s", "--listen", self.listen,
            "--webhook-secret-file", str(secret_file), "--state-dir", str(self.tmp / "state"),
            "-vv",
        ]  # fmt: skip
        with log_path.open("ab") as log:
            self.serve = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp
            )
        self.log = ServeLog(log_path)
        progress(f"propctl serve on {self.listen} (pid {self.serve.pid}); first pass")
        wait_ready(self.listen, self.serve)
        self.w.wait_status(first_sha, 1, timeout=ONLINE_TIMEOUT_S)
        self.w.wait_all_running(self.manifests.names, timeout=ONLINE_TIMEOUT_S)
        self.passes = pass_metrics(self.listen)[1]
        self.log.read()
        progress(f"  {size.tasks} tasks Running")

    def close(self) -> None:
        if self.serve is not None and self.serve.poll() is None:
            self.serve.terminate()
            try:
                self.serve.wait(10)
            except subprocess.TimeoutExpired:
                self.serve.kill()
                self.serve.wait(5)
        if self.watcher is not None:
            self.watcher.close()
        if self.fleet is not None:
            for proplet in self.fleet.proplets:
                if proplet.process.poll() is None:
                    proplet.process.terminate()
            for proplet in self.fleet.proplets:
                stop_proplet(proplet)
            self.fleet.close()
        self.mosquitto.stop()

    def change(self, label: str) -> tuple[list[str], str]:
        """Bump the spec of ``changed`` random tasks and commit; (names, commit sha)."""
        names = sorted(self.rng.sample(self.manifests.names, self.size.changed))
        self.manifests.bump(names)
        return names, self.repo.commit(label)

    def push(self, label: str) -> PushFigures:
        assert self.log is not None
        names, sha = self.change(label)
        sum_before, count_before = pass_metrics(self.listen)
        self.w.arm(names)
        wall0 = time.time()
        started = time.perf_counter()
        done = run_git(self.repo.work, "push", "origin", "main")
        git_push_s = time.perf_counter() - started
        converged = self.w.converged()
        self.passes += 1
        status = self.w.wait_status(sha, self.passes)
        if status.last_applied_revision != sha or status.last_error:
            raise RuntimeError(f"pass at {sha[:12]} failed: {status.last_error}")
        sum_after, count_after = pass_metrics(self.listen)
        if count_after != count_before + 1:
            raise RuntimeError(f"{count_after - count_before} passes ran for one push")
        lines = self.log.read()
        assert status.last_pass_at is not None and status.last_pass_seconds is not None
        pass_start = status.last_pass_at
        pass_end = pass_start + status.last_pass_seconds
        after = pass_start - 0.001  # log stamps are truncated to the millisecond
        webhook = first(lines, "reconciler.webhook", "webhook generic push", wall0 - 0.001)
        loaded = first(lines, "reconciler.loader", "revision ", after)
        observed = first(lines, "reconciler.serve", "observed ", after)
        planned = first(lines, "reconciler.serve", "planned ", after)
        published = first(lines, "reconciler.serve", "published ", after)
        hook = " ".join(line.strip() for line in done.stderr.splitlines() if "webhook" in line)
        if "202" not in hook:
            raise RuntimeError(f"the hook did not deliver the webhook: {done.stderr}")
        return PushFigures(
            total_s=converged.at - wall0,
            git_push_s=git_push_s,
            to_pass_s=pass_start - wall0,
            to_webhook_s=webhook - wall0,
            fetch_load_s=loaded - pass_start,
            observe_s=observed - loaded,
            plan_s=planned - observed,
            converge_s=pass_end - planned,
            publish_s=published - planned,
            after_pass_s=converged.at - pass_end,
            pass_s=sum_after - sum_before,
            hook_output=hook,
        )

    def remove_hook(self) -> None:
        """Move the post-receive hook aside: pushes no longer trigger serve."""
        assert self.hook is not None
        self.hook.rename(self.hook.with_name("post-receive.off"))

    def peer(self, label: str) -> PeerFigures:
        """The same kind of change, pushed without the hook, then ``propctl apply --wait``."""
        names, _sha = self.change(label)
        _sum, count_before = pass_metrics(self.listen)
        self.w.arm(names)
        wall0 = time.time()
        started = time.perf_counter()
        run_git(self.repo.work, "push", "origin", "main")
        pushed = time.perf_counter()
        command = [
            sys.executable, "-m", "propctl", "apply", "--repo", self.repo.url, "--ref", "main",
            "--path", MANIFESTS, "--wait", "--timeout", f"{STEP_TIMEOUT_S:g}s", "-o", "json", "-q",
        ]  # fmt: skip
        done = subprocess.run(
            command, env=self.env, cwd=self.tmp, capture_output=True, text=True, check=False
        )
        exited = time.perf_counter()
        if done.returncode != 0:
            raise RuntimeError(f"propctl apply exited {done.returncode}: {done.stderr[-2000:]}")
        converged = self.w.converged()
        if pass_metrics(self.listen)[1] != count_before:
            raise RuntimeError("serve ran a pass during the peer run")
        return PeerFigures(
            total_s=converged.at - wall0,
            exit_s=exited - started,
            git_push_s=pushed - started,
            apply_s=exited - pushed,
            timings=json.loads(done.stdout).get("timings", {}),
        )


def stop_proplet(proplet: Proplet) -> None:
    try:
        proplet.process.wait(5.0)
    except subprocess.TimeoutExpired:
        proplet.kill()


# -- report -----------------------------------------------------------------------------------


@dataclass
class Figures:
    smoke: bool
    tasks: int
    proplets: int
    max_tasks: int
    changed: int
    pushes: int
    p50_s: float
    p90_s: float
    mean_s: float
    max_s: float
    goal_s: float
    ratio: float
    passed: bool
    parts_median_s: dict[str, float]
    warmup: PushFigures
    runs: list[PushFigures]
    peer_runs: list[PeerFigures]
    peer_p50_s: float  # push + propctl apply --wait: push -> every changed task Running
    peer_exit_p50_s: float  # push -> apply exited
    peer_git_push_p50_s: float  # the push without the hook
    peer_apply_timings_median_s: dict[str, float]
    peer_ratio: float  # webhook p50 / peer p50
    cpus: int


PARTS = (
    ("git_push_s", "git push + hook"),
    ("to_pass_s", "push -> pass start"),
    ("to_webhook_s", "push -> webhook logged"),
    ("fetch_load_s", "fetch+load"),
    ("observe_s", "observe"),
    ("plan_s", "plan"),
    ("converge_s", "converge"),
    ("publish_s", "publish"),
    ("after_pass_s", "proplets report Running"),
    ("pass_s", "pass (/metrics)"),
)


def figures_of(size: Size, smoke: bool, warmup: PushFigures, runs: list[PushFigures],
               peers: list[PeerFigures]) -> Figures:  # fmt: skip
    totals = [r.total_s for r in runs]
    p50 = percentile(totals, 50)
    peer_p50 = percentile([p.total_s for p in peers], 50)
    stages = sorted({k for p in peers for k in p.timings})
    return Figures(
        smoke=smoke,
        tasks=size.tasks,
        proplets=size.proplets,
        max_tasks=MAX_TASKS,
        changed=size.changed,
        pushes=len(runs),
        p50_s=p50,
        p90_s=percentile(totals, 90),
        mean_s=statistics.fmean(totals),
        max_s=max(totals),
        goal_s=GOAL_S,
        ratio=p50 / GOAL_S,
        passed=p50 < GOAL_S,
        parts_median_s={key: median([getattr(r, key) for r in runs]) for key, _ in PARTS},
        warmup=warmup,
        runs=runs,
        peer_runs=peers,
        peer_p50_s=peer_p50,
        peer_exit_p50_s=percentile([p.exit_s for p in peers], 50),
        peer_git_push_p50_s=percentile([p.git_push_s for p in peers], 50),
        peer_apply_timings_median_s={
            k: median([p.timings.get(k, math.nan) for p in peers]) for k in stages
        },
        peer_ratio=p50 / peer_p50,
        cpus=len(os.sched_getaffinity(0)),
    )


def relative(value: float) -> str:
    """A signed offset as words: '0.002 s before' or '0.010 s after'."""
    if math.isnan(value):
        return "n/a relative to when"
    return f"{abs(value):.3f} s {'before' if value < 0 else 'after'}"


def seconds(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f} s"


def report(f: Figures) -> str:
    m = f.parts_median_s
    verdict = "PASS" if f.passed else "MISSED"
    apply_stages = ", ".join(f"{k} {v:.3f}" for k, v in f.peer_apply_timings_median_s.items())
    return "\n".join(
        (
            f"push to converged p50 {f.p50_s:.3f} s  p90 {f.p90_s:.3f} s"
            f"  (goal < {f.goal_s:g} s, ratio {f.ratio:.3f}: {verdict});"
            f" {f.pushes} pushes, {f.changed} of {f.tasks} tasks changed each,"
            f" {f.proplets} proplets ({f.max_tasks} slots each), {f.cpus} CPUs",
            f"  mean {f.mean_s:.3f} s, max {f.max_s:.3f} s; warm-up push {f.warmup.total_s:.3f} s"
            " (not counted)",
            f"  parts (median): git push + hook {seconds(m['git_push_s'])}"
            f" (the same push without the hook: {seconds(f.peer_git_push_p50_s)});"
            f" push -> pass start {seconds(m['to_pass_s'])}"
            f" (webhook logged by serve at {seconds(m['to_webhook_s'])}),"
            f" fetch+load {seconds(m['fetch_load_s'])},"
            f" observe {seconds(m['observe_s'])}, plan {seconds(m['plan_s'])},"
            f" converge {seconds(m['converge_s'])} (publish {seconds(m['publish_s'])}),"
            f" last changed task reported Running {relative(m['after_pass_s'])} the pass ended;"
            f" whole pass per /metrics {seconds(m['pass_s'])}",
            f"  peer, same run: git push (no hook) + propctl apply --wait from a terminal:"
            f" push to converged p50 {f.peer_p50_s:.3f} s,"
            f" to apply's exit {f.peer_exit_p50_s:.3f} s"
            f" ({len(f.peer_runs)} run{'s' if len(f.peer_runs) != 1 else ''};"
            f" webhook p50 / peer p50 = {f.peer_ratio:.2f});"
            f" apply's own stages (median): {apply_stages or 'n/a'}",
        )
    )


def measure(size: Size, smoke: bool) -> Figures:
    with tempfile.TemporaryDirectory(prefix="push-to-converged-") as tmp_name:
        tmp = Path(tmp_name)
        # No clone, lock or cache may land in the user's home, here or in child processes.
        os.environ[ENV_CACHE_DIR] = str(tmp / "cache")
        bench = Bench(tmp, size)
        try:
            bench.start()
            progress("warm-up push")
            warmup = bench.push("warm-up")
            time.sleep(SETTLE_S)
            runs: list[PushFigures] = []
            for i in range(size.pushes):
                runs.append(bench.push(f"push {i + 1}"))
                r = runs[-1]
                progress(
                    f"  push {i + 1}/{size.pushes}: {r.total_s:.3f} s (git push {r.git_push_s:.3f},"
                    f" pass {r.pass_s:.3f}, after the pass {r.after_pass_s:.3f})"
                )
                time.sleep(SETTLE_S)
            peers: list[PeerFigures] = []
            bench.remove_hook()
            for i in range(size.peer_runs):
                peers.append(bench.peer(f"peer {i + 1}"))
                p = peers[-1]
                progress(
                    f"  peer {i + 1}/{size.peer_runs}: converged {p.total_s:.3f} s,"
                    f" apply exited {p.exit_s:.3f} s"
                )
                time.sleep(SETTLE_S)
        except BaseException:
            if bench.log is not None:
                progress(f"serve log tail:\n{bench.log.tail()}")
            raise
        finally:
            bench.close()
    return figures_of(size, smoke, warmup, runs, peers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="3 pushes, 20 tasks, 3 proplets (CI)")
    parser.add_argument("--pushes", type=int, default=None, help="timed pushes (default 20)")
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")
    options = parser.parse_args(argv)
    size = SMOKE if options.smoke else FULL
    if options.pushes:
        size = dataclasses.replace(size, pushes=max(1, options.pushes))
    figures = measure(size, options.smoke)
    if options.output == "json":
        print(json.dumps(asdict(figures)))
    else:
        print(report(figures))
    return 0 if figures.passed or options.smoke else 1


if __name__ == "__main__":
    raise SystemExit(main())
