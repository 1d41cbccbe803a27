"""Tasks that take files and give files back, on a real proplet and a real Mosquitto.

Inputs are served by the reconciler's ``ArtifactServer`` (through ``Fleet``) and read by the
run at ``/in``; what the run writes under ``/out`` is uploaded and reassembled by the
reconciler's ``Uploads`` on its own connection. ``files.wasm`` reverses ``/in/a.txt`` into
``/out/b.txt`` and, on request, misbehaves (see ``tests/wasm/files.c``).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proplet.artifacts import digest_hex
from reconciler.artifacts import publish_refusal
from reconciler.broker import Broker
from reconciler.desired import spec_hash
from reconciler.uploads import Uploads
from schemas.messages import (
    ArtifactRef,
    ArtifactRequest,
    DesiredTask,
    TaskResult,
    TaskState,
    decode,
)
from tests.broker import Mosquitto
from tests.fleet import Fleet, Module, Observed, module, running_fleet

pytestmark = pytest.mark.integration

FILES = module("files")
# Over two 256 KiB chunks, so the input and the output both travel in several.
TEXT = bytes(range(256)) * 2343 + b"end"


def blob(data: bytes, name: str = "input") -> Module:
    return Module(name, data)


def ref(name: str, mod: Module) -> ArtifactRef:
    return ArtifactRef(name=name, digest=mod.digest, size=len(mod.data))


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def files_task(
    name: str, inputs: list[ArtifactRef], mod: Module = FILES, **fields: Any
) -> DesiredTask:
    """A task running ``mod``, stamped with the spec hash the reconciler would compute."""
    draft = DesiredTask(
        name=name,
        spec_hash="draft",
        owner="propctl",
        digest=mod.digest,
        size=len(mod.data),
        inputs=inputs or None,
        **fields,
    )
    return draft.model_copy(update={"spec_hash": spec_hash(draft)})


@pytest.fixture
def fleet(broker: Mosquitto, tmp_path: Path) -> Iterator[Fleet]:
    with running_fleet(broker, tmp_path) as f:
        f.serve(FILES)
        yield f


@pytest.fixture
def uploads(fleet: Fleet) -> Iterator[Uploads]:
    """The receiving side, on a connection of its own, as a job coordinator holds it."""
    receiver = Uploads(fleet.ns)
    broker = Broker(fleet.settings)
    broker.connect()
    receiver.attach(broker)
    yield receiver
    broker.close()


def test_an_input_is_read_at_in_and_the_output_is_uploaded(fleet: Fleet, uploads: Uploads) -> None:
    text = blob(TEXT)
    fleet.serve(text)
    p = fleet.start_proplet("p1")
    fleet.desire("p1", [files_task("rev", [ref("a.txt", text)], outputs=4 * 1024 * 1024)])

    result = fleet.wait_result("p1", "rev", timeout=10)
    assert result.state == TaskState.COMPLETED, result.error
    assert result.stdout == f"wrote {len(TEXT)} bytes\n"
    reversed_text = TEXT[::-1]
    assert result.outputs == [
        ArtifactRef(name="b.txt", digest=sha256(reversed_text), size=len(TEXT))
    ]
    # Uploaded before the result was published; the receiver verified it on its own.
    assert uploads.wait("p1", sha256(reversed_text), timeout=5) == reversed_text
    assert uploads.in_progress() == []
    assert fleet.server.served[text.digest] == {"p1"}  # came over the chunked transfer
    assert (p.data_dir / "cache" / "sha256" / digest_hex(text.digest)).read_bytes() == TEXT
    assert list((p.data_dir / "runs").iterdir()) == []  # the run's workspace is gone


def test_function_tasks_get_in_and_out_too(fleet: Fleet, uploads: Uploads) -> None:
    text = blob(b"abc")
    fleet.serve(text)
    fleet.start_proplet("p1")
    fleet.desire("p1", [files_task("fn", [ref("a.txt", text)], function="reverse", outputs=16)])
    result = fleet.wait_result("p1", "fn")
    assert (result.state, result.result) == (TaskState.COMPLETED, ["3"])
    assert result.outputs == [ArtifactRef(name="b.txt", digest=sha256(b"cba"), size=3)]
    assert uploads.wait("p1", sha256(b"cba"), timeout=5) == b"cba"


def test_in_is_read_only(fleet: Fleet) -> None:
    text = blob(b"keep me")
    fleet.serve(text)
    p = fleet.start_proplet("p1")
    fleet.desire("p1", [files_task("w", [ref("a.txt", text)], args=["write-in"], outputs=64)])
    result = fleet.wait_result("p1", "w")
    assert (result.state, result.exit_code) == (TaskState.FAILED, 3)
    assert "write-in: refused" in result.stderr
    assert result.outputs is None  # a failed run uploads nothing
    # /in/a.txt is a hard link to the cached artifact: the cache must be intact.
    assert (p.data_dir / "cache" / "sha256" / digest_hex(text.digest)).read_bytes() == b"keep me"


def test_bad_outputs_fail_the_run_with_the_reason(fleet: Fleet, uploads: Uploads) -> None:
    text = blob(b"0123456789")
    fleet.serve(text)
    fleet.start_proplet("p1")
    inputs = [ref("a.txt", text)]
    cases = {
        "big": (["big", "5000"], "outputs: 5010 bytes written, the limit is 4096"),
        "subdir": (
            ["subdir"],
            "outputs: /out/sub is a directory; only plain files at the top of /out are uploaded",
        ),
        "many": (["many", "8"], "outputs: 9 files written, the limit is 8"),
        "hidden": (["name", ".hidden"], "outputs: file name '.hidden' is not allowed"),
    }
    fleet.desire(
        "p1",
        [files_task(name, inputs, args=args, outputs=4096) for name, (args, _) in cases.items()],
    )
    for name, (_, error) in cases.items():
        result = fleet.wait_result("p1", name)
        assert result.state == TaskState.FAILED, name
        assert result.exit_code == 0  # the guest itself succeeded
        assert result.error is not None and result.error.startswith(error), result.error
        assert result.outputs is None
        status = fleet.wait_task("p1", name, lambda t: t.state == TaskState.FAILED)
        assert status.reason is not None and status.reason.startswith(error)
    # Nothing of a refused run was uploaded, not even its good file.
    assert uploads.get("p1", sha256(b"9876543210")) is None
    assert uploads.in_progress() == []


def test_an_unserved_input_keeps_the_task_pending_until_served(fleet: Fleet) -> None:
    text = blob(b"late")
    fleet.start_proplet("p1")
    fleet.desire("p1", [files_task("late", [ref("a.txt", text)], outputs=64)])
    waiting = fleet.wait_task("p1", "late", lambda t: "request 2)" in (t.reason or ""), timeout=5)
    assert waiting.state == TaskState.PENDING
    assert waiting.reason == f"waiting for artifact {text.digest} (input a.txt, request 2)"
    assert ("p1", "late") not in fleet.observed.results
    fleet.serve(text)
    result = fleet.wait_result("p1", "late", timeout=10)
    assert result.state == TaskState.COMPLETED
    assert result.outputs == [ArtifactRef(name="b.txt", digest=sha256(b"etal"), size=4)]


def test_inputs_are_fetched_alongside_the_module(fleet: Fleet) -> None:
    hello, text = module("hello"), blob(b"side by side")
    requested: set[str] = set()
    both = threading.Event()

    def record(_topic: str, payload: bytes, _retained: bool) -> None:
        requested.add(decode(ArtifactRequest, payload).digest)
        if {hello.digest, text.digest} <= requested:
            both.set()

    fleet.client.subscribe(fleet.ns.artifact_request(), record, qos=1)
    fleet.start_proplet("p1")
    fleet.desire("p1", [files_task("pair", [ref("a.txt", text)], mod=hello, outputs=64)])
    assert both.wait(5), requested  # the input is asked for before the module is there
    status = fleet.wait_task("p1", "pair", lambda t: t.reason is not None)
    assert status.state == TaskState.PENDING
    assert status.reason is not None
    assert status.reason.startswith(f"waiting for artifact {hello.digest} (request ")
    fleet.serve(hello, text)
    result = fleet.wait_result("p1", "pair", timeout=10)
    assert result.state == TaskState.COMPLETED
    assert result.outputs == []  # the module wrote nothing under /out


def test_a_refused_input_shows_the_servers_error(fleet: Fleet) -> None:
    text = blob(b"refused")
    refusals = threading.Event()

    def refuse(_topic: str, payload: bytes, _retained: bool) -> None:
        request = decode(ArtifactRequest, payload)
        if request.digest == text.digest:
            publish_refusal(fleet.client, fleet.ns, request, "not found: no such model")
            refusals.set()

    fleet.client.subscribe(fleet.ns.artifact_request(), refuse, qos=1)
    fleet.start_proplet("p1")
    fleet.desire("p1", [files_task("ref", [ref("a.txt", text)], outputs=64)])
    status = fleet.wait_task("p1", "ref", lambda t: "unavailable" in (t.reason or ""))
    assert refusals.is_set()
    assert status.state == TaskState.PENDING
    assert status.reason == "input a.txt unavailable: not found: no such model (retrying)"


def test_a_changed_input_runs_the_task_again(fleet: Fleet, uploads: Uploads) -> None:
    first, second = blob(b"one"), blob(b"two")
    fleet.serve(first, second)
    fleet.start_proplet("p1")
    v1 = files_task("job", [ref("a.txt", first)], outputs=64)
    fleet.desire("p1", [v1])
    assert fleet.wait_result("p1", "job").outputs == [
        ArtifactRef(name="b.txt", digest=sha256(b"eno"), size=3)
    ]

    v2 = files_task("job", [ref("a.txt", second)], outputs=64)
    assert v2.spec_hash != v1.spec_hash
    fleet.desire("p1", [v2])

    def of_v2(o: Observed) -> TaskResult | None:
        result = o.results.get(("p1", "job"))
        return result if result is not None and result.spec_hash == v2.spec_hash else None

    result = fleet.wait(of_v2, what="result of the second spec")
    assert result is not None
    assert (result.state, result.runs) == (TaskState.COMPLETED, 1)
    assert result.outputs == [ArtifactRef(name="b.txt", digest=sha256(b"owt"), size=3)]
    assert uploads.wait("p1", sha256(b"owt"), timeout=5) == b"owt"
    assert uploads.get("p1", sha256(b"eno")) == b"eno"  # both runs' uploads arrived


def test_a_large_output_arrives_whole(fleet: Fleet, uploads: Uploads) -> None:
    text = blob(b"x")
    fleet.serve(text)
    fleet.start_proplet("p1")
    size = 4 * 1024 * 1024
    fleet.desire(
        "p1", [files_task("big", [ref("a.txt", text)], args=["big", str(size)], outputs=size + 1)]
    )
    result = fleet.wait_result("p1", "big", timeout=10)
    assert result.state == TaskState.COMPLETED, result.error
    big = ArtifactRef(name="big.bin", digest=sha256(b"z" * size), size=size)
    assert result.outputs == [ArtifactRef(name="b.txt", digest=sha256(b"x"), size=1), big]
    assert uploads.wait("p1", big.digest, timeout=5) == b"z" * size
