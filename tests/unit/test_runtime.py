"""The Wasm execution layer against real wasmtime, with the modules in tests/wasm."""

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import wasmtime

from proplet.artifacts import DigestMismatch
from proplet.runtime import (
    WASMTIME_VERSION,
    Execution,
    Invocation,
    Limits,
    ModuleError,
    Outcome,
    Prepared,
    Runtime,
)
from schemas.messages import sha256_digest

WASM = Path(__file__).parents[1] / "wasm"
STOP_WITHIN_S = 0.1

Prepare = Callable[..., Prepared]


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    rt = Runtime(tmp_path_factory.mktemp("cwasm"))
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def prepare(runtime: Runtime) -> Prepare:
    def prepare(name: str, *, metered: bool = False) -> Prepared:
        wasm = (WASM / name).read_bytes()
        return runtime.prepare(sha256_digest(wasm), wasm, metered=metered)

    return prepare


def run(
    runtime: Runtime,
    prepared: Prepared,
    function: str | None,
    *args: str,
    limits: Limits | None = None,
    name: str = "main",
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    data_dir: Path | None = None,
) -> Outcome:
    inv = Invocation(function, args, env or {}, stdin, data_dir, name)
    return runtime.execution(prepared, inv, limits or Limits()).run()


def wait_running(runtime: Runtime, count: int) -> None:
    deadline = time.monotonic() + 5
    while runtime.running < count:
        assert time.monotonic() < deadline, f"only {runtime.running} of {count} started"
        time.sleep(0.001)


def in_thread(execution: Execution) -> tuple[threading.Thread, list[Outcome]]:
    outcomes: list[Outcome] = []
    thread = threading.Thread(target=lambda: outcomes.append(execution.run()))
    thread.start()
    return thread, outcomes


# --- function mode --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "args", "result"),
    [
        ("add", ("2", "3"), ("5",)),
        ("add", ("-7", "2"), ("-5",)),
        ("add", ("4294967295", "0"), ("-1",)),  # unsigned spelling of an i32
        ("add", ("2147483647", "1"), ("-2147483648",)),  # wraps like the machine
        ("mul64", ("4294967296", "3"), ("12884901888",)),
        ("mul64", ("-9223372036854775808", "1"), ("-9223372036854775808",)),
        ("scale", ("1.5", "2"), ("3.0",)),
        ("scale", ("1.5", "0.1"), ("0.15000000223517418",)),  # 0.1 as f32, promoted
        ("half", ("0.2",), ("0.1",)),  # f32 result printed as the shortest f32 decimal
        ("half", ("inf",), ("inf",)),
        ("noop", (), ()),
        ("pair", (), ("42", "2.5")),  # multi-value
    ],
)
def test_function_arguments_and_results_by_type(
    runtime: Runtime, prepare: Prepare, function: str, args: tuple[str, ...], result: tuple[str]
) -> None:
    outcome = run(runtime, prepare("add.wasm"), function, *args)
    assert outcome == Outcome("completed", result=result, elapsed_ms=outcome.elapsed_ms), (
        outcome.error
    )


@pytest.mark.parametrize(
    ("function", "args", "error"),
    [
        ("add", ("1", "abc"), "argument 2 'abc' is not a valid i32"),
        ("add", ("1.5", "1"), "argument 1 '1.5' is not a valid i32"),
        ("add", ("4294967296", "1"), "argument 1 '4294967296' is not a valid i32"),
        ("mul64", ("1", "18446744073709551616"), "argument 2 '18446744073709551616' is not a "),
        ("scale", ("x", "1"), "argument 1 'x' is not a valid f64"),
        ("half", ("",), "argument 1 '' is not a valid f32"),
        ("add", ("1",), "expected 2 arguments, got 1"),
        ("half", ("1", "2"), "expected 1 argument, got 2"),
        ("noop", ("1",), "expected 0 arguments, got 1"),
        ("nope", (), "function 'nope' not exported; exports: add, mul64, scale, half, noop, pair"),
    ],
)
def test_bad_calls_fail_with_a_sentence(
    runtime: Runtime, prepare: Prepare, function: str, args: tuple[str, ...], error: str
) -> None:
    outcome = run(runtime, prepare("add.wasm"), function, *args)
    assert outcome.status == "failed"
    assert outcome.error is not None and outcome.error.startswith(error)
    assert outcome.result is None


