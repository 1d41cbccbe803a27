"""Manifest models and quantities: what validates, to what, and the message when it does not."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from pydantic import ValidationError

from schemas import export
from schemas.manifests import (
    KINDS,
    FederatedJob,
    KindError,
    Task,
    fields_of,
    model_for,
    parse_manifest,
)
from schemas.quantities import format_memory, parse_duration_ms, parse_memory

DIGEST = "sha256:" + "ab" * 32


def task_doc(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "propeller/v1",
        "kind": "Task",
        "metadata": {"name": "hello", "labels": {"app": "demo"}},
        "spec": {"module": {"file": "modules/hello.wasm"}, **spec},
    }


def with_change(path: str, value: Any) -> dict[str, Any]:
    """A valid task document with ``value`` set at dotted ``path`` (``None`` deletes)."""
    doc = copy.deepcopy(task_doc())
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        del node[last]
    else:
        node[last] = value
    return doc


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("16Mi", 16 * 1024**2),
        ("64Ki", 65536),
        ("1Gi", 1024**3),
        ("2GiB", 2 * 1024**3),
        (1000000, 1000000),
        ("1000000", 1000000),
        ("16M", 16_000_000),
        ("16MB", 16_000_000),
        ("64k", 64_000),
        (" 8Mi ", 8 * 1024**2),
        (0, 0),
    ],
)
def test_memory_sizes(text: object, size: int) -> None:
    assert parse_memory(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("16Xi", "invalid memory size '16Xi'"),
        ("16mi", "invalid memory size '16mi'"),
        ("1.5Gi", "invalid memory size '1.5Gi'"),
        ("", "invalid memory size ''"),
        (-1, "memory must not be negative"),
        (True, "memory must be a size"),
        (1.5, "memory must be a size"),
    ],
)
def test_memory_size_errors(text: object, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace(".", r"\.")):
        parse_memory(text)


@pytest.mark.parametrize(
    ("text", "milliseconds"),
    [
        ("30s", 30_000),
        ("500ms", 500),
        ("2m", 120_000),
        ("1h", 3_600_000),
        ("1m30s", 90_000),
        ("1h2m3s4ms", 3_723_004),
        ("0s", 0),
    ],
)
def test_durations(text: str, milliseconds: int) -> None:
    assert parse_duration_ms(text) == milliseconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (30, "duration 30 needs a unit, e.g. 30s or 30ms"),
        ("30", "invalid duration '30'"),
        ("1.5s", "invalid duration '1.5s'"),
        ("30s1m", "invalid duration '30s1m': give each unit once, largest first"),
        ("1m1m", "invalid duration '1m1m': give each unit once"),
        ("s", "invalid duration 's'"),
        ("30 s", "invalid duration '30 s'"),
        (None, "a duration must be a string"),
    ],
)
def test_duration_errors(text: object, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_duration_ms(text)
    assert str(raised.value).startswith(message)


@pytest.mark.parametrize(
    ("size", "text"), [(16 * 1024**2, "16Mi"), (65536, "64Ki"), (1024**3, "1Gi"), (1000, "1000")]
)
def test_format_memory(size: int, text: str) -> None:
    assert format_memory(size) == text


def test_full_task_validates_to_typed_values() -> None:
    task = parse_manifest(
        task_doc(
            function="run",
            args=["a", "b"],
            env={"LEVEL": "debug"},
            stdin="input",
            daemon=True,
            placement={"runtime": "wamr", "selector": {"zone": "a"}, "replicas": 3},
            limits={"memory": "16Mi", "timeout": "1m30s", "fuel": 1000},
        )
    )
    assert isinstance(task, Task)
    assert task.metadata.name == "hello"
    assert task.metadata.labels == {"app": "demo"}
    assert task.spec.module.file == "modules/hello.wasm"
    assert task.spec.daemon is True
    assert task.spec.placement.runtime == "wamr"
    assert task.spec.placement.count == 3
    assert task.spec.limits.memory == 16 * 1024**2
    assert task.spec.limits.timeout == 90_000
    assert task.spec.limits.fuel == 1000


def test_defaults() -> None:
    task = parse_manifest(task_doc())
    assert isinstance(task, Task)
    spec = task.spec
    assert (spec.function, spec.args, spec.env, spec.stdin, spec.daemon) == (
        None,
        [],
        {},
        None,
        False,
    )
    assert spec.placement.runtime == "any"
    assert spec.placement.count == 1
    assert spec.placement.spread is None
    assert (spec.limits.memory, spec.limits.timeout, spec.limits.fuel) == (None, None, None)


@pytest.mark.parametrize(
    "image",
    [
        "ghcr.io/acme/hello:1.0",
        "localhost:5000/hello",
        "127.0.0.1:5000/wasm/hello:v1",
        f"registry.example.com/a/b/c@{DIGEST}",
        f"ghcr.io/acme/hello:1.0@{DIGEST}",
    ],
)
def test_valid_image_references(image: str) -> None:
    task = parse_manifest(with_change("spec.module", {"image": image}))
    assert isinstance(task, Task)
    assert task.spec.module.image == image


def errors(doc: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as raised:
        parse_manifest(doc)
    return [
        (".".join(str(step) for step in error["loc"]), error["msg"])
        for error in raised.value.errors()
    ]


@pytest.mark.parametrize(
    ("path", "value", "loc", "message"),
    [
        ("spec.modul", {"file": "x"}, "spec.modul", "Extra inputs are not permitted"),
        ("metadata.annotations", {}, "metadata.annotations", "Extra inputs are not permitted"),
        ("spec", None, "spec", "Field required"),
        ("metadata.name", None, "metadata.name", "Field required"),
        ("metadata.name", "Hello", "metadata.name", "Value error, 'Hello' is not a DNS label"),
        ("metadata.name", "a" * 64, "metadata.name", "Value error, 'aaaa"),
        ("metadata.name", "-a", "metadata.name", "Value error, '-a' is not a DNS label"),
        ("metadata.labels", {"zone": 1}, "metadata.labels.zone", "Input should be a valid string"),
        (
            "spec.module",
            {"file": "a.wasm", "image": "ghcr.io/a/b:1"},
            "spec.module",
            "Value error, give exactly one of 'file' or 'image'",
        ),
        ("spec.module", {}, "spec.module", "Value error, give exactly one of 'file' or 'image'"),
        (
            "spec.module",
            {"file": "../outside.wasm"},
            "spec.module.file",
            "Value error, '../outside.wasm' is not a path inside the repository",
        ),
        (
            "spec.module",
            {"file": "/abs.wasm"},
            "spec.module.file",
            "Value error, '/abs.wasm' is not a path inside the repository",
        ),
        (
            "spec.module",
            {"image": "hello:1.0"},
            "spec.module.image",
            "Value error, 'hello:1.0' is not an OCI reference",
        ),
        (
            "spec.module",
            {"image": "acme/hello:1.0"},
            "spec.module.image",
            "Value error, 'acme/hello:1.0' does not name a registry",
        ),
        (
            "spec.module",
            {"image": "ghcr.io/acme/hello@sha256:abc"},
            "spec.module.image",
            "Value error, 'ghcr.io/acme/hello@sha256:abc' is not an OCI reference",
        ),
        ("spec.function", "", "spec.function", "String should have at least 1 character"),
        ("spec.args", ["ok", 2], "spec.args.1", "Input should be a valid string"),
        ("spec.args", "a b", "spec.args", "Input should be a valid list"),
        ("spec.env", {"1BAD": "x"}, "spec.env.1BAD.[key]", "Value error, '1BAD' is not an"),
        ("spec.daemon", "true", "spec.daemon", "Input should be a valid boolean"),
        (
            "spec.placement",
            {"runtime": "wasm"},
            "spec.placement.runtime",
            "Input should be 'wasmtime', 'wamr' or 'any'",
        ),
        (
            "spec.placement",
            {"replicas": 0},
            "spec.placement.replicas",
            "Input should be greater than or equal to 1",
        ),
        (
            "spec.placement",
            {"replicas": "3"},
            "spec.placement.replicas",
            "Input should be a valid integer",
        ),
        (
            "spec.placement",
            {"replicas": 2, "spread": "all"},
            "spec.placement",
            "Value error, give either 'replicas' or 'spread: all', not both",
        ),
        (
            "spec.placement",
            {"proplet": "p1", "spread": "all"},
            "spec.placement",
            "Value error, a task pinned to one 'proplet' cannot also 'spread: all'",
        ),
        (
            "spec.placement",
            {"proplet": "p1", "replicas": 2},
            "spec.placement",
            "Value error, a task pinned to one 'proplet' runs once; replicas must be 1, got 2",
        ),
        (
            "spec.placement",
            {"spread": "some"},
            "spec.placement.spread",
            "Input should be 'all'",
        ),
        (
            "spec.placement",
            {"proplet": "bad id!"},
            "spec.placement.proplet",
            "Value error, 'bad id!' is not a proplet id",
        ),
        (
            "spec.limits",
            {"memory": "16Ki"},
            "spec.limits.memory",
            "Value error, memory 16Ki is less than one Wasm page (64Ki)",
        ),
        (
            "spec.limits",
            {"memory": "8Gi"},
            "spec.limits.memory",
            "Value error, memory 8Gi is more than a 32-bit Wasm module can address (4Gi)",
        ),
        (
            "spec.limits",
            {"timeout": 30},
            "spec.limits.timeout",
            "Value error, duration 30 needs a unit, e.g. 30s or 30ms",
        ),
        (
            "spec.limits",
            {"timeout": "0s"},
            "spec.limits.timeout",
            "Value error, duration '0s' must be at least 1ms",
        ),
        (
            "spec.limits",
            {"fuel": 0},
            "spec.limits.fuel",
            "Input should be greater than or equal to 1",
        ),
        (
            "spec.limits",
            {"cpu": 1},
            "spec.limits.cpu",
            "Extra inputs are not permitted",
        ),
    ],
)
def test_invalid_task(path: str, value: Any, loc: str, message: str) -> None:
    found = errors(with_change(path, value))
    assert any(where == loc and text.startswith(message) for where, text in found), found


def test_args_are_limited_like_the_wire() -> None:
    found = errors(with_change("spec.args", ["x"] * 65))
    assert found == [("spec.args", "List should have at most 64 items after validation, not 65")]


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"apiVersion": None}, "apiVersion", "missing required field 'apiVersion' (propeller/v1)"),
        ({"apiVersion": "v1"}, "apiVersion", "apiVersion must be propeller/v1, got 'v1'"),
        ({"kind": None}, "kind", "missing required field 'kind' (one of: FederatedJob, Task)"),
        ({"kind": "Pod"}, "kind", "unknown kind 'Pod' (known kinds: FederatedJob, Task)"),
        ({"kind": 3}, "kind", "unknown kind 3 (known kinds: FederatedJob, Task)"),
    ],
)
def test_kind_selection_errors(change: dict[str, Any], field: str, message: str) -> None:
    doc = task_doc()
    for key, value in change.items():
        if value is None:
            del doc[key]
        else:
            doc[key] = value
    with pytest.raises(KindError) as raised:
        model_for(doc)
    assert (raised.value.field, raised.value.message) == (field, message)


def test_kinds_registry() -> None:
    assert dict(KINDS) == {"Task": Task, "FederatedJob": FederatedJob}
    assert model_for(task_doc()) is Task


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ((), ("apiVersion", "metadata", "kind", "spec")),
        (("spec", "placement"), ("runtime", "selector", "proplet", "replicas", "spread")),
        (("spec", "limits"), ("memory", "timeout", "fuel")),
        (("spec", "args"), ()),
        (("nope",), ()),
    ],
)
def test_fields_of(path: tuple[str, ...], fields: tuple[str, ...]) -> None:
    assert fields_of(Task, path) == fields


def test_exported_manifest_schemas() -> None:
    files = export.rendered()
    task = json.loads(files["task.schema.json"])
    assert task["$id"] == "https://propeller.dev/schemas/task.schema.json"
    assert task["properties"]["kind"] == {"const": "Task", "title": "Kind", "type": "string"}
    assert task["properties"]["apiVersion"]["const"] == "propeller/v1"
    assert task["additionalProperties"] is False
    assert task["required"] == ["apiVersion", "metadata", "kind", "spec"]
    memory = task["$defs"]["Limits"]["properties"]["memory"]["anyOf"][0]["anyOf"]
    assert {choice["type"] for choice in memory} == {"integer", "string"}
    assert "?P<" not in files["task.schema.json"]  # JSON Schema regexes have no named groups
    anything = json.loads(files["manifest.schema.json"])
    assert anything["oneOf"] == [{"$ref": "#/$defs/Task"}, {"$ref": "#/$defs/FederatedJob"}]
    assert "TaskSpec" in anything["$defs"]
    for name in ("task.schema.json", "manifest.schema.json"):
        assert (export.JSON_DIR / name).read_text() == files[name], f"{name} is stale"
