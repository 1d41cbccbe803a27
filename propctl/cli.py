"""``propctl``: parse options, call one ``reconciler`` function, render, map errors to exit codes.

Imports of the reconciler happen inside commands so that ``propctl --help`` starts fast.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from schemas.connection import (
    DEFAULT_BROKER,
    ENV_BROKER,
    ENV_CA_FILE,
    ENV_CHANNEL,
    ENV_DOMAIN,
    ENV_PASSWORD,
    ENV_REGISTRY_PASSWORD,
    ENV_REGISTRY_USERNAME,
    ENV_USERNAME,
    BrokerSettings,
    ConnectionSettingsError,
    broker_settings,
)

if TYPE_CHECKING:
    from reconciler.converge import Outcome
    from reconciler.plan import Action
    from reconciler.source import Source

EXIT_OK = 0
EXIT_DIFFERENCES = 1  # diff found differences, or an apply action failed
EXIT_FAILED = 1
EXIT_INVALID = 2  # invalid input or usage
EXIT_UNREACHABLE = 3  # the fleet (broker) could not be reached

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("propctl")


class Failure(click.ClickException):
    """An error with an exit code and an optional hint, printed as ``error: ...``."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)
        if self.hint:
            click.echo(f"hint: {self.hint}", err=True)


class Invalid(Failure):
    exit_code = EXIT_INVALID


class Unreachable(Failure):
    exit_code = EXIT_UNREACHABLE


class Failed(Failure):
    exit_code = EXIT_FAILED


