"""``propctl quickstart``: a whole fleet on this machine, from nothing to converged and back.

It starts the embedded broker (amqtt on loopback) and three proplet processes, makes a Git
repository from ``examples/quickstart``, and applies it the way ``propctl apply --wait`` does.
Then it shows the tasks and what they returned, and stops everything it started: at once, or
with ``--keep-running`` after Ctrl-C. Everything lives in one temporary directory, removed at the
end. Progress goes to stderr; the task table, results and next steps go to stdout.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING

import click

from propctl.cli import Failed, Invalid

if TYPE_CHECKING:
    from reconciler.observe import FleetData
    from reconciler.reconcile import PassResult
    from schemas.connection import BrokerSettings

EXIT_INTERRUPTED = 130
INSTALL_HINT = "pip install 'propeller[quickstart]'   (or: pip install amqtt==0.12.1)"
# (id, labels): two proplets in zone a, one in zone b.
PROPLETS: tuple[tuple[str, dict[str, str]], ...] = (
    ("edge-a1", {"zone": "a"}),
    ("edge-a2", {"zone": "a"}),
    ("edge-b1", {"zone": "b"}),
)
HEARTBEAT = "1s"
ONLINE_TIMEOUT = 30.0
APPLY_TIMEOUT = 60.0
STOP_TIMEOUT = 5.0
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Every git command runs with these, whatever the user's Git config says.
_GIT_CONFIG = {
    "init.defaultBranch": "main",
    "user.name": "propctl quickstart",
    "user.email": "quickstart@propeller.invalid",
    "commit.gpgsign": "false",
    "core.hooksPath": "/dev/null",
}


def progress(line: str) -> None:
    click.echo(line, err=True)


def _reconcile_progress(line: str) -> None:
    click.echo(f"... {line}", err=True)


def run(*, keep_running: bool = False, verbose: int = 0) -> int:
    """The whole quickstart; returns the exit code. Cleans up on every path, Ctrl-C included."""
    try:
        import propctl.embedded_broker  # noqa: F401  (amqtt, an optional extra)
    except ImportError as exc:
        raise Invalid(
            f"the quickstart runs an embedded MQTT broker, amqtt, which is not installed ({exc})",
            INSTALL_HINT,
        ) from None
    examples = examples_dir()
    _quiet_broker_logs(verbose)
    began = time.monotonic()
    # Ctrl-C, kill and a closed terminal all end the quickstart through KeyboardInterrupt, so
    # that everything it started is stopped; SIGINT too, even if it was ignored when started.
    previous = {sig: signal.signal(sig, _interrupt) for sig in _STOP_SIGNALS}
    try:
        with _cleanup() as stack:
            code = _quickstart(stack, examples, keep_running, verbose, began)
        progress(f"stopped everything it started; {time.monotonic() - began:.1f}s in all")
        return code
    except KeyboardInterrupt:
        progress("interrupted: stopped everything the quickstart started")
        return EXIT_INTERRUPTED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _quickstart(
    stack: ExitStack, examples: Path, keep_running: bool, verbose: int, began: float
) -> int:
    from propctl.embedded_broker import EmbeddedBroker
    from reconciler.reconcile import PassOptions, reconcile
    from reconciler.source import GitSource
    from schemas.connection import broker_settings

    workdir = Path(tempfile.mkdtemp(prefix="propeller-quickstart-"))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)

    broker = EmbeddedBroker()
    broker.start()
    stack.callback(broker.stop)
    progress(f"started the embedded MQTT broker on {broker.host}:{broker.port}")
    settings = broker_settings(broker.url)

    fleet = LocalFleet(workdir / "proplets", broker.url, verbose=verbose)
    stack.callback(fleet.stop)
    fleet.start()
    names = ", ".join(f"{p.id} ({_labels_text(p.labels)}, pid {p.pid})" for p in fleet.proplets)
    progress(f"starting {len(fleet.proplets)} proplets: {names}")
    fleet.wait_online(settings, ONLINE_TIMEOUT)
    progress(f"proplets online after {time.monotonic() - began:.1f}s")

    repo = workdir / "fleet"
    commit = make_repo(examples, repo)
    url = f"file://{repo}"
    progress(f"created a Git repository from {examples}: {url} at {commit[:12]}")

    progress(f"applying revision {commit[:12]} (like propctl apply --wait)")
    cache_dir = workdir / "cache"
    options = PassOptions(wait=True, timeout=APPLY_TIMEOUT, cache_dir=cache_dir)
    result = reconcile(GitSource(url, None, ".", cache_dir), settings, options, _reconcile_progress)
    failures = _failures(result)
    verdict = "did not converge" if failures else "converged"
    progress(f"{verdict} after {time.monotonic() - began:.1f}s")

    show(settings, result)
    if keep_running:
        _next_steps_running(broker.url, repo, cache_dir, workdir)
        _wait_for_interrupt()
    else:
        _next_steps()
    progress(f"stopping {len(fleet.proplets)} proplets and the broker")
    if failures:
        raise Failed(
            "the fleet did not converge: " + "; ".join(failures),
            "run it again with --keep-running to look at the fleet, or with -v for logs",
        )
    return 0


@contextmanager
def _cleanup() -> Iterator[ExitStack]:
    """An exit stack whose callbacks (stop proplets, broker, remove files) Ctrl-C cannot cut."""
    stack = ExitStack()
    try:
        yield stack
    finally:
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _STOP_SIGNALS}
        try:
            stack.close()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _wait_for_interrupt() -> None:
    progress("the fleet keeps running; press Ctrl-C to stop it")
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        return


def _quiet_broker_logs(verbose: int) -> None:
    """amqtt logs every connection (and harmless noise at shutdown): only with -v. The state
    machine library it uses logs every transition: only with -vv."""
    import logging

    if verbose < 1:
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    if verbose < 2:
        logging.getLogger("transitions").setLevel(logging.WARNING)


def examples_dir() -> Path:
    """``examples/quickstart`` of a source checkout, or as installed under ``share/``."""
    candidates = [
        Path(__file__).resolve().parents[1] / "examples" / "quickstart",
        Path(sys.prefix) / "share" / "propeller" / "examples" / "quickstart",
    ]
    for candidate in candidates:
        if (candidate / "manifests").is_dir():
            return candidate
    raise Invalid(
        "cannot find the quickstart's manifests (examples/quickstart)",
        "install propeller from a source checkout: pip install -e '.[quickstart]'",
    )


def make_repo(source: Path, repo: Path) -> str:
    """A Git repository holding a copy of ``source``, committed; returns the commit id."""
    shutil.copytree(source, repo, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "--no-verify", "-m", "The quickstart fleet, examples/quickstart")
    return _git(repo, "rev-parse", "HEAD").strip()


def _git(repo: Path, *args: str) -> str:
    config = [option for k, v in _GIT_CONFIG.items() for option in ("-c", f"{k}={v}")]
    try:
        done = subprocess.run(
            ["git", *config, *args], cwd=repo, capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise Invalid("git is not installed", "install it, e.g. apt-get install git") from None
    if done.returncode != 0:
        raise Failed(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


@dataclass
class LocalProplet:
    id: str
    labels: dict[str, str]
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class LocalFleet:
    """Proplet processes on this machine, each with its data dir and log under ``directory``."""

    directory: Path
    broker_url: str
    verbose: int = 0
    proplets: list[LocalProplet] = field(default_factory=list)
    _logs: list[IO[bytes]] = field(default_factory=list)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        env = _child_env()
        for proplet_id, labels in PROPLETS:
            data_dir = self.directory / proplet_id
            data_dir.mkdir()
            command = [
                sys.executable, "-m", "proplet", "--id", proplet_id, "--data-dir", str(data_dir),
                "--broker", self.broker_url, "--heartbeat", HEARTBEAT,
                *(arg for k, v in labels.items() for arg in ("--label", f"{k}={v}")),
            ]  # fmt: skip
            if self.verbose:
                command.append("-v")
            log_path = self.directory / f"{proplet_id}.log"
            log = log_path.open("wb")
            self._logs.append(log)
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, cwd=self.directory,
            )  # fmt: skip
            self.proplets.append(LocalProplet(proplet_id, labels, process, log_path))

    def wait_online(self, settings: BrokerSettings, timeout: float) -> None:
        """Until every proplet is online and has reported its state; fail fast if one exits."""
        from reconciler.reconcile import connected

        ids = [p.id for p in self.proplets]

        def online(data: FleetData) -> bool:
            return all(data.presence.get(i) is True and i in data.reported for i in ids)

        deadline = time.monotonic() + timeout
        with connected(settings) as (_broker, view):
            while not view.wait(online, timeout=0.2):
                for proplet in self.proplets:
                    code = proplet.process.poll()
                    if code is not None:
                        _show_log(proplet)
                        raise Failed(f"proplet {proplet.id} exited with code {code}")
                if time.monotonic() > deadline:
                    missing = view.read(lambda d: [i for i in ids if not d.presence.get(i)])
                    for proplet in self.proplets:
                        if proplet.id in missing:
                            _show_log(proplet)
                    raise Failed(f"proplets not online after {timeout:.0f}s: {', '.join(missing)}")

    def stop(self) -> None:
        """SIGTERM to every proplet, then SIGKILL to any still running after the bound."""
        for proplet in self.proplets:
            if proplet.process.poll() is None:
                proplet.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proplet in self.proplets:
            try:
                proplet.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                progress(f"proplet {proplet.id} did not stop in {STOP_TIMEOUT:.0f}s: killing it")
                proplet.process.kill()
                proplet.process.wait()
        for log in self._logs:
            log.close()


def _child_env() -> dict[str, str]:
    """This environment without PROPELLER_* settings, able to import the ``proplet`` package."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROPELLER_")}
    spec = importlib.util.find_spec("proplet")
    if spec is not None and spec.origin is not None:
        root = str(Path(spec.origin).resolve().parents[1])
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in paths:
            env["PYTHONPATH"] = os.pathsep.join([root, *paths])
    return env