@pytest.mark.parametrize(
    ("module", "function", "args", "error"),
    [
        ("trap.wasm", "boom", (), "trap: unreachable executed"),
        ("trap.wasm", "div", ("1", "0"), "trap: integer division by zero"),
        ("recurse.wasm", "recurse", ("0",), "stack overflow (unbounded recursion?)"),
    ],
)
def test_traps(
    runtime: Runtime,
    prepare: Prepare,
    module: str,
    function: str,
    args: tuple[str, ...],
    error: str,
) -> None:
    outcome = run(runtime, prepare(module), function, *args)
    assert (outcome.status, outcome.error) == ("failed", error)


def test_function_mode_on_a_wasi_module_gets_a_wasi_context(
    runtime: Runtime, prepare: Prepare
) -> None:
    outcome = run(runtime, prepare("hello.wasm"), "_start", name="hello", env={"GREETING": "hey"})
    assert outcome.status == "completed", outcome.error
    assert outcome.result == ()
    assert outcome.stdout == "hello\nGREETING=hey\n"
    assert outcome.stderr == "to-stderr\n"


# --- WASI command mode ---------------------------------------------------------------------


def test_wasi_command_argv_env_stdin_stderr_and_exit_code(
    runtime: Runtime, prepare: Prepare
) -> None:
    outcome = run(
        runtime,
        prepare("hello.wasm"),
        None,
        "one",
        "two words",
        name="hello.wasm",
        env={"GREETING": "hi there", "EXIT_CODE": "3"},
        stdin="line 1\nline 2\n",
    )
    assert outcome == Outcome(
        "failed",
        exit_code=3,
        stdout="hello.wasm\none\ntwo words\nGREETING=hi there\nline 1\nline 2\n",
        stderr="to-stderr\n",
        error="exited with code 3",
        elapsed_ms=outcome.elapsed_ms,
    )


def test_wasi_command_exit_zero_completes(runtime: Runtime, prepare: Prepare) -> None:
    outcome = run(runtime, prepare("hello.wasm"), None)
    assert (outcome.status, outcome.exit_code, outcome.error) == ("completed", 0, None)
    assert outcome.result is None
    assert outcome.stdout == "main\nGREETING=(unset)\n"  # default argv[0], no stdin


def test_output_is_capped_per_stream(runtime: Runtime, prepare: Prepare) -> None:
    outcome = run(runtime, prepare("noisy.wasm"), None, limits=Limits(output_bytes=1000))
    assert outcome.status == "completed"  # the guest never sees its writes fail
    assert outcome.stdout == "x" * 1000
    assert outcome.stderr == "done\n"
    assert outcome.truncated


def test_default_cap_is_64_kib(runtime: Runtime, prepare: Prepare) -> None:
    outcome = run(runtime, prepare("noisy.wasm"), None)
    assert len(outcome.stdout) == 65536
    assert outcome.truncated


def test_cut_inside_a_character_drops_the_partial_character(
    runtime: Runtime, prepare: Prepare
) -> None:
    prefix = "main\nGREETING=(unset)\n"
    limit = len(prefix.encode()) + 3  # one "é" and the first byte of the next
    outcome = run(
        runtime, prepare("hello.wasm"), None, stdin="éé", limits=Limits(output_bytes=limit)
    )
    assert outcome.stdout == prefix + "é"
    assert outcome.truncated


def test_output_under_the_cap_is_not_truncated(runtime: Runtime, prepare: Prepare) -> None:
    outcome = run(runtime, prepare("hello.wasm"), None, stdin="é")
    assert outcome.stdout.endswith("é")
    assert not outcome.truncated


