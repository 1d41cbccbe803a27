"""``propctl`` on its inputs end to end: validate, diff, usage and connection errors, sources.

Invalid manifests, refs and paths exit 2 and publish nothing; an unreachable broker exits 3;
``-f PATH``, ``--ref`` and ``--path`` choose what a pass applies.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from schemas.messages import TaskState
from tests.broker import free_port
from tests.e2e.support import (
    ADD,
    ADD_TASK,
    HELLO,
    HELLO_TASK,
    WASM_DIR,
    DesiredWatch,
    Propctl,
    apply,
    task_manifest,
    to_yaml,
)
from tests.fleet import Fleet
from tests.gitrepo import GitRepo

pytestmark = pytest.mark.integration


# validate -----------------------------------------------------------------------------------------

# Line numbers matter: the test checks that each problem points at its line.
INVALID_A = """\
apiVersion: propeller/v1
kind: Task
metadata:
  name: twin
spec:
  module:
    file: modules/add.wasm
  function: add
---
apiVersion: propeller/v1
kind: Task
metadata:
  name: broken
  labels: {tier: web
spec:
  module:
    file: modules/add.wasm
"""
INVALID_B = """\
apiVersion: propeller/v1
kind: Task
metadata:
  name: twin
spec:
  module:
    file: modules/add.wasm
  functon: add
---
apiVersion: propeller/v1
kind: Task
metadata:
  name: typed
spec:
  module:
    file: modules/add.wasm
  placement:
    replicas: "3"
---
apiVersion: propeller/v1
kind: Task
metadata:
  name: late-module
spec:
  module:
    file: modules/later.wasm
"""


def test_validate_reports_every_problem_with_its_place(propctl: Propctl, repo: GitRepo) -> None:
    repo.write("fleet/a.yaml", INVALID_A)
    repo.write("fleet/b.yaml", INVALID_B)
    first = repo.push("invalid manifests")
    # The module exists in a later commit only: the earlier commit must still miss it.
    repo.copy(WASM_DIR / "add.wasm", "modules/later.wasm")
    repo.push("add the module")

    text = propctl.run("validate", "--repo", repo.url, "--ref", first)
    assert text.code == 2, str(text)
    problems = [line for line in text.stderr.splitlines() if ": error: " in line]
    places = [line.split(": error: ")[0] for line in problems]
    assert places == [
        "fleet/a.yaml:4:3",  # duplicate name
        "fleet/a.yaml:15:5",  # the unclosed flow mapping of line 14
        "fleet/b.yaml:4:3",  # duplicate name
        "fleet/b.yaml:8:3",  # unknown field
        "fleet/b.yaml:18:5",  # wrong type
        "fleet/b.yaml:26:5",  # module file missing at that commit
    ], text.stderr
    by_place = dict(zip(places, problems, strict=True))
    assert "duplicate Task name 'twin'" in by_place["fleet/a.yaml:4:3"]
    assert "fleet/b.yaml:4" in by_place["fleet/a.yaml:4:3"]
    assert "fleet/a.yaml:4" in by_place["fleet/b.yaml:4:3"]
    assert "invalid YAML" in by_place["fleet/a.yaml:15:5"]
    assert "line 14" in by_place["fleet/a.yaml:15:5"]
    assert "unknown field 'functon'" in by_place["fleet/b.yaml:8:3"]
    assert "did you mean 'function'" in by_place["fleet/b.yaml:8:3"]
    assert "replicas" in by_place["fleet/b.yaml:18:5"]
    assert "'3'" in by_place["fleet/b.yaml:18:5"]
    assert "modules/later.wasm" in by_place["fleet/b.yaml:26:5"]
    assert first in by_place["fleet/b.yaml:26:5"]
    assert text.stderr.splitlines()[-1] == "error: 6 problems in manifests; nothing was applied"
    assert text.stdout == ""

    as_json = propctl.run("validate", "--repo", repo.url, "--ref", first, "-o", "json")
    assert as_json.code == 2, str(as_json)
    report = as_json.json()
    assert report["valid"] is False
    assert [(p["file"], p["line"], p["column"], p["level"]) for p in report["problems"]] == [
        ("fleet/a.yaml", 4, 3, "error"),
        ("fleet/a.yaml", 15, 5, "error"),
        ("fleet/b.yaml", 4, 3, "error"),
        ("fleet/b.yaml", 8, 3, "error"),
        ("fleet/b.yaml", 18, 5, "error"),
        ("fleet/b.yaml", 26, 5, "error"),
    ]

    # At HEAD the module exists: that one problem is gone, the others stay.
    head = propctl.run("validate", "--repo", repo.url, "-o", "json")
    assert head.code == 2, str(head)
    assert [p["line"] for p in head.json()["problems"] if p["file"] == "fleet/b.yaml"] == [
        4,
        8,
        18,
    ]

    repo.write("fleet/a.yaml", to_yaml(ADD_TASK))
    later = task_manifest("later", "modules/later.wasm", function="add")
    repo.write("fleet/b.yaml", to_yaml(HELLO_TASK, later))
    fixed = repo.push("fix them")
    valid = propctl.run("validate", "--repo", repo.url)
    assert valid.code == 0, str(valid)
    assert valid.stdout == f"valid: 3 task(s) in 2 file(s) at {fixed[:12]}\n"
    valid_json = propctl.ok("validate", "--repo", repo.url, "-o", "json").json()
    assert valid_json == {
        "valid": True,
        "revision": fixed,
        "tasks": 3,
        "jobs": 0,
        "files": ["fleet/a.yaml", "fleet/b.yaml"],
    }


def test_usage_errors_exit_2(propctl: Propctl, tmp_path: Path) -> None:
    neither = propctl.run("apply")
    assert neither.code == 2, str(neither)
    assert "error: give exactly one of -f PATH or --repo URL" in neither.stderr
    bad_timeout = propctl.run("apply", "-f", str(tmp_path), "--timeout", "soon")
    assert bad_timeout.code == 2, str(bad_timeout)
    assert bad_timeout.stderr.startswith("error: --timeout: ")
    missing = propctl.run("validate", "-f", str(tmp_path / "missing"))
    assert missing.code == 2, str(missing)
    assert "does not exist" in missing.stderr


# diff ---------------------------------------------------------------------------------------------


def test_diff_shows_creates_then_nothing_after_apply(
    fleet: Fleet, propctl: Propctl, repo: GitRepo, watch: DesiredWatch
) -> None:
    fleet.start_proplet("p1")
    repo.write("fleet/tasks.yaml", to_yaml(ADD_TASK, HELLO_TASK))
    sha = repo.push("two tasks")

    before = propctl.run("diff", "--repo", repo.url, "-o", "json")
    assert before.code == 1, str(before)
    changes = before.json()
    assert [(c["action"], c["task"], c["proplet"]) for c in changes] == [
        ("create", "add", "p1"),
        ("create", "hello", "p1"),
    ]
    assert all(c["new_hash"] for c in changes)
    text = propctl.run("diff", "--repo", repo.url)
    assert text.code == 1, str(text)
    assert text.stdout.splitlines() == ["+ create  add on p1", "+ create  hello on p1"]
    assert f"2 change(s), 0 unchanged at {sha[:12]}" in text.stderr
    assert watch.generations() == {}, "diff must not publish"

    # Without --wait the pass still lasts until the proplet holds its modules: the tasks run
    # after propctl has gone.
    quick = apply(propctl, repo)
    assert {(a["action"], a["outcome"]) for a in quick["actions"]} == {("create", "applied")}
    added = fleet.wait_task("p1", "add", lambda t: t.state == TaskState.COMPLETED)
    assert added.result == "42"
    fleet.wait_task("p1", "hello", lambda t: t.state == TaskState.COMPLETED)
    after = propctl.run("diff", "--repo", repo.url, "-o", "json")
    assert after.code == 0, str(after)
    assert after.json() == []
    assert "0 change(s), 2 unchanged" in propctl.run("diff", "--repo", repo.url).stderr

    repo.write("fleet/broken.yaml", "apiVersion: propeller/v1\nkind: Task\nmetadata: [\n")
    repo.push("broken")
    invalid = propctl.run("diff", "--repo", repo.url)
    assert invalid.code == 2, str(invalid)
    assert "fleet/broken.yaml:" in invalid.stderr
    unknown_ref = propctl.run("diff", "--repo", repo.url, "--ref", "no-such-branch")
    assert unknown_ref.code == 2, str(unknown_ref)
    assert "hint:" in unknown_ref.stderr


# invalid input ------------------------------------------------------------------------------------


def test_invalid_manifest_stops_the_pass_before_anything_is_sent(
    fleet: Fleet, propctl: Propctl, repo: GitRepo, watch: DesiredWatch
) -> None:
    fleet.start_proplet("p1")
    repo.write("fleet/tasks.yaml", to_yaml(ADD_TASK))
    repo.push("one task")
    apply(propctl, repo, "--wait")
    published = watch.sync()

    # One good change and one broken file: neither may reach the fleet.
    repo.write("fleet/tasks.yaml", to_yaml(ADD_TASK, HELLO_TASK))
    repo.write(
        "fleet/bad.yaml",
        "apiVersion: propeller/v1\nkind: Task\nmetadata:\n  name: bad\nspec:\n"
        "  module:\n    file: modules/add.wasm\n  limits:\n    memory: lots\n",
    )
    repo.push("broken")
    result = propctl.run("apply", "--repo", repo.url, "--wait", "--timeout", "5s")
    assert result.code == 2, str(result)
    assert re.search(r"^fleet/bad\.yaml:9:\d+: error: .*memory", result.stderr, re.M), result.stderr
    assert "nothing was applied" in result.stderr
    assert result.stdout == ""
    assert watch.sync() == published
    assert [t.name for t in fleet.state("p1").tasks] == ["add"]


# fleet unreachable --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["apply", "diff", "get"])
def test_unreachable_broker_exits_3_with_a_hint(
    propctl: Propctl, tmp_path: Path, command: str
) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    shutil.copyfile(WASM_DIR / "add.wasm", manifests / "add.wasm")
    (manifests / "add.yaml").write_text(to_yaml(task_manifest("add", "add.wasm", function="add")))
    closed = f"mqtt://127.0.0.1:{free_port()}"
    args = ["get", "tasks"] if command == "get" else [command, "-f", str(manifests)]
    started = time.monotonic()
    result = propctl.run(*args, "--broker", closed)
    assert result.code == 3, str(result)
    assert time.monotonic() - started < 10
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    hints = [line for line in lines if line.startswith("hint: ")]
    assert len(errors) == 1 and len(hints) == 1, result.stderr
    assert closed in errors[0]
    assert "--broker" in hints[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


# -f PATH ------------------------------------------------------------------------------------------


def test_apply_from_a_local_directory(fleet: Fleet, propctl: Propctl, tmp_path: Path) -> None:
    fleet.start_proplet("p1")
    local = tmp_path / "local"
    (local / "wasm").mkdir(parents=True)
    shutil.copyfile(WASM_DIR / "add.wasm", local / "wasm" / "add.wasm")
    (local / "add.yaml").write_text(
        to_yaml(task_manifest("sum", "wasm/add.wasm", function="add", args=["19", "23"]))
    )
    dry = propctl.ok("apply", "-f", str(local), "--dry-run", "-o", "json").json()
    assert [(a["action"], a["outcome"]) for a in dry["actions"]] == [("create", "dry-run")]
    assert dry["dry_run"] is True
    assert fleet.state("p1").observed_generation == 0
    result = propctl.ok("apply", "-f", str(local), "--wait", "--timeout", "20s", "-o", "json")
    report = result.json()
    assert report["revision"].startswith("local:")
    assert report["in_sync"] is True
    assert [(a["action"], a["task"], a["outcome"]) for a in report["actions"]] == [
        ("create", "sum", "completed")
    ]
    assert propctl.tasks()[("sum", "p1")]["result"] == "42"
    assert fleet.state("p1").observed_generation == 1, "the dry run published a set"
    single = propctl.ok("validate", "-f", str(local / "add.yaml"))
    assert single.stdout.startswith("valid: 1 task(s) in 1 file(s)")
    both = propctl.run("apply", "-f", str(local), "--repo", "file:///nowhere")
    assert both.code == 2, str(both)


# --ref and --path ---------------------------------------------------------------------------------


def test_apply_a_tag_and_a_subdirectory(fleet: Fleet, propctl: Propctl, repo: GitRepo) -> None:
    fleet.start_proplet("p1")
    repo.write("prod/add.yaml", to_yaml(ADD_TASK))
    repo.write("staging/hello.yaml", to_yaml(HELLO_TASK))
    tagged = repo.push("v1")
    repo.tag("v1.0")
    changed = task_manifest("add", ADD, function="add", args=["1", "1"])
    repo.write("prod/add.yaml", to_yaml(changed))
    repo.write("prod/extra.yaml", to_yaml(task_manifest("extra", HELLO)))
    head = repo.push("after v1")
    assert head != tagged

    where = ("--repo", repo.url, "--ref", "v1.0", "--path", "prod")
    checked = propctl.ok("validate", *where, "-o", "json").json()
    assert (checked["revision"], checked["files"]) == (tagged, ["prod/add.yaml"])
    report = apply(propctl, repo, "--ref", "v1.0", "--path", "prod", "--wait")
    assert report["revision"] == tagged
    assert [(a["action"], a["task"], a["outcome"]) for a in report["actions"]] == [
        ("create", "add", "completed")
    ]
    rows = propctl.tasks()
    assert set(rows) == {("add", "p1")}
    assert rows[("add", "p1")]["result"] == "42"

    missing = propctl.run("apply", "--repo", repo.url, "--path", "nowhere")
    assert missing.code == 2, str(missing)
    assert "nowhere" in missing.stderr