def _setup_logging(verbose: int) -> None:
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def handle_errors(func: F) -> F:
    """The one place where library errors become messages and exit codes."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from reconciler.broker import FleetUnreachable
        from reconciler.loader import InvalidManifests
        from reconciler.source import SourceError

        verbose = kwargs.get("verbose", 0)
        _setup_logging(verbose)
        try:
            return func(*args, **kwargs)
        except InvalidManifests as exc:
            for problem in exc.problems:
                click.echo(str(problem), err=True)
            count = len(exc.problems)
            raise Invalid(
                f"{count} problem{'s' if count != 1 else ''} in manifests; nothing was applied"
            ) from None
        except SourceError as exc:
            raise Invalid(str(exc), "check --repo, --ref and --path") from None
        except FleetUnreachable as exc:
            raise Unreachable(
                str(exc), f"check --broker or {ENV_BROKER} and the credentials"
            ) from None
        except ConnectionSettingsError as exc:
            raise Invalid(str(exc)) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if verbose:
                raise
            raise Failed(f"{type(exc).__name__}: {exc}", "run with -v for the traceback") from None

    return wrapper  # type: ignore[return-value]


def fleet_options(func: F) -> F:
    options = [
        click.option("--broker", envvar=ENV_BROKER, default=DEFAULT_BROKER, show_default=True,
                     help=f"mqtt://host:port or mqtts://host:port [env {ENV_BROKER}]"),
        click.option("--domain", envvar=ENV_DOMAIN, default="default", show_default=True,
                     help=f"[env {ENV_DOMAIN}]"),
        click.option("--channel", envvar=ENV_CHANNEL, default="default", show_default=True,
                     help=f"[env {ENV_CHANNEL}]"),
        click.option("--username", envvar=ENV_USERNAME, default=None, help=f"[env {ENV_USERNAME}]"),
        click.option("--password", envvar=ENV_PASSWORD, default=None, help=f"[env {ENV_PASSWORD}]"),
        click.option("--ca-file", envvar=ENV_CA_FILE, default=None,
                     help=f"CA bundle for mqtts:// [env {ENV_CA_FILE}]"),
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


def source_options(func: F) -> F:
    options = [
        click.option("-f", "--file", "file", type=click.Path(path_type=Path), default=None,
                     help="A manifest file or directory (no Git)."),
        click.option("--repo", default=None, help="Git URL of the desired state (file:// works)."),
        click.option("--ref", default=None, help="Branch, tag or commit [default: HEAD]."),
        click.option("--path", "repo_path", default=".", show_default=True,
                     help="Directory of manifests inside the repository."),
        click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                     help="Where clones and locks live [env PROPELLER_CACHE_DIR]."),
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


verbose_option = click.option("-v", "--verbose", count=True, help="More logging; tracebacks.")
insecure_registry_option = click.option(
    "--insecure-registry",
    is_flag=True,
    help="Talk to registries over plain HTTP (a registry on loopback): module.image and a"
    " job's output.image. Credentials from"
    " PROPELLER_REGISTRY_USERNAME / PROPELLER_REGISTRY_PASSWORD.",
)


def output_option(*choices: str) -> Callable[[F], F]:
    return click.option(
        "-o", "--output", type=click.Choice(choices), default=choices[0], show_default=True
    )


def make_settings(kw: dict[str, Any]) -> BrokerSettings:
    return broker_settings(
        kw["broker"], domain=kw["domain"], channel=kw["channel"], username=kw["username"],
        password=kw["password"], ca_file=kw["ca_file"],
    )  # fmt: skip


def make_source(kw: dict[str, Any]) -> Source:
    from reconciler.source import GitSource, LocalSource

    if (kw["file"] is None) == (kw["repo"] is None):
        raise Invalid("give exactly one of -f PATH or --repo URL")
    if kw["file"] is not None:
        return LocalSource(kw["file"])
    return GitSource(kw["repo"], kw["ref"], kw["repo_path"], kw["cache_dir"])


def progress_printer(quiet: bool) -> Callable[[str], None]:
    def emit(line: str) -> None:
        if not quiet:
            click.echo(f"... {line}", err=True)

    return emit


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="propeller", prog_name="propctl")
def main() -> None:
    """Converge a fleet of WebAssembly runtimes to the desired state kept in Git."""


@main.command()
@source_options
@output_option("text", "json")
@verbose_option
@handle_errors
def validate(output: str, verbose: int, **kw: Any) -> None:
    """Check manifests: every problem at once, each with file:line (exit 0 or 2)."""
    from reconciler.loader import InvalidManifests
    from reconciler.reconcile import fetch_desired

    try:
        revision, desired = fetch_desired(make_source(kw))
    except InvalidManifests as exc:
        if output == "json":
            problems = [dataclasses.asdict(p) for p in exc.problems]
            click.echo(_json({"valid": False, "problems": problems}), nl=False)
            sys.exit(EXIT_INVALID)
        raise
    if output == "json":
        click.echo(_json({"valid": True, "revision": revision.id, "tasks": len(desired.tasks),
                          "jobs": len(desired.jobs), "files": sorted(revision.files)}),
                   nl=False)  # fmt: skip
    else:
        jobs = f" and {len(desired.jobs)} federated job(s)" if desired.jobs else ""
        click.echo(
            f"valid: {len(desired.tasks)} task(s){jobs} in {len(revision.files)} file(s)"
            f" at {revision.short}"
        )


def _action_dict(action: Action) -> dict[str, Any]:
    return {
        "action": action.kind,
        "task": action.task,
        "proplet": action.proplet,
        "reason": action.reason,
        "old_hash": action.old_hash,
        "new_hash": action.new_hash,
    }


def _json(value: Any) -> str:
    from propctl.render import to_json

    return to_json(value)


@main.command("diff")
@source_options
@fleet_options
@click.option("--prune", is_flag=True, help="Show removals of tasks deleted from Git.")
@insecure_registry_option
@output_option("text", "json")
@verbose_option
@handle_errors
def diff_command(
    prune: bool, insecure_registry: bool, output: str, verbose: int, **kw: Any
) -> None:
    """Show what apply would do (exit 0 in sync, 1 differences, 2 error)."""
    from reconciler.reconcile import PassOptions, diff

    options = PassOptions(
        prune=prune, cache_dir=kw["cache_dir"], insecure_registry=insecure_registry
    )
    revision, plan = diff(make_source(kw), make_settings(kw), options)
    changes = [a for a in plan.actions if a.kind != "unchanged"]
    if output == "json":
        click.echo(_json([_action_dict(a) for a in changes]), nl=False)
    else:
        for action in changes:
            click.echo(_diff_line(action))
        unchanged = len(plan.actions) - len(changes)
        click.echo(f"{len(changes)} change(s), {unchanged} unchanged at {revision[:12]}", err=True)
    sys.exit(EXIT_DIFFERENCES if changes else EXIT_OK)


_SIGNS = {"create": "+", "update": "~", "delete": "-", "pending": "!", "orphan": "?"}


def _diff_line(action: Action) -> str:
    sign = _SIGNS.get(action.kind, " ")
    where = f" on {action.proplet}" if action.proplet else ""
    hashes = ""
    if action.kind == "update":
        hashes = f" ({action.old_hash} -> {action.new_hash})"
    reason = f": {action.reason}" if action.reason and action.kind != "update" else ""
    line = f"{sign} {action.kind:<7} {action.task}{where}{hashes}{reason}"
    colour = {"+": "green", "-": "red", "~": "yellow", "!": "magenta"}.get(sign)
    return click.style(line, fg=colour) if colour and sys.stdout.isatty() else line


@main.command()
@source_options
@fleet_options
@click.option(
    "--prune", is_flag=True, help="Stop tasks removed from Git (only those propctl owns)."
)
@click.option("--dry-run", is_flag=True, help="Plan and print, send nothing.")
@click.option(
    "--wait", is_flag=True,
    help="Wait until every task is Running or Completed, and run federated jobs to their end.",
)  # fmt: skip
@click.option("--timeout", default="60s", show_default=True, help="How long to wait.")
@click.option(
    "--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Where federated jobs keep their checkpoints (default: in the cache directory).",
)  # fmt: skip
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@insecure_registry_option
@output_option("text", "json")
@verbose_option
@handle_errors
def apply(
    prune: bool, dry_run: bool, wait: bool, timeout: str, state_dir: Path | None, quiet: bool,
    insecure_registry: bool, output: str, verbose: int, **kw: Any,
) -> None:  # fmt: skip
    """Run one reconcile pass: publish the desired set of every proplet whose set changed."""
    from reconciler.reconcile import PassOptions, reconcile
    from schemas.quantities import parse_duration_ms

    try:
        seconds = parse_duration_ms(timeout) / 1000
    except ValueError as exc:
        raise Invalid(f"--timeout: {exc}") from None
    options = PassOptions(
        prune=prune, dry_run=dry_run, wait=wait, timeout=seconds, cache_dir=kw["cache_dir"],
        insecure_registry=insecure_registry, state_dir=state_dir,
    )  # fmt: skip
    result = reconcile(make_source(kw), make_settings(kw), options, progress_printer(quiet))
    if output == "json":
        click.echo(_json({
            "revision": result.revision,
            "dry_run": dry_run,
            "actions": [_outcome_dict(o) for o in result.outcomes],
            "in_sync": result.in_sync,
            "timings": {k: round(v, 4) for k, v in result.timings.items()},
            "jobs": [job.model_dump(mode="json") for job in result.jobs],
        }), nl=False)  # fmt: skip
    else:
        from propctl.render import table

        rows = [
            (o.action.kind, o.action.task, o.action.proplet, o.outcome, o.detail)
            for o in result.outcomes
        ]
        click.echo(table(["action", "task", "proplet", "outcome", "detail"], rows), nl=False)
        if result.jobs:
            from propctl.render import job_rows

            click.echo()
            click.echo(table(*job_rows(result.jobs)), nl=False)
        state = "in sync" if result.in_sync else "not in sync"
        click.echo(f"revision {result.revision[:12]}: {state}", err=True)
    sys.exit(EXIT_DIFFERENCES if result.failed else EXIT_OK)


def _outcome_dict(outcome: Outcome) -> dict[str, Any]:
    return {**_action_dict(outcome.action), "outcome": outcome.outcome, "detail": outcome.detail}


@main.command()
@click.argument("kind", type=click.Choice(["proplets", "tasks", "jobs"]))
@click.argument("name", required=False)
@click.option(
    "--chart", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="jobs NAME: also write accuracy and loss per round as an SVG image to this file.",
)  # fmt: skip
@fleet_options
@output_option("table", "json", "yaml")
@verbose_option
@handle_errors
def get(
    kind: str, name: str | None, chart: Path | None, output: str, verbose: int, **kw: Any
) -> None:
    """Show live proplets, tasks or federated jobs, read from the broker.

    `get jobs` lists every job; `get jobs NAME` shows that job round by round.
    """
    from propctl.render import table, to_yaml
    from reconciler.inventory import proplet_rows, task_rows
    from reconciler.reconcile import connected

    if kind == "jobs":
        _get_jobs(name, chart, output, kw)
        return
    if name is not None or chart is not None:
        raise Invalid("NAME and --chart apply to 'get jobs' only")

    with connected(make_settings(kw), results=kind == "tasks") as (_broker, view):
        rows: list[Any] = view.read(task_rows if kind == "tasks" else proplet_rows)
    records = [dataclasses.asdict(r) for r in rows]
    if output == "json":
        click.echo(_json(records), nl=False)
    elif output == "yaml":
        click.echo(to_yaml(records), nl=False)
    elif kind == "tasks":
        columns = ["name", "proplet", "state", "result", "error", "restarts", "spec_hash"]
        click.echo(table(columns, [[r[c] for c in columns] for r in records]), nl=False)
    else:
        columns = ["id", "alive", "runtime", "labels", "tasks", "max_tasks"]
        click.echo(table(columns, [[r[c] for c in columns] for r in records]), nl=False)


def _get_jobs(name: str | None, chart: Path | None, output: str, kw: dict[str, Any]) -> None:
    from propctl.render import job_rows, round_rows, table, to_yaml
    from reconciler.broker import Broker
    from reconciler.coordinator import read_jobs

    with Broker(make_settings(kw)) as broker:
        jobs = read_jobs(broker)
    if name is not None:
        jobs = [job for job in jobs if job.job == name]
        if not jobs:
            raise Failed(f"no federated job {name!r}", "see propctl get jobs")
    if chart is not None:
        from propctl.chart import job_chart

        if len(jobs) != 1:
            raise Invalid("--chart needs one job: propctl get jobs NAME --chart FILE.svg")
        chart.write_text(job_chart(jobs[0]))
        click.echo(f"wrote {chart}", err=True)
    records = [job.model_dump(mode="json") for job in jobs]
    if output == "json":
        click.echo(_json(records), nl=False)
    elif output == "yaml":
        click.echo(to_yaml(records), nl=False)
    elif name is not None:
        columns, rows = round_rows(jobs[0])
        click.echo(table(columns, rows), nl=False)
        job = jobs[0]
        line = f"job {job.job}: {job.phase.value}, round {job.round}/{job.rounds}"
        click.echo(line + (f": {job.reason}" if job.reason else ""), err=True)
    else:
        columns, rows = job_rows(jobs)
        click.echo(table(columns, rows), nl=False)


@main.command()
@click.argument("task")
@click.option("--proplet", default=None, help="Only the run on this proplet.")
@fleet_options
@output_option("text", "json")
@verbose_option
@handle_errors
def logs(task: str, proplet: str | None, output: str, verbose: int, **kw: Any) -> None:
    """Print a task's last result, stdout and stderr."""
    from reconciler.inventory import task_results
    from reconciler.reconcile import connected

    with connected(make_settings(kw), results=True) as (_broker, view):
        results = view.read(lambda d: task_results(d, task))
    if proplet is not None:
        results = [r for r in results if r.proplet == proplet]
    if not results:
        raise Failed(f"no result for task {task!r}",
                      "it may not have run yet: see propctl get tasks")  # fmt: skip
    if output == "json":
        click.echo(_json([r.model_dump(mode="json") for r in results]), nl=False)
        return
    for r in results:
        outcome = ",".join(r.result) if r.result is not None else f"exit code {r.exit_code}"
        click.echo(f"== {r.task} on {r.proplet}: {r.state.value} (run {r.runs}) {outcome}")
        if r.error:
            click.echo(f"error: {r.error}")
        if r.stdout:
            click.echo(r.stdout, nl=not r.stdout.endswith("\n"))
        if r.stderr:
            click.echo(r.stderr, nl=not r.stderr.endswith("\n"), err=True)
        if r.truncated:
            click.echo("(output truncated)")