def test_data_dir_is_readable_and_not_writable(
    runtime: Runtime, prepare: Prepare, tmp_path: Path
) -> None:
    (tmp_path / "input.txt").write_text("some input\n")
    outcome = run(runtime, prepare("readfile.wasm"), None, data_dir=tmp_path)
    assert outcome.status == "completed", outcome.error
    assert outcome.stdout == "some input\nwrite: failed\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.txt"]


def test_without_data_dir_nothing_is_visible(runtime: Runtime, prepare: Prepare) -> None:
    outcome = run(runtime, prepare("readfile.wasm"), None)
    assert (outcome.status, outcome.exit_code, outcome.stdout) == ("failed", 1, "read: failed\n")


# --- limits --------------------------------------------------------------------------------


def test_timeout_of_a_function(runtime: Runtime, prepare: Prepare) -> None:
    outcome = run(runtime, prepare("spin.wasm"), "spin", limits=Limits(timeout_ms=50))
    assert (outcome.status, outcome.error) == ("failed", "timed out after 50 ms")
    assert 50 <= outcome.elapsed_ms < 50 + STOP_WITHIN_S * 1000


def test_timeout_of_a_wasi_command_keeps_its_output(runtime: Runtime, prepare: Prepare) -> None:
    outcome = run(runtime, prepare("forever.wasm"), None, limits=Limits(timeout_ms=30))
    assert (outcome.status, outcome.error) == ("failed", "timed out after 30 ms")
    assert outcome.stdout == "started\n"


def test_timeout_of_a_sleeping_guest(runtime: Runtime, prepare: Prepare) -> None:
    # sleepy naps a second at a time, inside a host call that epochs cannot interrupt
    outcome = run(runtime, prepare("sleepy.wasm"), None, limits=Limits(timeout_ms=50))
    assert (outcome.status, outcome.error) == ("failed", "timed out after 50 ms")
    assert outcome.elapsed_ms < 50 + STOP_WITHIN_S * 1000


def test_a_short_sleep_completes(runtime: Runtime, prepare: Prepare) -> None:
    outcome = run(runtime, prepare("sleepy.wasm"), None, "20", limits=Limits(timeout_ms=5000))
    assert (outcome.status, outcome.stdout) == ("completed", "awake\n")
    assert outcome.elapsed_ms >= 20


@pytest.mark.parametrize("stdin", [None, "ready"])
def test_polls_other_than_sleeps_reach_wasi(
    runtime: Runtime, prepare: Prepare, stdin: str | None
) -> None:
    outcome = run(runtime, prepare("poll.wasm"), "poll_stdin", stdin=stdin)
    # errno 0, one event, for subscription 7, of type fd_read
    assert (outcome.status, outcome.result) == ("completed", ("0", "1", "7", "1"))


def test_fuel_exhaustion(runtime: Runtime, prepare: Prepare) -> None:
    outcome = run(runtime, prepare("spin.wasm", metered=True), "spin", limits=Limits(fuel=100_000))
    assert (outcome.status, outcome.error) == ("failed", "out of fuel after 100000 units")


def test_enough_fuel_completes(runtime: Runtime, prepare: Prepare) -> None:
    outcome = run(
        runtime, prepare("add.wasm", metered=True), "add", "1", "2", limits=Limits(fuel=100)
    )
    assert (outcome.status, outcome.result) == ("completed", ("3",))


def test_metered_module_without_fuel_limit_runs(runtime: Runtime, prepare: Prepare) -> None:
    outcome = run(runtime, prepare("add.wasm", metered=True), "add", "1", "2")
    assert outcome.result == ("3",)


def test_fuel_limit_needs_a_metered_module(runtime: Runtime, prepare: Prepare) -> None:
    with pytest.raises(ValueError, match="metered"):
        runtime.execution(prepare("add.wasm"), Invocation("add"), Limits(fuel=10))


def test_memory_limit_stops_growth(runtime: Runtime, prepare: Prepare) -> None:
    outcome = run(runtime, prepare("grow.wasm"), "grow", limits=Limits(memory=1 << 20))
    assert outcome.status == "failed"
    assert outcome.error is not None
    assert outcome.error.startswith("memory limit of 1048576 bytes reached")