def _show_log(proplet: LocalProplet) -> None:
    tail = proplet.log_tail()
    if tail:
        progress(f"--- last lines of {proplet.id}'s log")
        progress(tail)


def _labels_text(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


# What the user sees on stdout.
TASK_COLUMNS = ["name", "proplet", "state", "result", "error", "restarts", "spec_hash"]


def show(settings: BrokerSettings, result: PassResult, results_timeout: float = 3.0) -> None:
    """The task table (as ``propctl get tasks``), then each run's result and output."""
    import dataclasses

    from propctl.render import table
    from reconciler.inventory import task_rows
    from reconciler.reconcile import connected

    def finished_have_results(data: FleetData) -> bool:
        rows = task_rows(data)
        return all((r.proplet, r.name) in data.results for r in rows if _finished(r.state))

    with connected(settings, results=True) as (_broker, view):
        # A run's result is its own retained message: wait briefly for those not in yet.
        view.wait(finished_have_results, timeout=results_timeout)
        rows, results = view.read(lambda d: (task_rows(d), dict(d.results)))
    records = [dataclasses.asdict(r) for r in rows]
    click.echo(f"Tasks at revision {result.revision[:12]}:")
    click.echo(table(TASK_COLUMNS, [[r[c] for c in TASK_COLUMNS] for r in records]), nl=False)
    click.echo()
    click.echo("Results:")
    for row in sorted(rows, key=lambda r: (r.name, r.proplet)):
        run = results.get((row.proplet, row.name))
        if run is None:
            what = "a daemon: it runs until stopped" if row.daemon else "no result yet"
            click.echo(f"== {row.name} on {row.proplet}: {row.state} ({what})")
            continue
        outcome = run.state.value
        if run.result is not None:
            outcome += ", returned " + ",".join(run.result)
        elif run.exit_code is not None:
            outcome += f", exit code {run.exit_code}"
        click.echo(f"== {row.name} on {row.proplet}: {outcome}")
        if run.error:
            click.echo(f"   error: {run.error}")
        for line in (run.stdout + run.stderr).splitlines():
            click.echo(f"   | {line}")


def _finished(state: str) -> bool:
    return state in ("Completed", "Failed")


def _failures(result: PassResult) -> list[str]:
    settled = {"applied", "running", "completed", "unchanged"}
    failures = []
    for o in result.outcomes:
        if o.outcome not in settled:
            where = f" on {o.action.proplet}" if o.action.proplet else ""
            detail = f": {o.detail}" if o.detail else ""
            failures.append(f"{o.action.task}{where} {o.outcome}{detail}")
    return failures


def _next_steps() -> None:
    click.echo()
    click.echo("Next:")
    click.echo("  propctl quickstart --keep-running   keep this fleet up and try propctl on it")
    click.echo("  examples/quickstart/README.md       what each task does; run it on your broker")


def _next_steps_running(broker_url: str, repo: Path, cache_dir: Path, workdir: Path) -> None:
    lines = [
        "",
        "The fleet keeps running until Ctrl-C. In another terminal, try:",
        f"  export PROPELLER_BROKER={broker_url} PROPELLER_CACHE_DIR={cache_dir}",
        "  propctl get proplets",
        "  propctl get tasks",
        "  propctl logs wordcount",
        "  # change the desired state in Git (say, primes below 2000000), converge again:",
        f"  cd {repo} && $EDITOR manifests/primes.yaml && git commit -am 'more primes'",
        f"  propctl apply --repo file://{repo} --prune --wait",
        f"Proplet logs: {workdir / 'proplets'}",
    ]
    for line in lines:
        click.echo(line)