@main.command(short_help="Try it: a local fleet, applied, shown, stopped.")
@click.option("--keep-running", is_flag=True, help="Keep the fleet up until Ctrl-C.")
@verbose_option
@handle_errors
def quickstart(keep_running: bool, verbose: int) -> None:
    """Run a whole fleet on this machine with nothing else installed, then stop it.

    Starts an embedded MQTT broker on 127.0.0.1 and three proplets, commits examples/quickstart
    to a new Git repository, applies it (like apply --wait), prints the tasks and their results,
    and stops everything it started. Needs the extra: pip install 'propeller[quickstart]'.
    """
    from propctl.quickstart import run

    sys.exit(run(keep_running=keep_running, verbose=verbose))


@main.command()
@click.option("--repo", required=True, help="Git URL of the desired state (file:// works).")
@click.option("--ref", default=None, help="Branch or tag to follow [default: HEAD].")
@click.option("--path", "repo_path", default=".", show_default=True)
@click.option("--interval", default="60s", show_default=True, help="Time between passes.")
@click.option(
    "--listen",
    default=None,
    metavar="HOST:PORT",
    help="HTTP listener for webhooks, /healthz, /readyz and /metrics.",
)
@click.option(
    "--webhook-secret-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Secret for webhook signatures (required for webhooks).",
)
@click.option("--prune", is_flag=True, help="Stop tasks removed from Git (only propctl's own).")
@click.option(
    "--lost-after",
    default="15s",
    show_default=True,
    help="Offline this long, a proplet's unpinned tasks move elsewhere.",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Where serve keeps its state [default: CACHE_DIR/serve].",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where clones and locks live [env PROPELLER_CACHE_DIR].",
)
@insecure_registry_option
@fleet_options
@verbose_option
@handle_errors
def serve(
    repo: str, ref: str | None, repo_path: str, interval: str, listen: str | None,
    webhook_secret_file: Path | None, prune: bool, lost_after: str, state_dir: Path | None,
    cache_dir: Path | None, insecure_registry: bool, verbose: int, **kw: Any,
) -> None:  # fmt: skip
    """Reconcile continuously: on a timer, on push webhooks, and when proplets are lost."""
    import signal

    from reconciler.serve import ServeOptions, Server
    from reconciler.source import GitSource, default_cache_dir
    from schemas.quantities import parse_duration_ms

    if verbose == 0:
        logging.getLogger().setLevel(logging.INFO)
    try:
        every = parse_duration_ms(interval) / 1000
        lost = parse_duration_ms(lost_after) / 1000
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    secret = webhook_secret_file.read_bytes().strip() if webhook_secret_file else None
    if secret is not None and not secret:
        raise Invalid(f"{webhook_secret_file} is empty")
    address = _listen_address(listen) if listen else None
    cache = cache_dir or default_cache_dir()
    options = ServeOptions(
        interval=every, prune=prune, lost_after=lost, state_dir=state_dir or cache / "serve",
        cache_dir=cache, insecure_registry=insecure_registry,
    )  # fmt: skip
    server = Server(GitSource(repo, ref, repo_path, cache), make_settings(kw), options)

    def on_signal(_signum: int, _frame: object) -> None:
        log.info("stopping after the pass in flight")
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    listener = None
    if address is not None:
        from reconciler.webhook import HttpListener

        listener = HttpListener(
            address[0], address[1], secret=secret, on_push=server.on_push,
            health=lambda: not server.stopping, ready=server.ready.is_set,
            metrics=server.metrics.render,
            on_webhook=lambda provider, result: server.metrics.webhooks.inc(
                provider=provider, result=result),
        )  # fmt: skip
        listener.start()
        log.info("listening on %s", listener.url)
    try:
        server.run()
    finally:
        if listener is not None:
            listener.stop()


