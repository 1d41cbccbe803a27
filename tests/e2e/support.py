"""What the end-to-end tests drive and watch: ``propctl`` as a subprocess, and the desired sets.

``Propctl`` runs ``python -m propctl`` with the fleet and cache dir of one test in its
environment. ``DesiredWatch`` records every desired set published on the broker (retained ones
first), so a test can tell whether a pass published anything at all.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from reconciler.broker import Broker
from schemas.connection import broker_settings
from schemas.messages import DesiredSet, decode
from schemas.topics import Kind
from tests.gitrepo import GitRepo

REPO_ROOT = Path(__file__).resolve().parents[2]
WASM_DIR = REPO_ROOT / "tests" / "wasm"


@dataclass(frozen=True)
class Result:
    """One finished ``propctl`` command."""

    args: tuple[str, ...]
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def __str__(self) -> str:
        return (
            f"propctl {' '.join(self.args)} -> exit {self.code}\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )


class Propctl:
    """``propctl`` as a user runs it, against one test's broker and cache directory."""

    def __init__(self, broker_url: str, tmp: Path) -> None:
        self.cwd = tmp
        self.cache_dir = tmp / "cache"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROPELLER_")}
        env.update(
            PYTHONPATH=str(REPO_ROOT),
            PROPELLER_BROKER=broker_url,
            PROPELLER_CACHE_DIR=str(self.cache_dir),
        )
        self.env = env

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "propctl", *args]

    def run(self, *args: str, timeout: float = 60.0) -> Result:
        done = subprocess.run(
            self.command(*args),
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return Result(tuple(args), done.returncode, done.stdout, done.stderr)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.command(*args),
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def ok(self, *args: str, code: int = 0) -> Result:
        """Run and check the exit code, showing the whole output when it differs."""
        result = self.run(*args)
        assert result.code == code, str(result)
        return result

    def tasks(self) -> dict[tuple[str, str], dict[str, Any]]:
        """``propctl get tasks -o json`` rows by (task, proplet)."""
        rows = self.ok("get", "tasks", "-o", "json").json()
        return {(row["name"], row["proplet"]): row for row in rows}


class DesiredWatch:
    """Every desired set on the broker, in order of arrival: the retained ones, then new ones."""

    def __init__(self, broker_url: str) -> None:
        settings = broker_settings(broker_url)
        self.ns = settings.namespace
        self.sets: list[tuple[str, DesiredSet]] = []
        self._cond = threading.Condition()
        self._markers: set[str] = set()
        self._marker_topic = f"{self.ns.root}/observers/e2e-{uuid.uuid4().hex[:12]}"
        self.client = Broker(settings, client_id=f"e2e-watch-{uuid.uuid4().hex[:8]}")
        self.client.connect()
        self.client.subscribe(self._marker_topic, self._on_marker, qos=1)
        self.client.subscribe(f"{self.ns.root}/proplets/+/desired", self._on_desired, qos=1)
        self.sync()

    def sync(self, timeout: float = 5.0) -> list[tuple[str, DesiredSet]]:
        """Every set published before this call, once the broker has delivered them all.

        The broker delivers to one client in order, so a marker published now arrives after
        every set the broker received before it.
        """
        marker = uuid.uuid4().hex
        self.client.publish(self._marker_topic, marker.encode(), qos=1)
        with self._cond:
            if not self._cond.wait_for(lambda: marker in self._markers, timeout):
                raise AssertionError(f"the watch marker did not come back in {timeout}s")
            return list(self.sets)

    def generations(self) -> dict[str, int]:
        """The generation of the latest set of each proplet."""
        return {proplet: desired.generation for proplet, desired in self.sync()}

    def latest(self, proplet: str) -> DesiredSet:
        return next(d for p, d in reversed(self.sync()) if p == proplet)

    def close(self) -> None:
        self.client.close()

    def _on_marker(self, _topic: str, payload: bytes, _retained: bool) -> None:
        with self._cond:
            self._markers.add(payload.decode())
            self._cond.notify_all()

    def _on_desired(self, topic: str, payload: bytes, _retained: bool) -> None:
        parsed = self.ns.parse(topic)
        if parsed.kind is not Kind.DESIRED or not payload:
            return
        with self._cond:
            self.sets.append((parsed.proplet, decode(DesiredSet, payload)))
            self._cond.notify_all()


def task_manifest(name: str, module: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "propeller/v1",
        "kind": "Task",
        "metadata": {"name": name},
        "spec": {"module": {"file": module}, **spec},
    }


def to_yaml(*documents: dict[str, Any]) -> str:
    """Documents as one YAML stream (written here, not with the code under test)."""
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    parts = []
    for document in documents:
        out = io.StringIO()
        yaml.dump(document, out)
        parts.append(out.getvalue())
    return "---\n".join(parts)


def actions_by_task(report: dict[str, Any]) -> dict[tuple[str, str | None], dict[str, Any]]:
    """``apply -o json`` actions by (task, proplet)."""
    return {(a["task"], a["proplet"]): a for a in report["actions"]}


# Module files as the test repositories hold them (see the ``repo`` fixture).
ADD = "modules/add.wasm"
HELLO = "modules/hello.wasm"
SLEEPY = "modules/sleepy.wasm"  # no args: sleeps forever without burning CPU (a daemon)

ADD_TASK = task_manifest("add", ADD, function="add", args=["40", "2"])
HELLO_TASK = task_manifest(
    "hello", HELLO, args=["one", "two"], env={"GREETING": "hi"}, stdin="from stdin\n"
)
TICKER_TASK = task_manifest("ticker", SLEEPY, daemon=True, placement={"spread": "all"})


def apply(propctl: Propctl, repo: GitRepo, *args: str, code: int = 0) -> dict[str, Any]:
    """``propctl apply --repo REPO -o json ARGS`` (exit ``code``): the parsed report."""
    command = ("apply", "--repo", repo.url, "--timeout", "20s", "-o", "json", *args)
    report: dict[str, Any] = propctl.ok(*command, code=code).json()
    return report