def test_memory_limit_below_the_initial_memory(runtime: Runtime, prepare: Prepare) -> None:
    outcome = run(runtime, prepare("add.wasm"), "add", "1", "2", limits=Limits(memory=1000))
    assert outcome.status == "failed"
    assert outcome.error is not None
    assert outcome.error.startswith("memory limit of 1000 bytes reached")


def test_trap_below_the_memory_limit_is_just_a_trap(runtime: Runtime, prepare: Prepare) -> None:
    outcome = run(runtime, prepare("trap.wasm"), "boom", limits=Limits(memory=1 << 20))
    assert outcome.error == "trap: unreachable executed"


# --- stop ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "function"),
    [("spin.wasm", "spin"), ("forever.wasm", None), ("sleepy.wasm", None)],
)
def test_stop_a_spinning_module_within_100_ms(
    runtime: Runtime, prepare: Prepare, module: str, function: str | None
) -> None:
    execution = runtime.execution(prepare(module), Invocation(function), Limits())
    thread, outcomes = in_thread(execution)
    wait_running(runtime, 1)

    asked = time.monotonic()
    execution.stop()
    thread.join(timeout=5)
    latency = time.monotonic() - asked

    assert [(o.status, o.error) for o in outcomes] == [("stopped", "stopped")]
    assert latency < STOP_WITHIN_S


def test_stop_before_run(runtime: Runtime, prepare: Prepare) -> None:
    execution = runtime.execution(prepare("spin.wasm"), Invocation("spin"), Limits())
    execution.stop()
    assert execution.run().status == "stopped"


def test_stop_after_run_is_harmless(runtime: Runtime, prepare: Prepare) -> None:
    execution = runtime.execution(prepare("add.wasm"), Invocation("add", ("1", "2")), Limits())
    assert execution.run().status == "completed"
    execution.stop()


def test_an_execution_runs_once(runtime: Runtime, prepare: Prepare) -> None:
    execution = runtime.execution(prepare("add.wasm"), Invocation("noop"), Limits())
    execution.run()
    with pytest.raises(RuntimeError):
        execution.run()


def test_four_concurrent_executions_all_stop(runtime: Runtime, prepare: Prepare) -> None:
    executions = [
        runtime.execution(prepare("spin.wasm"), Invocation("spin"), Limits()),
        runtime.execution(prepare("spin.wasm", metered=True), Invocation("spin"), Limits()),
        runtime.execution(prepare("forever.wasm"), Invocation(None), Limits()),
        runtime.execution(prepare("sleepy.wasm"), Invocation(None), Limits(timeout_ms=60_000)),
    ]
    started = [in_thread(e) for e in executions]
    wait_running(runtime, 4)

    asked = time.monotonic()
    for execution in executions:
        execution.stop()
    for thread, _ in started:
        thread.join(timeout=5)

    assert time.monotonic() - asked < STOP_WITHIN_S * 2
    assert [o.status for _, outcomes in started for o in outcomes] == ["stopped"] * 4
    assert runtime.running == 0


def test_close_stops_running_executions(tmp_path: Path) -> None:
    rt = Runtime(tmp_path)
    wasm = (WASM / "spin.wasm").read_bytes()
    prepared = rt.prepare(sha256_digest(wasm), wasm, metered=False)
    execution = rt.execution(prepared, Invocation("spin"), Limits())
    thread, outcomes = in_thread(execution)
    wait_running(rt, 1)

    rt.close()
    thread.join(timeout=5)

    assert [o.status for o in outcomes] == ["stopped"]
    with pytest.raises(RuntimeError, match="closed"):
        rt.execution(prepared, Invocation("spin"), Limits())


def test_execution_created_before_close_and_run_after_is_stopped(tmp_path: Path) -> None:
    rt = Runtime(tmp_path)
    wasm = (WASM / "spin.wasm").read_bytes()
    prepared = rt.prepare(sha256_digest(wasm), wasm, metered=False)
    execution = rt.execution(prepared, Invocation("spin"), Limits())
    rt.close()
    outcome = execution.run()
    assert (outcome.status, outcome.error) == ("stopped", "stopped: the runtime is closed")