def _listen_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise Invalid(f"--listen {text!r}: use HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]"), int(port)


@main.command()
@fleet_options
@output_option("text", "json")
@verbose_option
@handle_errors
def status(output: str, verbose: int, **kw: Any) -> None:
    """Show where propctl serve stands: revisions, sync, last error, tasks by state."""
    from reconciler.broker import Broker
    from reconciler.serve import read_status

    with Broker(make_settings(kw)) as broker:
        found = read_status(broker)
    if found is None:
        raise Failed("no status on the broker: is propctl serve running for this fleet?")
    if output == "json":
        click.echo(_json(found.model_dump(mode="json")), nl=False)
        return
    tasks = ", ".join(f"{n} {s}" for s, n in sorted(found.tasks.items())) or "none"
    lines = [
        f"reconciler:      {found.reconciler}",
        f"source:          {found.source}",
        f"in sync:         {'yes' if found.in_sync else 'no'}",
        f"last applied:    {found.last_applied_revision or '-'}",
        f"last attempted:  {found.last_attempted_revision or '-'}",
        f"last error:      {found.last_error or '-'}",
        f"last pass:       {_when(found.last_pass_at)} ({found.last_pass_seconds or 0:.2f} s);"
        f" {found.passes} passes",
        f"proplets:        {found.proplets_alive} alive of {found.proplets}",
        f"tasks:           {tasks}",
    ]
    click.echo("\n".join(lines))


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    import datetime

    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- push: a Wasm module into an OCI registry -----------------------------------------------

