"""The loader: manifest files -> DesiredState, or every problem at once with file:line."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from reconciler.loader import InvalidManifests, Problem, load

WASM = b"\x00asm\x01\x00\x00\x00"
WASM_DIGEST = "sha256:" + hashlib.sha256(WASM).hexdigest()
OTHER = b"\x00asm\x01\x00\x00\x00\x00"
OTHER_DIGEST = "sha256:" + hashlib.sha256(OTHER).hexdigest()
MODULES = {"modules/hello.wasm": WASM, "modules/other.wasm": OTHER}

HELLO = b"""\
apiVersion: propeller/v1
kind: Task
metadata:
  name: hello
spec:
  module:
    file: modules/hello.wasm
"""


def reader(modules: dict[str, bytes] = MODULES) -> Callable[[str], bytes | None]:
    return modules.get


def problems_of(files: dict[str, bytes]) -> list[tuple[str, int, str]]:
    with pytest.raises(InvalidManifests) as raised:
        load(files, reader(), "c0ffee")
    return [(p.file, p.line, p.message) for p in raised.value.problems]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "yaml syntax error",
            b"apiVersion: propeller/v1\nkind: Task\nmetadata: {name: a\nspec: {}\n",
            [(4, "invalid YAML: ")],
        ),
        (
            "bad indentation",
            b"apiVersion: propeller/v1\nkind: Task\n  metadata: x\n",
            [(3, "invalid YAML: mapping values are not allowed in this context")],
        ),
        (
            "duplicate key",
            HELLO + b"kind: Task\n",
            [(8, 'duplicate key: found duplicate key "kind" with value "Task"')],
        ),
        (
            "unknown field",
            HELLO + b"  modul: x\n",
            [(8, "spec: unknown field 'modul' (did you mean 'module'?)")],
        ),
        (
            "unknown field without a close match",
            HELLO.replace(b"  name: hello\n", b"  name: hello\n  zzz: 1\n"),
            [(5, "metadata: unknown field 'zzz' (allowed: name, labels)")],
        ),
        (
            "wrong type",
            HELLO + b"  placement:\n    replicas: three\n",
            [(9, "spec.placement.replicas: Input should be a valid integer, got 'three'")],
        ),
        (
            "wrong type in a list",
            HELLO + b"  args:\n    - ok\n    - 42\n",
            [(10, "spec.args[1]: Input should be a valid string, got 42")],
        ),
        (
            "missing required field",
            HELLO.replace(b"  name: hello\n", b"  labels: {a: b}\n"),
            [(3, "metadata: missing required field 'name'")],
        ),
        (
            "missing top-level field",
            b"apiVersion: propeller/v1\nkind: Task\nmetadata:\n  name: a\n",
            [(1, "missing required field 'spec'")],
        ),
        (
            "validator on a mapping",
            HELLO + b"  placement:\n    replicas: 2\n    spread: all\n",
            [(8, "spec.placement: give either 'replicas' or 'spread: all', not both")],
        ),
        (
            "module file missing at the revision",
            HELLO.replace(b"modules/hello.wasm", b"modules/gone.wasm"),
            [(7, "spec.module.file: 'modules/gone.wasm' does not exist at revision c0ffee")],
        ),
        (
            "document that is a list",
            b"- apiVersion: propeller/v1\n",
            [(1, "a manifest must be a mapping with apiVersion, kind, metadata and spec;")],
        ),
        (
            "document that is a scalar",
            HELLO + b"---\njust text\n",
            [(9, "a manifest must be a mapping")],
        ),
        (
            "unknown kind",
            HELLO.replace(b"kind: Task", b"kind: Pod"),
            [(2, "unknown kind 'Pod' (known kinds: FederatedJob, Task)")],
        ),
        (
            "wrong apiVersion",
            HELLO.replace(b"propeller/v1", b"propeller/v2"),
            [(1, "apiVersion must be propeller/v1, got 'propeller/v2'")],
        ),
        (
            "missing kind",
            HELLO.replace(b"kind: Task\n", b""),
            [(1, "missing required field 'kind' (one of: FederatedJob, Task)")],
        ),
        (
            "not utf-8",
            HELLO + b"# \xff\n",
            [(8, "not UTF-8 text")],
        ),
        (
            "several problems in one document",
            HELLO.replace(b"  name: hello\n", b"  name: Hello\n")
            + b"  limits:\n    memory: 1Ki\n    timeout: 30\n",
            [
                (4, "metadata.name: 'Hello' is not a DNS label"),
                (9, "spec.limits.memory: memory 1Ki is less than one Wasm page (64Ki)"),
                (10, "spec.limits.timeout: duration 30 needs a unit, e.g. 30s or 30ms"),
            ],
        ),
    ],
)
def test_problem_lines(name: str, content: bytes, expected: list[tuple[int, str]]) -> None:
    found = problems_of({"tasks/t.yaml": content})
    assert len(found) == len(expected), found
    for (file, line, message), (want_line, want_message) in zip(found, expected, strict=True):
        assert (file, line) == ("tasks/t.yaml", want_line), (name, found)
        assert message.startswith(want_message), (name, message)


def test_duplicate_names_name_both_places() -> None:
    second = b"# another file\n" + HELLO
    found = problems_of({"a.yaml": HELLO, "b/c.yml": second})
    assert found == [
        ("a.yaml", 4, "duplicate Task name 'hello' (also defined at b/c.yml:5)"),
        ("b/c.yml", 5, "duplicate Task name 'hello' (also defined at a.yaml:4)"),
    ]


def test_every_problem_in_every_file_at_once() -> None:
    files = {
        "z.yaml": b"a: [\n",
        "a.yaml": HELLO.replace(b"modules/hello.wasm", b"nope.wasm")
        + b"---\n"
        + HELLO.replace(b"name: hello", b"name: second")
        + b"  daemon: yes please\n",
        "m/b.yaml": b"---\n# only a comment\n---\n"
        + HELLO.replace(b"name: hello", b"name: third")
        + b"  placement: {runtime: wasm}\n",
        "ok.yaml": HELLO.replace(b"name: hello", b"name: fine"),
    }
    with pytest.raises(InvalidManifests) as raised:
        load(files, reader(), "c0ffee")
    assert [str(problem) for problem in raised.value.problems] == [
        "a.yaml:7:5: error: spec.module.file: 'nope.wasm' does not exist at revision c0ffee",
        "a.yaml:16:3: error: spec.daemon: Input should be a valid boolean, got 'yes please'",
        "m/b.yaml:11:15: error: spec.placement.runtime: Input should be 'wasmtime', 'wamr' or"
        " 'any', got 'wasm'",
        "z.yaml:2:1: error: invalid YAML: did not find expected node content"
        " (while parsing a flow node)",
    ]
    assert str(raised.value).startswith("4 problems in manifests:\na.yaml:7:5: error:")


def test_invalid_documents_still_get_name_and_file_checks() -> None:
    broken = HELLO.replace(b"modules/hello.wasm", b"gone.wasm") + b"  extra: 1\n"
    found = problems_of({"a.yaml": HELLO, "b.yaml": broken})
    assert [(file, line) for file, line, _ in found] == [
        ("a.yaml", 4),
        ("b.yaml", 4),
        ("b.yaml", 7),
        ("b.yaml", 8),
    ]


def test_problem_format() -> None:
    problem = Problem("a.yaml", 3, 5, "bad", "warning")
    assert str(problem) == "a.yaml:3:5: warning: bad"


def test_valid_revision() -> None:
    reads: list[str] = []

    def read(path: str) -> bytes | None:
        reads.append(path)
        return MODULES.get(path)

    files = {
        "b.yaml": HELLO.replace(b"name: hello", b"name: zeta")
        + b"---\n"
        + HELLO.replace(b"name: hello", b"name: alpha").replace(b"hello.wasm", b"other.wasm"),
        "a.yml": b"---\n# empty document\n---\n" + HELLO + b"---\n",
        "c.yaml": b"apiVersion: propeller/v1\nkind: Task\nmetadata: {name: remote}\nspec:\n"
        b"  module: {image: 'ghcr.io/acme/hello:1@" + WASM_DIGEST.encode() + b"'}\n"
        b"  placement: {spread: all}\n",
        "d.yaml": b"apiVersion: propeller/v1\nkind: Task\nmetadata: {name: tagged}\nspec:\n"
        b"  module: {image: 'ghcr.io/acme/hello:1'}\n",
    }
    desired = load(files, read, "c0ffee")
    assert desired.revision == "c0ffee"
    assert [t.manifest_name for t in desired.tasks] == [
        "alpha",
        "hello",
        "remote",
        "tagged",
        "zeta",
    ]
    assert sorted(reads) == ["modules/hello.wasm", "modules/other.wasm"]  # each path read once
    by_name = {t.manifest_name: t for t in desired.tasks}
    assert (by_name["hello"].digest, by_name["hello"].size) == (WASM_DIGEST, len(WASM))
    assert (by_name["alpha"].digest, by_name["alpha"].size) == (OTHER_DIGEST, len(OTHER))
    assert (by_name["hello"].source_file, by_name["hello"].line) == ("a.yml", 4)
    assert (by_name["alpha"].source_file, by_name["alpha"].line) == ("b.yaml", 9)
    # The digest in a reference names the manifest, not the module: the pass resolves it.
    assert by_name["remote"].digest is None
    assert by_name["remote"].size is None
    assert by_name["remote"].image == f"ghcr.io/acme/hello:1@{WASM_DIGEST}"
    assert not by_name["remote"].resolved
    assert (by_name["tagged"].digest, by_name["tagged"].image) == (None, "ghcr.io/acme/hello:1")
    assert dict(desired.modules) == {
        WASM_DIGEST: "modules/hello.wasm",
        OTHER_DIGEST: "modules/other.wasm",
    }


def test_yaml_scalars_become_plain_values() -> None:
    content = HELLO + (
        b"  args: ['0x10', \"quoted\"]\n"
        b"  stdin: |\n    line one\n    line two\n"
        b"  limits:\n    fuel: 1_000_000\n    memory: 0x100000\n"
        b"  placement: {replicas: 0x2}\n"
    )
    desired = load({"t.yaml": content}, reader(), "r")
    spec = desired.tasks[0].spec
    assert spec.args == ["0x10", "quoted"]
    assert spec.stdin == "line one\nline two\n"
    assert (spec.limits.fuel, spec.limits.memory, spec.placement.replicas) == (
        1_000_000,
        1024**2,
        2,
    )


def test_no_files_is_an_empty_state() -> None:
    desired = load({}, reader(), "r")
    assert (desired.tasks, dict(desired.modules)) == ((), {})


JOB = b"""\
apiVersion: propeller/v1
kind: FederatedJob
metadata:
  name: digits
