"""``proplet``: start one agent. Parses options, builds the agent, maps failures to exit codes."""

from __future__ import annotations

import ctypes
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

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
    ConnectionSettingsError,
    broker_settings,
)
from schemas.quantities import parse_memory
from schemas.topics import TopicError, check_segment

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

log = logging.getLogger("proplet")


def _labels(values: tuple[str, ...]) -> dict[str, str]:
    labels = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not key=value", param_hint="--label")
        labels[key] = value
    return labels


def _seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0}
    for suffix in ("ms", "s", "m"):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def _cache_bytes(text: str) -> int:
    try:
        return parse_memory(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a size: use bytes or a unit, e.g. 512Mi, 1Gi, 100M",
            param_hint="--cache-size",
        ) from None


def _few_malloc_arenas() -> None:
    """Cap glibc's per-thread malloc arenas: each task thread would otherwise keep its own,
    which shows as resident memory long after the task ended."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc
    m_arena_max = -8
    libc.mallopt(m_arena_max, 2)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--id", "proplet_id", required=True, help="Unique id of this proplet.")
@click.option("--label", "labels", multiple=True, metavar="K=V", help="A label (repeatable).")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("proplet-data"),
    show_default=True,
    help="Agent state; its data/ folder is exposed read-only to tasks at /data.",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Artifacts and precompiled modules [default: DATA_DIR/cache].",
)
@click.option("--max-tasks", type=click.IntRange(1, 1024), default=16, show_default=True)
@click.option("--heartbeat", default="5s", show_default=True, help="Heartbeat interval.")
@click.option(
    "--chunk-size",
    type=click.IntRange(64, 4 * 1024 * 1024),
    default=256 * 1024,
    show_default=True,
    help="Chunk size requested for artifact transfers.",
)
@click.option(
    "--pull",
    type=click.Choice(["direct", "mqtt"]),
    default="direct",
    show_default=True,
    help="How modules of OCI images arrive: pulled from the registry by this proplet, or"
    " requested over MQTT (no registry access needed). Modules from Git always use MQTT.",
)
@click.option(
    "--cache-size",
    default="1Gi",
    show_default=True,
    help="Bound on cached modules (512Mi, 1Gi, or bytes); least recently used are evicted.",
)
@click.option(
    "--insecure-registry",
    is_flag=True,
    help="Pull over plain HTTP instead of HTTPS (a registry on loopback or a lab network).",
)
@click.option(
    "--registry-username",
    envvar=ENV_REGISTRY_USERNAME,
    default=None,
    help=f"Registry login for --pull direct [env {ENV_REGISTRY_USERNAME}].",
)
@click.option(
    "--registry-password",
    envvar=ENV_REGISTRY_PASSWORD,
    default=None,
    help=f"Registry password [env {ENV_REGISTRY_PASSWORD}].",
)
@click.option(
    "--broker",
    envvar=ENV_BROKER,
    default=DEFAULT_BROKER,
    show_default=True,
    help=f"mqtt://host:port or mqtts://host:port [env {ENV_BROKER}].",
)
@click.option("--domain", envvar=ENV_DOMAIN, default="default", show_default=True)
@click.option("--channel", envvar=ENV_CHANNEL, default="default", show_default=True)
@click.option("--username", envvar=ENV_USERNAME, default=None)
@click.option("--password", envvar=ENV_PASSWORD, default=None)
@click.option("--ca-file", envvar=ENV_CA_FILE, default=None, help="CA bundle for mqtts://.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def main(
    proplet_id: str,
    labels: tuple[str, ...],
    data_dir: Path,
    cache_dir: Path | None,
    max_tasks: int,
    heartbeat: str,
    chunk_size: int,
    pull: str,
    cache_size: str,
    insecure_registry: bool,
    registry_username: str | None,
    registry_password: str | None,
    broker: str,
    domain: str,
    channel: str,
    username: str | None,
    password: str | None,
    ca_file: str | None,
    verbose: int,
) -> None:
    """Run a proplet: a worker that joins the fleet over MQTT and runs Wasm tasks."""
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        check_segment("proplet id", proplet_id)
        settings = broker_settings(
            broker,
            domain=domain,
            channel=channel,
            username=username,
            password=password,
            ca_file=ca_file,
        )
        interval = _seconds(heartbeat)
        cache_bytes = _cache_bytes(cache_size)
        if (registry_username is None) != (registry_password is None):
            raise ValueError(
                "give both --registry-username and --registry-password"
                f" (or {ENV_REGISTRY_USERNAME} and {ENV_REGISTRY_PASSWORD}), or neither"
            )
    except click.BadParameter as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(EXIT_USAGE)
    except (ConnectionSettingsError, TopicError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)

    _few_malloc_arenas()
    from proplet.agent import Agent, AgentConfig
    from proplet.artifacts import COMPILED_DIR
    from proplet.registry import RegistryPuller
    from proplet.runtime import Runtime
    from proplet.session import ConnectionRefused

    config = AgentConfig(
        proplet_id=proplet_id,
        labels=_labels(labels),
        data_dir=data_dir,
        cache_dir=cache_dir,
        max_tasks=max_tasks,
        heartbeat_s=interval,
        chunk_size=chunk_size,
        cache_bytes=cache_bytes,
    )
    registry = None
    if pull == "direct":
        registry = RegistryPuller(registry_username, registry_password, insecure=insecure_registry)
    elif registry_username is not None:
        log.warning("--pull mqtt: the registry credentials are not used")
    runtime = Runtime(config.artifact_dir / COMPILED_DIR)
    agent = Agent(config, settings, runtime, registry=registry)

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker = threading.Thread(target=agent.run, name="agent", daemon=True)
    worker.start()
    try:
        agent.started.wait()
        if not agent.session.wait_connected(timeout=10.0):
            log.warning("broker %s not reachable yet; still trying", settings.url)
    except ConnectionRefused as exc:
        click.echo(f"error: {exc}", err=True)
        click.echo("hint: check --username/--password (or PROPELLER_USERNAME/PASSWORD)", err=True)
        agent.stop()
        worker.join(5)
        runtime.close()
        sys.exit(EXIT_UNREACHABLE)
    while worker.is_alive():
        worker.join(0.5)
    runtime.close()
    sys.exit(EXIT_OK)