# The same names as reconciler.registry's; repeated so that `propctl --help` imports no oras.


def _annotations(pairs: tuple[str, ...]) -> dict[str, str]:
    found: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise Invalid(f"--annotation {pair!r}: use KEY=VALUE, e.g. org.example.team=edge")
        found[key.strip()] = value
    return found


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("reference")
@click.option(
    "--annotation",
    "annotation",
    multiple=True,
    metavar="KEY=VALUE",
    help="Manifest annotation (repeatable).",
)
@click.option("--insecure", is_flag=True, help="Plain HTTP, for a registry on loopback.")
@click.option(
    "--username", envvar=ENV_REGISTRY_USERNAME, default=None, help=f"[env {ENV_REGISTRY_USERNAME}]"
)
@click.option(
    "--password", envvar=ENV_REGISTRY_PASSWORD, default=None, help=f"[env {ENV_REGISTRY_PASSWORD}]"
)
@output_option("text", "json")
@verbose_option
@handle_errors
def push(
    file: Path, reference: str, annotation: tuple[str, ...], insecure: bool,
    username: str | None, password: str | None, output: str, verbose: int,
) -> None:  # fmt: skip
    """Push a Wasm module to an OCI registry; print the manifest digest.

    REFERENCE is registry/repository[:tag], e.g. localhost:5000/hello:1.0 (tag latest when
    omitted). The artifact follows the CNCF Wasm OCI layout, so Task manifests can name it in
    module.image and other Wasm tools can pull it.
    """
    from reconciler.registry import (
        CredentialsRefused,
        InvalidReference,
        NotWasmArtifact,
        RegistryClient,
        RegistryError,
        RegistryUnreachable,
        parse_reference,
    )

    annotations = _annotations(annotation)
    if (username is None) != (password is None):
        raise Invalid(
            "give both --username and --password (or neither)",
            f"or set {ENV_REGISTRY_USERNAME} and {ENV_REGISTRY_PASSWORD}",
        )
    try:
        ref = parse_reference(reference)
        with RegistryClient(username, password, insecure=insecure) as client:
            result = client.push_wasm(file, ref, annotations)
    except (InvalidReference, NotWasmArtifact) as exc:
        raise Invalid(str(exc)) from None
    except CredentialsRefused as exc:
        raise Unreachable(
            str(exc), f"give --username and --password, or set {ENV_REGISTRY_USERNAME} and"
            f" {ENV_REGISTRY_PASSWORD}",
        ) from None  # fmt: skip
    except RegistryUnreachable as exc:
        raise Unreachable(
            str(exc), "check the registry host and port; --insecure for plain HTTP on loopback"
        ) from None
    except RegistryError as exc:
        raise Failed(str(exc)) from None
    except OSError as exc:
        raise Invalid(f"cannot read {file}: {exc.strerror or exc}") from None
    if output == "json":
        click.echo(_json({
            "reference": str(result.reference),
            "manifest_digest": result.manifest_digest,
            "layer_digest": result.layer_digest,
            "size": result.size,
            "pinned": str(result.pinned),
        }), nl=False)  # fmt: skip
    else:
        click.echo(result.manifest_digest)
        click.echo(f"pushed {result.reference} ({result.size} bytes) as {result.pinned}", err=True)