spec:
  trainer:
    file: modules/hello.wasm
  model:
    file: models/start.npy
  rounds: 3
  evaluation:
    data: eval
    files: [digits/x.npy]
"""


def test_a_federated_job_resolves_its_trainer_and_model() -> None:
    files = {**MODULES, "models/start.npy": b"npy", "eval/digits/x.npy": b"x"}
    desired = load({"jobs/j.yaml": JOB}, reader(files), "c0ffee")
    [job] = desired.jobs
    assert (job.name, job.trainer.digest, job.trainer.size) == ("digits", WASM_DIGEST, len(WASM))
    assert job.model == ("sha256:" + hashlib.sha256(b"npy").hexdigest(), 3)
    assert desired.modules[WASM_DIGEST] == "modules/hello.wasm"  # served like a task's module
    assert desired.tasks == ()
    # The hash names the job: the same manifest gives the same one, another model a new one.
    again = load({"jobs/j.yaml": JOB}, reader(files), "beef")
    changed = load({"jobs/j.yaml": JOB}, reader({**files, "models/start.npy": b"v2"}), "beef")
    assert again.jobs[0].spec_hash == job.spec_hash != changed.jobs[0].spec_hash


def test_a_federated_job_reports_every_missing_file_even_when_invalid() -> None:
    broken = JOB.replace(b"rounds: 3", b"rounds: 0").replace(b"hello.wasm", b"nope.wasm")
    found = problems_of({"jobs/j.yaml": broken})
    assert [(line, message.split(":")[0]) for _file, line, message in found] == [
        (7, "spec.trainer.file"),
        (9, "spec.model.file"),
        (10, "spec.rounds"),
        (13, "spec.evaluation.files"),
    ]


def test_a_job_may_not_take_a_task_name() -> None:
    task = HELLO.replace(b"name: hello", b"name: digits")
    files = {**MODULES, "models/start.npy": b"npy", "eval/digits/x.npy": b"x"}
    with pytest.raises(InvalidManifests) as raised:
        load({"a.yaml": task, "b.yaml": JOB}, reader(files), "c0ffee")
    [problem] = raised.value.problems
    assert (problem.file, problem.line) == ("b.yaml", 4)
    assert "has the name of a Task" in problem.message