# --- preparing modules ---------------------------------------------------------------------


def test_not_wasm(runtime: Runtime) -> None:
    data = (WASM / "notwasm.wasm").read_bytes()
    with pytest.raises(ModuleError, match=r"^not a WebAssembly module: starts with b'this is "):
        runtime.prepare(sha256_digest(data), data, metered=False)


@pytest.mark.parametrize(
    ("wasm", "message"),
    [
        (b"\0asm\x01\0\0\0\x05", "invalid WebAssembly module: unexpected end-of-file"),
        (b"\0asm\x0d\0\x01\0", "invalid WebAssembly module: expected a WebAssembly module but"),
        (
            wasmtime.wat2wasm('(module (import "env" "f" (func)))'),
            "module imports env.f; only wasi_snapshot_preview1 is provided",
        ),
        (
            wasmtime.wat2wasm('(module (import "wasi_snapshot_preview1" "nope" (func)))'),
            "cannot link module",
        ),
    ],
)
def test_modules_that_cannot_run(runtime: Runtime, wasm: bytes, message: str) -> None:
    data = bytes(wasm)
    with pytest.raises(ModuleError, match=f"^{message}"):
        runtime.prepare(sha256_digest(data), data, metered=False)
    assert issubclass(ModuleError, ValueError)


def test_bytes_must_match_the_digest(runtime: Runtime) -> None:
    wasm = (WASM / "add.wasm").read_bytes()
    with pytest.raises(DigestMismatch):
        runtime.prepare(sha256_digest(b"other"), wasm, metered=False)


def test_precompiled_module_is_reused_by_a_second_runtime(tmp_path: Path) -> None:
    wasm = (WASM / "hello.wasm").read_bytes()
    digest = sha256_digest(wasm)
    first = Runtime(tmp_path)
    assert not first.is_prepared(digest, metered=False)

    compile_started = time.perf_counter()
    first.prepare(digest, wasm, metered=False)
    compile_s = time.perf_counter() - compile_started
    first.close()

    cached = first.cache_path(digest, metered=False)
    assert cached.name == f"{digest.removeprefix('sha256:')}.plain.{WASMTIME_VERSION}.cwasm"
    assert cached.is_file()
    assert first.compilations == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [cached.name]  # no temp files left

    second = Runtime(tmp_path)
    assert second.is_prepared(digest, metered=False)
    assert not second.is_prepared(digest, metered=True)  # a different engine, a different file
    load_started = time.perf_counter()
    prepared = second.prepare(digest, wasm, metered=False)
    load_s = time.perf_counter() - load_started

    assert second.compilations == 0
    assert load_s < compile_s / 5
    outcome = run(second, prepared, None)
    assert outcome.stdout == "main\nGREETING=(unset)\n"
    second.close()


def test_unusable_precompiled_file_is_replaced(tmp_path: Path) -> None:
    wasm = (WASM / "add.wasm").read_bytes()
    digest = sha256_digest(wasm)
    rt = Runtime(tmp_path)
    rt.cache_path(digest, metered=True).write_bytes(b"garbage")

    prepared = rt.prepare(digest, wasm, metered=True)

    assert rt.compilations == 1
    assert run(rt, prepared, "add", "1", "1", limits=Limits(fuel=100)).result == ("2",)
    assert Runtime(tmp_path).prepare(digest, wasm, metered=True).metered
    rt.close()


def test_concurrent_first_runs_compile_once(tmp_path: Path) -> None:
    wasm = (WASM / "hello.wasm").read_bytes()
    digest = sha256_digest(wasm)
    rt = Runtime(tmp_path / "cache")
    try:
        barrier = threading.Barrier(4)
        prepared: list[object] = []

        def first_run() -> None:
            barrier.wait()
            prepared.append(rt.prepare(digest, wasm, metered=False))

        threads = [threading.Thread(target=first_run) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert rt.compilations == 1
        assert len({id(p) for p in prepared}) == 1  # all share one prepared module
        assert rt.cached(digest, metered=False) is prepared[0]
    finally:
        rt.close()
