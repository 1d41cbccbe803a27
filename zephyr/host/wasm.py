"""The board's Wasm executor: wasmtime under the limits a WAMR board imposes.

A board runs a module's exported function with integer arguments and reports its integer
result. It has no WASI and no file system; a module may import only the board's small host API,
the same three natives the firmware registers with WAMR under the module name ``propeller``:

=====================  ====================  =================================================
import                 Wasm signature        behaviour (firmware and emulator alike)
=====================  ====================  =================================================
``propeller.log``      ``(i32 ptr, i32 len)``  write ``len`` bytes of linear memory at ``ptr``
                       ``-> ()``               (UTF-8 text) to the board log, as one line; at
                                               most ``LOG_LINE_BYTES`` are kept. A range outside
                                               linear memory traps.
``propeller.now_ms``   ``() -> i64``           milliseconds since the board booted (Zephyr's
                                               ``k_uptime_get()``); never goes backwards.
``propeller.sleep_ms`` ``(i32 ms) -> ()``      block this task for ``ms`` milliseconds (``ms`` <=
                                               0 returns at once). A stop or the task's timeout
                                               ends the sleep early, and the run ends there.
=====================  ====================  =================================================

Limits, as on the board: linear memory is capped per run (the smaller of the board's cap and
the task's ``memory``; instantiation fails when the module asks for more at start, and
``memory.grow`` returns -1 past it), the Wasm stack is small (``MAX_WASM_STACK``), each task
runs on its own thread, and a stop ends a run within milliseconds even in a tight loop.

How a stop reaches a spinning guest: the one ``Engine`` (shared by every board of the process)
uses epoch interruption. Each store gets a deadline of one tick and a deadline callback that
lets the guest go on for another tick, or fails the call once the run was stopped or ran out
of time. ``Run.stop()`` bumps the epoch itself, so a stop does not wait for the next tick of
the ticker thread, which runs only while some run does.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import wasmtime

from proplet.interrupt import Interruption, Ticker, interruptible
from schemas.messages import sha256_digest

log = logging.getLogger(__name__)

HOST_MODULE = "propeller"
HOST_FUNCTIONS = ("log", "now_ms", "sleep_ms")
DEFAULT_MEMORY = 256 * 1024  # linear memory a board gives one task, unless the task asks less
MAX_WASM_STACK = 64 * 1024
LOG_LINE_BYTES = 256
OUTPUT_BYTES = 1024  # what a run keeps of its log lines, for its result
TICK_SECONDS = 0.01
MODULES_IN_MEMORY = 64
WASM_PAGE = 65536

Status = Literal["completed", "failed", "stopped"]


class ModuleRejected(ValueError):
    """The bytes cannot run on a board: not Wasm, invalid, or imports the board lacks."""


@dataclass(frozen=True, slots=True)
class Call:
    """What to run: an exported function, its integer arguments, and limits."""

    function: str
    args: tuple[int, ...] = ()
    memory: int | None = None  # the task's cap in bytes; the board's cap applies as well
    timeout_ms: int | None = None


@dataclass(frozen=True, slots=True)
class RunResult:
    status: Status
    result: str | None = None  # the function's integer result as decimal text, if it has one
    error: str | None = None  # a sentence for a person, set unless completed
    output: str = ""  # the lines the guest logged, up to OUTPUT_BYTES
    elapsed_ms: float = 0.0


# Runs on this thread, for the host functions (the epoch callback finds its run by key).
_current = threading.local()


# --- the host API ---------------------------------------------------------------------------


def _running() -> Run:
    run = getattr(_current, "run", None)
    if run is None:  # pragma: no cover - host functions run only inside Run._call
        raise RuntimeError("host function called outside a run")
    assert isinstance(run, Run)
    return run


def _host_log(caller: Any, ptr: int, length: int) -> None:
    run = _running()
    memory = caller.get("memory")
    size = memory.data_len(caller) if isinstance(memory, wasmtime.Memory) else 0
    start, count = ptr & 0xFFFFFFFF, length & 0xFFFFFFFF
    if memory is None or start + count > size:
        run._fault = f"log: bytes {start}..{start + count} lie outside linear memory ({size})"
        raise RuntimeError(run._fault)
    data = bytes(memory.read(caller, start, start + min(count, LOG_LINE_BYTES)))
    run._log(data.decode("utf-8", errors="replace"))


def _host_now_ms() -> int:
    return _running().executor.uptime_ms()


def _host_sleep_ms(ms: int) -> None:
    run = _running()
    if ms > 0:
        run._sleep(ms / 1000)
    if run.interruption() is not None:
        # End the run here rather than at the next epoch tick; the reason is already recorded.
        raise RuntimeError("interrupted")


def _linker(engine: wasmtime.Engine) -> wasmtime.Linker:
    i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
    linker = wasmtime.Linker(engine)
    linker.define_func(
        HOST_MODULE, "log", wasmtime.FuncType([i32, i32], []), _host_log, access_caller=True
    )
    linker.define_func(HOST_MODULE, "now_ms", wasmtime.FuncType([], [i64]), _host_now_ms)
    linker.define_func(HOST_MODULE, "sleep_ms", wasmtime.FuncType([i32], []), _host_sleep_ms)
    return linker


# --- Executor -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Compiled:
    digest: str
    module: wasmtime.Module
    instance_pre: wasmtime.InstancePre
    functions: dict[str, wasmtime.FuncType]


class Executor:
    """The engine, the compiled-module cache and the epoch ticker; one per process.

    Every board of an emulator process shares it, as every task of a board shares WAMR.
    """

    def __init__(
        self,
        *,
        max_wasm_stack: int = MAX_WASM_STACK,
        modules_in_memory: int = MODULES_IN_MEMORY,
    ) -> None:
        config = wasmtime.Config()
        config.epoch_interruption = True
        config.max_wasm_stack = max_wasm_stack
        # One compile thread: modules are small, and a pool per core costs resident memory.
        config.parallel_compilation = False
        self.engine = wasmtime.Engine(config)
        self._linker = _linker(self.engine)
        self._modules_in_memory = modules_in_memory
        self._modules: OrderedDict[str, Compiled] = OrderedDict()
        self._compiling: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._ticker = Ticker(lambda: (self.engine,), TICK_SECONDS)
        self._booted = time.monotonic()
        self.compilations = 0

    def uptime_ms(self) -> int:
        return int((time.monotonic() - self._booted) * 1000)

    @property
    def running(self) -> int:
        return self._ticker.running

    def compile(self, digest: str, wasm: bytes) -> Compiled:
        """The compiled module for ``digest``, from memory or compiled now (once per digest).

        Raises ``ModuleRejected`` when the bytes cannot run on a board.
        """
        with self._lock:
            gate = self._compiling.setdefault(digest, threading.Lock())
        with gate:
            with self._lock:
                found = self._modules.get(digest)
                if found is not None:
                    self._modules.move_to_end(digest)
                    return found
            try:
                compiled = self._compile(digest, wasm)
                with self._lock:
                    self._modules[digest] = compiled
                    while len(self._modules) > self._modules_in_memory:
                        self._modules.popitem(last=False)
            finally:
                with self._lock:
                    self._compiling.pop(digest, None)
            return compiled

    def start(
        self,
        wasm: bytes,
        call: Call,
        *,
        board_memory: int = DEFAULT_MEMORY,
        on_done: Callable[[Run, RunResult], None],
        name: str = "task",
    ) -> Run:
        """Compile (or find) the module and run ``call`` on a new thread.

        ``on_done`` gets the run and its result on that thread, exactly once, also when the
        module cannot run at all.
        """
        run = Run(self, wasm, call, board_memory, on_done)
        thread = threading.Thread(target=run._thread_main, name=f"wasm-{name}", daemon=True)
        run._thread = thread
        thread.start()
        return run

    def close(self) -> None:
        """Stop every run and the ticker."""
        self._ticker.close()

    # -- internals

    def _compile(self, digest: str, wasm: bytes) -> Compiled:
        if wasm[:4] != b"\0asm":
            raise ModuleRejected(f"not a WebAssembly module: starts with {wasm[:8]!r}")
        actual = sha256_digest(wasm)
        if actual != digest:
            raise ModuleRejected(f"digest mismatch: expected {digest}, got {actual}")
        try:
            module = wasmtime.Module(self.engine, wasm)
        except wasmtime.WasmtimeError as exc:
            raise ModuleRejected(f"invalid WebAssembly module: {_cause(exc)}") from None
        foreign = sorted(
            f"{imp.module}.{imp.name}"
            for imp in module.imports
            if imp.module != HOST_MODULE or imp.name not in HOST_FUNCTIONS
        )
        if foreign:
            offered = ", ".join(f"{HOST_MODULE}.{name}" for name in HOST_FUNCTIONS)
            raise ModuleRejected(
                f"module imports {', '.join(foreign)}; a board offers only {offered}"
            )
        try:
            instance_pre = self._linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            raise ModuleRejected(f"cannot link module: {_cause(exc)}") from None
        functions = {
            export.name: export.type
            for export in module.exports
            if isinstance(export.type, wasmtime.FuncType)
        }
        with self._lock:
            self.compilations += 1
        return Compiled(digest, module, instance_pre, functions)

    def _begin(self, run: Run) -> bool:
        return self._ticker.begin(run)

    def _end(self, run: Run) -> None:
        self._ticker.end(run)


class Run:
    """One run of a compiled module on its own thread. ``stop()`` is safe from any thread."""

    def __init__(
        self,
        executor: Executor,
        wasm: bytes,
        call: Call,
        board_memory: int,
        on_done: Callable[[Run, RunResult], None],
    ) -> None:
        self.executor = executor
        self.wasm = wasm
        self.compiled: Compiled | None = None
        self.call = call
        self.memory_cap = min(board_memory, call.memory) if call.memory else board_memory
        self._on_done = on_done
        self._thread: threading.Thread | None = None
        self._interrupt = Interruption()
        self._fault: str | None = None
        self._output: list[str] = []
        self._output_bytes = 0
        self.finished = threading.Event()
        self.result: RunResult | None = None

    def stop(self) -> None:
        """Ask the run to end; it reports ``stopped`` within milliseconds."""
        self._interrupt.stop()
        self.executor.engine.increment_epoch()

    def join(self, timeout: float | None = None) -> bool:
        return self.finished.wait(timeout)

    @property
    def logged(self) -> str:
        """The lines the guest has logged so far (up to OUTPUT_BYTES)."""
        return "".join(self._output)

    # -- the worker thread

    def _thread_main(self) -> None:
        try:
            result = self._execute()
        except Exception as exc:  # a bug here must still end the task, not hang it
            log.exception("run of %s failed unexpectedly", self.call.function)
            result = RunResult("failed", error=f"internal error: {exc}")
        self.result = result
        self.finished.set()
        self._on_done(self, result)

    def _execute(self) -> RunResult:
        started = time.monotonic()
        self._interrupt.start(started, self.call.timeout_ms)

        def done(status: Status, **fields: Any) -> RunResult:
            elapsed = (time.monotonic() - started) * 1000
            return RunResult(status, output="".join(self._output), elapsed_ms=elapsed, **fields)

        if self._interrupt.stop_requested:
            return done("stopped", error="stopped")
        digest = sha256_digest(self.wasm)
        try:
            compiled = self.compiled = self.executor.compile(digest, self.wasm)
        except ModuleRejected as exc:
            return done("failed", error=str(exc))
        functype = compiled.functions.get(self.call.function)
        if functype is None:
            names = ", ".join(compiled.functions) or "(none)"
            return done(
                "failed", error=f"function {self.call.function!r} not exported; exports: {names}"
            )
        try:
            params = integer_arguments(functype, self.call.args)
            result_kind = integer_result(functype)
        except ValueError as exc:
            return done("failed", error=str(exc))

        store = wasmtime.Store(self.executor.engine)
        if not self.executor._begin(self):
            store.close()
            return done("stopped", error="stopped: the board is shutting down")
        _current.run = self
        instance = None
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(interruptible(store, self._interrupt))
            store.set_limits(memory_size=self.memory_cap)
            try:
                instance = compiled.instance_pre.instantiate(store)
                exports = instance.exports(store)
                if "_initialize" in compiled.functions:
                    # A reactor sets itself up first, as on the firmware and the proplet.
                    setup = exports["_initialize"]
                    assert isinstance(setup, wasmtime.Func)
                    setup(store)
                func = exports[self.call.function]
                assert isinstance(func, wasmtime.Func)  # Compiled.functions lists only functions
                value = func(store, *params)
            except Exception as exc:
                # A host function's exception comes back as itself (wasmtime-py re-raises the
                # last one, whichever thread raised it): only this run's own records count.
                if self._interrupt.reason == "stopped":
                    return done("stopped", error="stopped")
                if self._interrupt.reason == "timeout":
                    return done("failed", error=f"timed out after {self.call.timeout_ms} ms")
                return done("failed", error=self._describe(exc, compiled, store, instance))
        finally:
            self.executor._end(self)
            store.close()
            stack.close()
            _current.run = None
        text = None if result_kind is None else str(value)
        return done("completed", result=text)

    # -- called on the worker thread from the callback and host functions

    def interruption(self) -> str | None:
        return self._interrupt.interruption()

    def _sleep(self, seconds: float) -> None:
        self._interrupt.sleep(seconds)

    def _log(self, line: str) -> None:
        log.info("[%s] %s", self.call.function, line)
        encoded = len(line.encode()) + 1
        if self._output_bytes + encoded <= OUTPUT_BYTES:
            self._output.append(line + "\n")
            self._output_bytes += encoded

    def _describe(
        self, error: Exception, compiled: Compiled, store: wasmtime.Store, instance: Any
    ) -> str:
        cap = self.memory_cap
        if self._fault is not None:
            return self._fault
        text = _cause(error)
        if instance is None:
            if "memory" in text and ("limit" in text or "exceed" in text):
                need = _initial_memory(compiled.module)
                wants = f": the module needs {need} bytes at start" if need > cap else ""
                return f"memory limit of {cap} bytes reached{wants}"
            return f"cannot instantiate: {text}"
        if not isinstance(error, (wasmtime.Trap, wasmtime.WasmtimeError)):
            text = "trap: a host function failed"
        code = error.trap_code if isinstance(error, wasmtime.Trap) else None
        if code == wasmtime.TrapCode.STACK_OVERFLOW:
            text = f"stack overflow (the board's Wasm stack is {MAX_WASM_STACK // 1024} KiB)"
        elif code is not None:
            text = _TRAP_TEXT.get(code, f"trap: {text}")
        if _memory_full(store, instance, cap):
            # wasmtime reports the trap that followed a refused memory.grow, not the refusal.
            return f"memory limit of {cap} bytes reached; then {text}"
        return text


_TRAP_TEXT: dict[Any, str] = {
    wasmtime.TrapCode.UNREACHABLE: "trap: unreachable executed",
    wasmtime.TrapCode.INTEGER_DIVISION_BY_ZERO: "trap: integer division by zero",
    wasmtime.TrapCode.INTEGER_OVERFLOW: "trap: integer overflow",
    wasmtime.TrapCode.MEMORY_OUT_OF_BOUNDS: "trap: out-of-bounds memory access",
    wasmtime.TrapCode.TABLE_OUT_OF_BOUNDS: "trap: out-of-bounds table access",
    wasmtime.TrapCode.INDIRECT_CALL_TO_NULL: "trap: indirect call to a null table entry",
    wasmtime.TrapCode.BAD_SIGNATURE: "trap: indirect call with the wrong signature",
    wasmtime.TrapCode.BAD_CONVERSION_TO_INTEGER: "trap: invalid conversion to integer",
}

_INT_BITS = {"i32": 32, "i64": 64}


def integer_arguments(functype: wasmtime.FuncType, args: Sequence[int | str]) -> list[int]:
    """``args`` as the integers ``functype`` takes; ``ValueError`` with a reason otherwise."""
    params = [str(p) for p in functype.params]
    if len(args) != len(params):
        noun = "argument" if len(params) == 1 else "arguments"
        raise ValueError(f"expected {len(params)} {noun}, got {len(args)}")
    values = []
    for position, (kind, text) in enumerate(zip(params, args, strict=True), start=1):
        bits = _INT_BITS.get(kind)
        if bits is None:
            raise ValueError(f"parameter {position} is {kind}; a board passes integers only")
        try:
            value = text if isinstance(text, int) else int(text.strip(), 10)
        except ValueError:
            raise ValueError(f"argument {position} {text!r} is not a valid {kind}") from None
        # The signed and the unsigned spelling are both accepted; Wasm integers have no sign.
        if not -(2 ** (bits - 1)) <= value < 2**bits:
            raise ValueError(f"argument {position} {text!r} is out of range for {kind}")
        values.append(value - 2**bits if value >= 2 ** (bits - 1) else value)
    return values


def integer_result(functype: wasmtime.FuncType) -> str | None:
    """The kind of the function's one integer result, None without one; else ValueError."""
    results = [str(r) for r in functype.results]
    if not results:
        return None
    if len(results) > 1 or results[0] not in _INT_BITS:
        raise ValueError(
            f"the function returns ({', '.join(results)}); a board reads one integer result"
        )
    return results[0]


def _initial_memory(module: wasmtime.Module) -> int:
    types = [item.type for item in module.imports] + [item.type for item in module.exports]
    return sum(t.limits.min * WASM_PAGE for t in types if isinstance(t, wasmtime.MemoryType))


def _memory_full(store: wasmtime.Store, instance: Any, cap: int) -> bool:
    total = sum(
        extern.data_len(store)
        for extern in instance.exports(store).values()
        if isinstance(extern, wasmtime.Memory)
    )
    return total > 0 and total + WASM_PAGE > cap


def _cause(error: Exception) -> str:
    text = str(error)
    if "Caused by:" in text:
        text = text.rsplit("Caused by:", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(error).__name__
