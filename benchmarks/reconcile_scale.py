"""Reconcile at scale: plan, converge a real fleet, and ``propctl --help`` start-up.

Three figures, each printed beside its limit or a peer measured in the same run:

* plan: pure ``reconciler.plan.plan`` on a synthetic fleet, 10,000 tasks over 1,000 proplets.
  The fleet has a few label groups and both runtimes; tasks use various selectors, replicas,
  pins and a few ``spread: all``. Two scenarios: onto an empty fleet, and a steady state where
  50 proplets joined, 5% of the specs changed and 2% of the tasks were removed, with every set
  of the first plan retained. Each is timed ``PLAN_REPEATS`` times; the figure compared to the
  goal (< 0.5 s) is the slower of the two medians.
* converge: a real Git repository (``file://``) holding 1,000 one-shot ``add`` tasks in 10
  manifest files plus ``modules/add.wasm``; a real Mosquitto on loopback and 50 real proplets
  (``python -m proplet``, 32 slots each). ``reconcile()`` with ``--wait`` is timed from the start
  of the pass until every task reported Completed (first apply, modules fetched over MQTT), then
  again with no changes (every action ``unchanged``, no set published; with ``--wait`` their
  outcome is the task's state, ``completed``). The same first apply without ``--wait`` (it
  returns once every proplet reported the generation and holds its module) runs on a second,
  fresh fleet of 50 proplets in another channel. No goal: the per-task cost and the pass's stage
  timings are printed beside peers measured in the same run: the plan time of the same inputs,
  the raw cost of publishing the same desired sets (retained, QoS 1) with a plain client, and
  the CPU time the proplets, the broker and this process spent during the pass (Linux /proc).
* start-up: wall time of ``python -m propctl --help`` (median of 10), goal < 0.2 s, beside the
  interpreter floor ``python -c pass`` and the import time of ``propctl.cli`` alone.

    python benchmarks/reconcile_scale.py [--smoke] [--tasks N] [--proplets N] [-o json]

Progress goes to stderr, figures to stdout. The exit code is 1 when a goal is missed (never with
``--smoke``, which is what CI runs). A converge that does not reach the expected outcomes is an
error, with or without ``--smoke``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reconciler.broker import Broker
from reconciler.desired import DesiredState, ResolvedTask
from reconciler.observed import ObservedProplet, ObservedState
from reconciler.plan import Plan, plan
from reconciler.reconcile import PassOptions, PassResult, reconcile
from reconciler.source import ENV_CACHE_DIR, GitSource
from schemas.connection import broker_settings
from schemas.manifests import TaskSpec
from schemas.messages import DesiredSet, ReportedState, Runtime
from tests.broker import Mosquitto
from tests.fleet import REPO_ROOT, WASM_DIR, Fleet, Proplet

PLAN_GOAL_S = 0.5
HELP_GOAL_S = 0.2
PLAN_REPEATS = 5
ZONES = ("a", "b", "c", "d")
TIERS = ("edge", "cloud")
MANIFEST_FILES = 10
MAX_TASKS = 32
HEARTBEAT = "5s"  # the agent's default; the test fleet's 0.5 s would add 100 messages a second
ONLINE_TIMEOUT_S = 120.0
RAW_REPEATS = 3


@dataclass(frozen=True)
class Size:
    plan_tasks: int
    plan_proplets: int
    converge_tasks: int
    converge_proplets: int
    help_runs: int
    pass_timeout_s: float


FULL = Size(10_000, 1_000, 1_000, 50, 10, 300.0)
SMOKE = Size(200, 50, 50, 5, 3, 60.0)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- plan: a synthetic fleet, pure --------------------------------------------------------------


def fleet(count: int, rng: random.Random, start: int = 0) -> list[ReportedState]:
    states = []
    for i in range(start, start + count):
        runtime = Runtime.WAMR if i % 5 == 0 else Runtime.WASMTIME
        labels = {"zone": ZONES[i % len(ZONES)], "tier": TIERS[(i // 4) % len(TIERS)]}
        states.append(
            ReportedState(
                proplet=f"proplet-{i:05d}",
                runtime=runtime,
                labels=labels,
                max_tasks=rng.choice((24, 32, 48)),
                observed_generation=0,
                ts=0.0,
            )
        )
    return states


def tasks(count: int, proplets: int, rng: random.Random, version: int = 0) -> list[ResolvedTask]:
    result = []
    for i in range(count):
        placement: dict[str, object] = {}
        roll = rng.random()
        if roll < 0.3:
            placement["selector"] = {"zone": rng.choice(ZONES)}
        elif roll < 0.45:
            placement["selector"] = {"zone": rng.choice(ZONES), "tier": rng.choice(TIERS)}
        elif roll < 0.5:
            placement["runtime"] = "wamr"
        elif roll < 0.52:
            placement["proplet"] = f"proplet-{rng.randrange(proplets):05d}"
        if roll >= 0.52:
            placement["runtime"] = rng.choice(("any", "any", "wasmtime"))
        if i < 3:
            placement = {"spread": "all", "selector": {"zone": ZONES[i]}}
        elif "proplet" not in placement and rng.random() < 0.2:
            placement["replicas"] = rng.choice((2, 3))
        spec = TaskSpec.model_validate(
            {
                "module": {"file": f"modules/m{i % 20}.wasm"},
                "function": "run",
                "args": [str(i), str(version)],
                "env": {"TASK": str(i)},
                "daemon": i % 2 == 0,
                "placement": placement,
                "limits": {"memory": "1Mi", "timeout": "30s"},
            }
        )
        digest = f"sha256:{i % 20:064x}"
        result.append(
            ResolvedTask(f"task-{i:05d}", {}, spec, digest, 1000, None, "bench.yaml", i + 1)
        )
    return result


def timed_plan(desired: DesiredState, observed: ObservedState) -> tuple[Plan, float]:
    start = time.perf_counter()
    result = plan(desired, observed, prune=True)
    return result, time.perf_counter() - start


def action_summary(result: Plan) -> str:
    counts = Counter(action.kind for action in result.actions)
    return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))


@dataclass
class PlanFigures:
    tasks: int
    proplets: int
    repeats: int
    empty_s: float  # median: onto an empty fleet
    steady_s: float  # median: joined proplets, changed and removed tasks, sets retained
    worst_s: float
    goal_s: float
    ratio: float
    passed: bool


def measure_plan(n_tasks: int, n_proplets: int) -> PlanFigures:
    progress(f"plan: {n_tasks} tasks over {n_proplets} proplets, {PLAN_REPEATS} runs each")
    rng = random.Random(42)
    reported = fleet(n_proplets, rng)
    desired = DesiredState("rev-1", tuple(tasks(n_tasks, n_proplets, rng)))
    empty = ObservedState.of(
        ObservedProplet.of(r.proplet, reported=r, alive=True) for r in reported
    )
    first, _ = timed_plan(desired, empty)

    # Steady state: the first sets are retained, a few proplets join, some specs change.
    joined = fleet(n_proplets // 20, rng, start=n_proplets)
    held: dict[str, DesiredSet] = dict(first.sets)
    observed = ObservedState.of(
        ObservedProplet.of(r.proplet, reported=r, desired=held.get(r.proplet), alive=True)
        for r in (*reported, *joined)
    )
    changed = list(desired.tasks)
    for index in rng.sample(range(n_tasks), n_tasks // 20):
        spec = changed[index].spec
        changed[index] = dataclasses.replace(
            changed[index], spec=spec.model_copy(update={"args": [*spec.args, "v2"]})
        )
    removed = set(rng.sample(range(n_tasks), n_tasks // 50))
    second_desired = DesiredState(
        "rev-2", tuple(t for i, t in enumerate(changed) if i not in removed)
    )

    medians = []
    for label, want, have in (
        ("empty fleet", desired, empty),
        ("steady", second_desired, observed),
    ):
        times = []
        for _ in range(PLAN_REPEATS):
            result, seconds = timed_plan(want, have)
            times.append(seconds)
        medians.append(statistics.median(times))
        runs = ", ".join(f"{t:.3f}" for t in times)
        progress(f"  {label}: {runs} s; {len(result.sets)} sets; {action_summary(result)}")
    worst = max(medians)
    return PlanFigures(
        tasks=n_tasks,
        proplets=n_proplets,
        repeats=PLAN_REPEATS,
        empty_s=medians[0],
        steady_s=medians[1],
        worst_s=worst,
        goal_s=PLAN_GOAL_S,
        ratio=worst / PLAN_GOAL_S,
        passed=worst < PLAN_GOAL_S,
    )


# -- converge: real Git, real Mosquitto, real proplets ------------------------------------------


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.org", *args],
        cwd=cwd, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip


def make_repo(directory: Path, n_tasks: int) -> str:
    """A Git work repository with ``n_tasks`` one-shot ``add`` tasks; returns its file:// URL."""
    directory.mkdir(parents=True)
    git(directory, "init", "-q", "-b", "main")
    (directory / "modules").mkdir()
    shutil.copyfile(WASM_DIR / "add.wasm", directory / "modules" / "add.wasm")
    manifests = directory / "manifests"
    manifests.mkdir()
    per_file = -(-n_tasks // MANIFEST_FILES)
    for f in range(MANIFEST_FILES):
        documents = [
            "apiVersion: propeller/v1\n"
            "kind: Task\n"
            f"metadata: {{name: t{i:04d}}}\n"
            f'spec: {{module: {{file: modules/add.wasm}}, function: add, args: ["{i}", "1"]}}\n'
            for i in range(f * per_file, min(n_tasks, (f + 1) * per_file))
        ]
        if documents:
            (manifests / f"tasks-{f:02d}.yaml").write_text("---\n".join(documents))
    git(directory, "add", "-A")
    git(directory, "commit", "-q", "-m", f"{n_tasks} add tasks")
    return f"file://{directory}"


def launch_fleet(mosquitto: Mosquitto, tmp: Path, channel: str, count: int) -> Fleet:
    """``count`` proplets started at once, not waited for; see ``await_online``.

    Ids differ between channels: a proplet's MQTT client id is derived from its id alone, and
    two clients with one id keep taking the session from each other.
    """
    tmp.mkdir(parents=True)
    fleet_ = Fleet(mosquitto, tmp, channel=channel)
    try:
        for n in range(count):
            fleet_.start_proplet(
                f"{channel[0]}{n:03d}", "--max-tasks", str(MAX_TASKS), "--heartbeat", HEARTBEAT,
                wait=False, verbose=False,
            )  # fmt: skip
    except BaseException:
        stop_fleet(fleet_)
        raise
    return fleet_


def await_online(fleet_: Fleet) -> None:
    """Wait until every proplet is online and has reported, then detach the fleet's observer.

    The observer would otherwise decode every state message in this process, beside the
    reconciler being measured. The proplets keep running until ``stop_fleet``.
    """
    ids = [p.id for p in fleet_.proplets]
    fleet_.wait(
        lambda o: all(o.presence.get(p) is True and p in o.states for p in ids),
        timeout=ONLINE_TIMEOUT_S,
        what=f"{len(ids)} proplets online in channel {fleet_.ns.channel!r}",
    )
    fleet_.server.stop()
    fleet_.client.close()


def stop_fleet(fleet_: Fleet) -> None:
    """SIGTERM every proplet (by its pid), SIGKILL what does not exit; then the fleet client."""
    for proplet in fleet_.proplets:
        if proplet.process.poll() is None:
            proplet.process.terminate()
    for proplet in fleet_.proplets:
        stop_proplet(proplet)
    fleet_.close()


def stop_proplet(proplet: Proplet) -> None:
    try:
        proplet.process.wait(5.0)
    except subprocess.TimeoutExpired:
        proplet.kill()


def elapsed(started: float) -> float:
    return time.perf_counter() - started


def raw_publish(url: str, payloads: Sequence[bytes]) -> float:
    """Seconds to publish ``payloads`` retained at QoS 1 with a plain client, until all acked.

    The topics are the bench's own (no proplet reads them); the retained copies are cleared.
    """
    settings = broker_settings(url, channel="raw")
    root = settings.namespace.root
    client = Broker(settings, client_id="bench-raw")
    client.connect()
    try:
        topics = [f"{root}/bench/raw/{n}" for n in range(len(payloads))]
        started = time.perf_counter()
        infos = [
            client.publish(topic, payload, qos=1, retain=True)
            for topic, payload in zip(topics, payloads, strict=True)
        ]
        for info in infos:
            info.wait_for_publish(timeout=10)
        seconds = elapsed(started)
        for info in [client.publish(topic, b"", qos=1, retain=True) for topic in topics]:
            info.wait_for_publish(timeout=10)
        return seconds
    finally:
        client.close()


@dataclass
class PassFigures:
    seconds: float
    per_task_ms: float
    fetch_load_s: float
    observe_s: float
    plan_s: float
    converge_s: float
    outcomes: dict[str, int]
    # CPU seconds spent during the pass (utime + stime; NaN where /proc is missing)
    proplets_cpu_s: float  # every proplet process, both fleets
    broker_cpu_s: float
    reconciler_cpu_s: float  # this process, every thread


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a live process so far (Linux /proc), NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_pass(
    url: str,
    mosquitto: Mosquitto,
    channel: str,
    cache: Path,
    wait: bool,
    timeout: float,
    proplet_pids: Sequence[int],
) -> tuple[PassResult, PassFigures]:
    source = GitSource(url, "main", "manifests", cache_dir=cache)
    settings = broker_settings(mosquitto.url, channel=channel)
    options = PassOptions(wait=wait, timeout=timeout, cache_dir=cache)
    proplets_cpu = sum(cpu_seconds(pid) for pid in proplet_pids)
    broker_cpu = cpu_seconds(mosquitto.pid)
    own_cpu = time.process_time()
    started = time.perf_counter()
    result = reconcile(source, settings, options, lambda line: progress(f"    ... {line}"))
    seconds = elapsed(started)
    own_cpu = time.process_time() - own_cpu
    broker_cpu = cpu_seconds(mosquitto.pid) - broker_cpu
    proplets_cpu = sum(cpu_seconds(pid) for pid in proplet_pids) - proplets_cpu
    n_tasks = len(result.outcomes)
    t = result.timings
    return result, PassFigures(
        seconds=seconds,
        per_task_ms=seconds / max(1, n_tasks) * 1e3,
        fetch_load_s=t.get("fetch_load", 0.0),
        observe_s=t.get("observe", 0.0),
        plan_s=t.get("plan", 0.0),
        converge_s=t.get("converge", 0.0),
        outcomes=dict(Counter(o.outcome for o in result.outcomes)),
        proplets_cpu_s=proplets_cpu,
        broker_cpu_s=broker_cpu,
        reconciler_cpu_s=own_cpu,
    )


def expect(result: PassResult, n_tasks: int, outcome: str, what: str) -> None:
    """Raise unless the pass has one ``outcome`` per task (a broken benchmark, not a miss)."""
    counts = Counter(o.outcome for o in result.outcomes)
    if len(result.outcomes) != n_tasks or counts != Counter({outcome: n_tasks}):
        bad = [o for o in result.outcomes if o.outcome != outcome][:5]
        raise RuntimeError(
            f"{what}: expected {n_tasks} x {outcome}, got {dict(counts)}; e.g. {bad}"
        )


@dataclass
class ConvergeFigures:
    tasks: int
    proplets: int
    max_tasks: int
    fleet_start_s: float  # both fleets, started at once, until all online
    first_wait: PassFigures  # first apply with --wait: every task Completed
    reapply: PassFigures  # the same again, no changes: nothing published
    first_nowait: PassFigures  # first apply without --wait, on a fresh fleet
    sets: int
    set_bytes_mean: float
    raw_publish_s: float  # the same desired sets published by a plain client, retained QoS 1
    plan_same_inputs_s: float  # plan() alone on the first pass's inputs (from its timings)
    cpus: int  # CPUs this process may run on


def measure_converge(tmp: Path, n_tasks: int, n_proplets: int, timeout: float) -> ConvergeFigures:
    progress(f"converge: {n_tasks} tasks onto {n_proplets} proplets over Mosquitto")
    url = make_repo(tmp / "repo", n_tasks)
    mosquitto = Mosquitto(tmp / "broker")
    fleets: list[Fleet] = []
    try:
        mosquitto.start()
        started = time.perf_counter()
        progress(f"  starting 2 x {n_proplets} proplets (channels 'wait' and 'nowait')")
        for channel in ("wait", "nowait"):
            fleets.append(launch_fleet(mosquitto, tmp / channel, channel, n_proplets))
        for fleet_ in fleets:
            await_online(fleet_)
        fleet_start = elapsed(started)
        progress(f"  {2 * n_proplets} proplets online in {fleet_start:.1f} s")
        cache = tmp / "cache"
        pids = [p.process.pid for fleet_ in fleets for p in fleet_.proplets]

        progress("  first apply --wait")
        first, first_f = timed_pass(url, mosquitto, "wait", cache, True, timeout, pids)
        expect(first, n_tasks, "completed", "first apply --wait")
        # Task tNNNN runs add(NNNN, 1); its result summary is the sum.
        wrong = [o for o in first.outcomes if o.detail != str(int(o.action.task[1:]) + 1)]
        if wrong:
            raise RuntimeError(f"unexpected results, e.g. {wrong[:3]}")
        progress("  re-apply --wait, no changes")
        again, again_f = timed_pass(url, mosquitto, "wait", cache, True, timeout, pids)
        # With --wait the outcome of an unchanged task is its state (completed): check that every
        # action is unchanged and that no set was published.
        expect(again, n_tasks, "completed", "re-apply")
        kinds = Counter(o.action.kind for o in again.outcomes)
        if kinds != Counter({"unchanged": n_tasks}) or again.plan.sets:
            raise RuntimeError(
                f"re-apply changed something: {dict(kinds)}, {len(again.plan.sets)} sets"
            )
        progress("  first apply without --wait (fresh fleet)")
        nowait, nowait_f = timed_pass(url, mosquitto, "nowait", cache, False, timeout, pids)
        expect(nowait, n_tasks, "applied", "first apply without --wait")

        payloads = [s.encode() for s in first.plan.sets.values()]
        progress(f"  raw publish of the same {len(payloads)} sets")
        raw_s = statistics.median(raw_publish(mosquitto.url, payloads) for _ in range(RAW_REPEATS))
    finally:
        for fleet_ in fleets:
            stop_fleet(fleet_)
        mosquitto.stop()
    return ConvergeFigures(
        tasks=n_tasks,
        proplets=n_proplets,
        max_tasks=MAX_TASKS,
        fleet_start_s=fleet_start,
        first_wait=first_f,
        reapply=again_f,
        first_nowait=nowait_f,
        sets=len(payloads),
        set_bytes_mean=statistics.fmean(len(p) for p in payloads),
        raw_publish_s=raw_s,
        plan_same_inputs_s=first_f.plan_s,
        cpus=len(os.sched_getaffinity(0)),
    )


# -- propctl --help start-up --------------------------------------------------------------------


IMPORT_SNIPPET = (
    "import time; s = time.perf_counter(); import propctl.cli; print(time.perf_counter() - s)"
)


def wall(argv: Sequence[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, cwd=REPO_ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return elapsed(started)


def median_of(runs: int, sample: Callable[[], float]) -> float:
    sample()  # warm the page cache and the bytecode cache
    return statistics.median(sample() for _ in range(runs))


@dataclass
class StartupFigures:
    runs: int
    help_s: float
    floor_s: float  # python -c pass
    import_cli_s: float  # import propctl.cli, timed inside the interpreter
    goal_s: float
    ratio: float
    passed: bool


def measure_startup(runs: int) -> StartupFigures:
    progress(f"start-up: propctl --help, python -c pass, import propctl.cli; {runs} runs each")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    py = sys.executable
    help_s = median_of(runs, lambda: wall([py, "-m", "propctl", "--help"], env))
    floor_s = median_of(runs, lambda: wall([py, "-c", "pass"], env))

    def import_time() -> float:
        out = subprocess.run(
            [py, "-c", IMPORT_SNIPPET], cwd=REPO_ROOT, env=env, check=True,
            capture_output=True, text=True,
        ).stdout  # fmt: skip
        return float(out)

    import_s = median_of(runs, import_time)
    return StartupFigures(
        runs=runs,
        help_s=help_s,
        floor_s=floor_s,
        import_cli_s=import_s,
        goal_s=HELP_GOAL_S,
        ratio=help_s / HELP_GOAL_S,
        passed=help_s < HELP_GOAL_S,
    )


# -- report -------------------------------------------------------------------------------------


@dataclass
class Figures:
    smoke: bool
    plan: PlanFigures
    converge: ConvergeFigures
    startup: StartupFigures


def verdict(passed: bool) -> str:
    return "PASS" if passed else "MISSED"


def pass_lines(label: str, p: PassFigures, cpus: int) -> list[str]:
    outcomes = ", ".join(f"{n} {kind}" for kind, n in sorted(p.outcomes.items()))
    n_tasks = sum(p.outcomes.values())
    return [
        f"  {label} ({outcomes}): {p.seconds:.2f} s, {p.per_task_ms:.2f} ms/task;"
        f" stages: fetch+load {p.fetch_load_s:.3f}, observe {p.observe_s:.3f},"
        f" plan {p.plan_s:.3f}, converge {p.converge_s:.3f} s",
        f"    CPU during the pass: proplets {p.proplets_cpu_s:.2f} s"
        f" ({p.proplets_cpu_s / max(1, n_tasks) * 1e3:.2f} ms/task), broker {p.broker_cpu_s:.2f} s,"
        f" reconciler {p.reconciler_cpu_s:.2f} s; {cpus} CPUs x {p.seconds:.2f} s"
        f" = {cpus * p.seconds:.2f} CPU-s available",
    ]


def report(f: Figures) -> str:
    p, c, s = f.plan, f.converge, f.startup
    first, again = c.first_wait, c.reapply
    return "\n".join(
        (
            f"plan {p.tasks} tasks / {p.proplets} proplets: {p.worst_s:.3f} s"
            f" (slower median of {p.repeats}: empty fleet {p.empty_s:.3f} s,"
            f" steady {p.steady_s:.3f} s; goal < {p.goal_s:g} s, ratio {p.ratio:.2f}:"
            f" {verdict(p.passed)})",
            f"converge {c.tasks} tasks onto {c.proplets} proplets ({c.max_tasks} slots each;"
            f" 2 x {c.proplets} proplets online in {c.fleet_start_s:.1f} s); no goal:",
            *pass_lines("first apply --wait", first, c.cpus),
            *pass_lines("re-apply --wait, no changes, nothing published", again, c.cpus),
            *pass_lines("first apply without --wait, fresh fleet", c.first_nowait, c.cpus),
            f"  peers: plan() of the first apply's inputs {c.plan_same_inputs_s * 1e3:.1f} ms"
            f" ({c.plan_same_inputs_s / first.seconds:.1%} of that pass);"
            f" fetch+load {first.fetch_load_s / first.seconds:.0%} of the first apply,"
            f" {again.fetch_load_s / again.seconds:.0%} of the re-apply;"
            f" the same {c.sets} desired sets ({c.set_bytes_mean / 1024:.1f} KiB each) published"
            f" retained at QoS 1 by a plain client: {c.raw_publish_s * 1e3:.1f} ms"
            f" (first apply {first.seconds / c.raw_publish_s:.0f}x that,"
            f" re-apply {again.seconds / c.raw_publish_s:.0f}x)",
            f"propctl --help start-up {s.help_s * 1e3:.0f} ms (median of {s.runs};"
            f" python -c pass {s.floor_s * 1e3:.0f} ms, import propctl.cli alone"
            f" {s.import_cli_s * 1e3:.0f} ms; goal < {s.goal_s * 1e3:.0f} ms,"
            f" ratio {s.ratio:.2f}: {verdict(s.passed)})",
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, quick (CI)")
    parser.add_argument("--tasks", type=int, default=None, help="plan tasks (default 10000)")
    parser.add_argument("--proplets", type=int, default=None, help="plan proplets (default 1000)")
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")
    options = parser.parse_args(argv)
    size = SMOKE if options.smoke else FULL
    size = dataclasses.replace(
        size,
        plan_tasks=options.tasks or size.plan_tasks,
        plan_proplets=options.proplets or size.plan_proplets,
    )
    with tempfile.TemporaryDirectory(prefix="reconcile-scale-") as tmp_name:
        tmp = Path(tmp_name)
        # No clone, lock or cache may land in the user's home, here or in child processes.
        os.environ[ENV_CACHE_DIR] = str(tmp / "cache")
        plan_f = measure_plan(size.plan_tasks, size.plan_proplets)
        startup_f = measure_startup(size.help_runs)
        converge_f = measure_converge(
            tmp, size.converge_tasks, size.converge_proplets, size.pass_timeout_s
        )
    figures = Figures(options.smoke, plan_f, converge_f, startup_f)
    if options.output == "json":
        print(json.dumps(asdict(figures)))
    else:
        print(report(figures))
    passed = plan_f.passed and startup_f.passed
    return 0 if passed or options.smoke else 1


if __name__ == "__main__":
    raise SystemExit(main())