# -- proxy: OCI modules for proplets that cannot reach the registry -------------------------


@main.command()
@click.option("--insecure", is_flag=True, help="Plain HTTP, for a registry on loopback.")
@click.option(
    "--registry-username",
    envvar=ENV_REGISTRY_USERNAME,
    default=None,
    help=f"Registry login [env {ENV_REGISTRY_USERNAME}].",
)
@click.option(
    "--registry-password",
    envvar=ENV_REGISTRY_PASSWORD,
    default=None,
    help=f"Registry password [env {ENV_REGISTRY_PASSWORD}].",
)
@click.option(
    "--cache-size",
    default="256Mi",
    show_default=True,
    help="Bound on pulled modules kept in memory (64Mi, 1Gi, or bytes).",
)
@click.option(
    "--workers", type=click.IntRange(1, 256), default=8, show_default=True,
    help="Requests answered at once (pulls included).",
)  # fmt: skip
@fleet_options
@verbose_option
@handle_errors
def proxy(
    insecure: bool, registry_username: str | None, registry_password: str | None,
    cache_size: str, workers: int, verbose: int, **kw: Any,
) -> None:  # fmt: skip
    """Serve modules of OCI images to proplets over MQTT, pulling them from their registry.

    Answers the artifact requests that name an image (proplet --pull mqtt, boards): pulls the
    module's blob, checks its sha256, and sends it in the chunk size each requester asks for.
    Runs until SIGTERM or Ctrl-C.
    """
    import signal
    import threading
    from uuid import uuid4

    from reconciler.broker import Broker
    from reconciler.proxy import RegistryProxy
    from reconciler.registry import RegistryClient
    from schemas.quantities import parse_memory

    if verbose == 0:
        logging.getLogger().setLevel(logging.INFO)
    if (registry_username is None) != (registry_password is None):
        raise Invalid(
            "give both --registry-username and --registry-password (or neither)",
            f"or set {ENV_REGISTRY_USERNAME} and {ENV_REGISTRY_PASSWORD}",
        )
    try:
        cache_bytes = parse_memory(cache_size)
    except ValueError as exc:
        raise Invalid(f"--cache-size: {exc}") from None
    settings = make_settings(kw)
    stopping = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with (
        RegistryClient(registry_username, registry_password, insecure=insecure) as client,
        Broker(settings, client_id=f"propctl-proxy-{uuid4().hex[:12]}") as broker,
    ):
        server = RegistryProxy(
            broker, settings.namespace, client, cache_bytes=cache_bytes, workers=workers
        )
        server.start()
        log.info("answering artifact requests on %s", settings.namespace.artifact_request())
        while not stopping.wait(1.0):
            pass
        log.info("stopping after the answers in progress")
        server.stop()
        stats = server.stats
        log.info(
            "served %d answer(s) and %d refusal(s); %d pull(s), %d cache hit(s)",
            stats.offers, stats.refusals, stats.pulls, stats.cache_hits,
        )  # fmt: skip
