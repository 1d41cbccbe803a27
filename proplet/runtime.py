"""Wasm execution for the proplet: compile (or load precompiled) modules and run them on
wasmtime under limits of memory, wall-clock time, fuel and captured output, with a stop that
works even on a module spinning in a tight loop.

`Runtime` owns the engines, the precompiled-module cache and one epoch ticker thread.
`Execution` is one run: `run()` blocks its (worker) thread and returns an `Outcome` for every
guest fault; `stop()` may be called from any thread.

How interruption works: both engines use epoch interruption. Every store gets an epoch
deadline of one tick and a deadline callback (raw FFI, wasmtime-py has no wrapper) that either
lets the guest continue for another tick or, when the execution was stopped or timed out, makes
the call fail. The reason is recorded in Python before failing, so outcomes never depend on
parsing wasmtime's messages. The ticker bumps the epoch every few ms only while something runs;
`stop()` bumps it at once, so a stop does not wait for the next tick. Epochs do not reach a
guest blocked in a host call, so WASI sleeps are served by our own wait (see `_poll_oneoff`).
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import logging
import math
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import wasmtime
from wasmtime import _ffi as ffi

from proplet.artifacts import DigestMismatch, digest_hex, write_atomically
from proplet.interrupt import Interruption, Ticker, interruptible
from schemas.messages import sha256_digest

log = logging.getLogger(__name__)

WASI_MODULE = "wasi_snapshot_preview1"
DATA_GUEST_PATH = "/data"
INPUTS_GUEST_PATH = "/in"
OUTPUTS_GUEST_PATH = "/out"
MAX_WASM_STACK = 512 * 1024
TICK_SECONDS = 0.005
PREPARED_IN_MEMORY = 64  # prepared modules kept in memory, least recently used dropped first
WASM_PAGE = 65536

try:
    WASMTIME_VERSION = metadata.version("wasmtime")
except metadata.PackageNotFoundError:  # pragma: no cover - vendored copies
    WASMTIME_VERSION = "unknown"

Status = Literal["completed", "failed", "stopped"]


class ModuleError(ValueError):
    """The bytes are not a module this runtime can run (not Wasm, invalid, unknown imports)."""


@dataclass(frozen=True, slots=True)
class Limits:
    memory: int | None = None  # bytes of linear memory, all memories of the instance together
    timeout_ms: int | None = None  # wall clock, from the start of run()
    fuel: int | None = None  # wasmtime fuel units; needs a module prepared with metered=True
    output_bytes: int = 65536  # kept per stream (stdout, stderr); the rest is dropped


@dataclass(frozen=True, slots=True)
class Invocation:
    """What to run: an exported function with string arguments, or (function None) the WASI
    command's `_start` with argv, env and stdin."""

    function: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    stdin: str | None = None
    data_dir: Path | None = None  # preopened read-only at /data
    name: str = "main"  # argv[0]
    inputs_dir: Path | None = None  # preopened read-only at /in
    outputs_dir: Path | None = None  # preopened read-write at /out


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Status
    exit_code: int | None = None  # WASI exit code; None in function mode unless proc_exit ran
    result: tuple[str, ...] | None = None  # function results as text; None in command mode
    stdout: str = ""
    stderr: str = ""
    truncated: bool = False  # some output was dropped at Limits.output_bytes
    error: str | None = None  # a sentence for a person, set unless completed
    elapsed_ms: float = 0.0


@dataclass(frozen=True, slots=True, eq=False)
class Prepared:
    """A compiled module, linked against WASI, ready for any number of executions."""

    digest: str
    metered: bool
    module: wasmtime.Module
    instance_pre: wasmtime.InstancePre
    functions: Mapping[str, wasmtime.FuncType]  # function exports, in module order
    wasi: bool  # imports wasi_snapshot_preview1, so each store needs a WASI context


# --- Runtime --------------------------------------------------------------------------------


class Runtime:
    """Engines, linkers and the precompiled cache; one per proplet."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        cache_dir.mkdir(parents=True, exist_ok=True)
        # The metered engine (fuel) is made on first use: most agents never run a fuel limit.
        self._engines = {False: _engine(False)}
        self._linkers = {False: _linker(self._engines[False])}
        self._lock = threading.Lock()
        self._ticker = Ticker(self._all_engines, TICK_SECONDS)
        self.compilations = 0  # modules compiled (not loaded from cache) by this Runtime
        # Prepared modules kept in memory: a repeated run skips reading, deserializing, linking.
        self._prepared: OrderedDict[tuple[str, bool], Prepared] = OrderedDict()
        self._preparing: dict[tuple[str, bool], threading.Lock] = {}
        self._preparing_lock = threading.Lock()

    def cache_path(self, digest: str, metered: bool) -> Path:
        flavour = "metered" if metered else "plain"
        return self.cache_dir / f"{digest_hex(digest)}.{flavour}.{WASMTIME_VERSION}.cwasm"

    @property
    def running(self) -> int:
        """How many executions are inside `run()` right now."""
        return self._ticker.running

    def is_prepared(self, digest: str, metered: bool) -> bool:
        return self.cache_path(digest, metered).is_file()

    def cached(self, digest: str, *, metered: bool) -> Prepared | None:
        """The prepared module if it is in memory (no IO)."""
        key = (digest, metered)
        with self._lock:
            prepared = self._prepared.get(key)
            if prepared is not None:
                self._prepared.move_to_end(key)
            return prepared

    def prepare(self, digest: str, wasm: bytes, *, metered: bool) -> Prepared:
        """Load the precompiled module from the cache, or validate, compile and cache it.

        Raises ModuleError when `wasm` cannot run here, DigestMismatch when it does not hash
        to `digest` (only checked when compiling: the cache is keyed by digest).
        """
        with self._preparing_lock:
            gate = self._preparing.setdefault((digest, metered), threading.Lock())
        # Concurrent first runs of one module wait for a single compile instead of each compiling.
        with gate:
            cached = self.cached(digest, metered=metered)
            if cached is not None:
                return cached
            return self._prepare(digest, wasm, metered)

    def _prepare(self, digest: str, wasm: bytes, metered: bool) -> Prepared:
        engine = self._engine(metered)
        path = self.cache_path(digest, metered)
        module: wasmtime.Module | None = None
        if path.is_file():
            try:
                module = wasmtime.Module.deserialize_file(engine, str(path))
            except wasmtime.WasmtimeError as e:
                log.warning("ignoring unusable precompiled %s: %s", path.name, _cause(e))
        if module is None:
            module = self._compile(engine, digest, wasm)
            # wasmtime trusts a precompiled file it loads: never leave a torn one behind.
            write_atomically(path, bytes(module.serialize()))
        prepared = self._link(digest, metered, module)
        with self._lock:
            self._prepared[(digest, metered)] = prepared
            while len(self._prepared) > PREPARED_IN_MEMORY:
                self._prepared.popitem(last=False)
        return prepared

    def execution(self, prepared: Prepared, invocation: Invocation, limits: Limits) -> Execution:
        if limits.fuel is not None and not prepared.metered:
            raise ValueError("a fuel limit needs a module prepared with metered=True")
        if self._ticker.closed:
            raise RuntimeError("runtime is closed")
        return Execution(self, prepared, invocation, limits)

    def close(self) -> None:
        """Stop every running execution and the ticker."""
        self._ticker.close()

    # -- internals

    def _compile(self, engine: wasmtime.Engine, digest: str, wasm: bytes) -> wasmtime.Module:
        if wasm[:4] != b"\0asm":
            raise ModuleError(f"not a WebAssembly module: starts with {wasm[:8]!r}")
        actual = sha256_digest(wasm)
        if actual != digest:
            raise DigestMismatch(f"expected {digest}, got {actual} ({len(wasm)} bytes)")
        started = time.perf_counter()
        try:
            module = wasmtime.Module(engine, wasm)
        except wasmtime.WasmtimeError as e:
            raise ModuleError(f"invalid WebAssembly module: {_cause(e)}") from None
        with self._lock:
            self.compilations += 1
        log.debug(
            "compiled %s (%d bytes) in %.1f ms",
            digest,
            len(wasm),
            (time.perf_counter() - started) * 1e3,
        )
        return module

    def _link(self, digest: str, metered: bool, module: wasmtime.Module) -> Prepared:
        foreign = sorted(
            f"{imp.module}.{imp.name}" for imp in module.imports if imp.module != WASI_MODULE
        )
        if foreign:
            raise ModuleError(
                f"module imports {', '.join(foreign)}; only {WASI_MODULE} is provided"
            )
        try:
            self._engine(metered)
            instance_pre = self._linkers[metered].instantiate_pre(module)
        except wasmtime.WasmtimeError as e:
            raise ModuleError(f"cannot link module: {_cause(e)}") from None
        functions = {
            export.name: export.type
            for export in module.exports
            if isinstance(export.type, wasmtime.FuncType)
        }
        wasi = any(imp.module == WASI_MODULE for imp in module.imports)
        return Prepared(digest, metered, module, instance_pre, functions, wasi)

    def _engine_for(self, prepared: Prepared) -> wasmtime.Engine:
        return self._engines[prepared.metered]

    def _begin(self, execution: Execution) -> bool:
        """Count the execution as running and make sure epochs tick; False once closed."""
        return self._ticker.begin(execution)

    def _end(self, execution: Execution) -> None:
        self._ticker.end(execution)

    def _all_engines(self) -> list[wasmtime.Engine]:
        with self._lock:
            return list(self._engines.values())

    def _engine(self, metered: bool) -> wasmtime.Engine:
        with self._lock:
            if metered not in self._engines:
                self._engines[metered] = _engine(metered)
                self._linkers[metered] = _linker(self._engines[metered])
            return self._engines[metered]

    def _nudge(self, prepared: Prepared) -> None:
        """Run the deadline callbacks of this engine's stores now rather than at the next tick."""
        self._engine_for(prepared).increment_epoch()


def _linker(engine: wasmtime.Engine) -> wasmtime.Linker:
    """WASI preview 1, with poll_oneoff replaced by one whose sleeps end on stop or timeout."""
    wasi_only = wasmtime.Linker(engine)
    wasi_only.define_wasi()
    poll_shim = wasmtime.Module(engine, _POLL_SHIM)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    linker.allow_shadowing = True
    i32 = wasmtime.ValType.i32()
    linker.define_func(
        WASI_MODULE,
        "poll_oneoff",
        wasmtime.FuncType([i32, i32, i32, i32], [i32]),
        lambda caller, *args: _poll_oneoff(wasi_only, poll_shim, caller, *args),
        access_caller=True,
    )
    linker.allow_shadowing = False
    return linker


def _engine(metered: bool) -> wasmtime.Engine:
    config = wasmtime.Config()
    config.epoch_interruption = True
    config.consume_fuel = metered
    # Bounded so unbounded recursion fails fast, well inside a worker thread's native stack.
    config.max_wasm_stack = MAX_WASM_STACK
    # One compile thread: a pool of one per core costs resident memory on every agent, while
    # modules are compiled once and then loaded from the precompiled cache.
    config.parallel_compilation = False
    return wasmtime.Engine(config)


# --- sleeping guests -------------------------------------------------------------------------

# A guest that sleeps is blocked inside wasmtime's poll_oneoff, where epochs cannot reach it:
# `sleep(3600)` would hold off a stop or a timeout for an hour. wasi-libc's sleep, usleep and
# nanosleep all poll on relative clock subscriptions only; those are served here with a wait
# that stop() and the deadline cut short. Returning early is enough: back in Wasm code, the
# next epoch check interrupts the guest. Any other poll goes to wasmtime's own implementation.
_SUBSCRIPTION = struct.Struct("<QB7xI4xQQH6x")  # userdata, tag, clock id, timeout, precision, flags
_EVENT = struct.Struct("<QHB5xQH6x")  # userdata, errno, type, nbytes, flags
_EVENTTYPE_CLOCK = 0
_SUBCLOCKFLAG_ABSTIME = 1
_CLOCK_REALTIME, _CLOCK_MONOTONIC = 0, 1
_current = threading.local()  # the Execution running on this thread


def _poll_oneoff(
    wasi_only: wasmtime.Linker,
    poll_shim: wasmtime.Module,
    caller: wasmtime.Caller,
    subscriptions: int,
    events: int,
    count: int,
    nevents: int,
) -> int:
    execution: Execution | None = getattr(_current, "execution", None)
    memory = caller.get("memory")
    if execution is not None and isinstance(memory, wasmtime.Memory) and 0 < count <= 64:
        # i32 arguments arrive signed; as addresses they are unsigned
        at_subscriptions, at_events, at_nevents = (
            p & 0xFFFFFFFF for p in (subscriptions, events, nevents)
        )
        sleep = _relative_sleep(caller, memory, at_subscriptions, at_events, count, at_nevents)
        if sleep is not None:
            nanoseconds, due = sleep
            execution._sleep(nanoseconds / 1e9)
            data = b"".join(_EVENT.pack(userdata, 0, _EVENTTYPE_CLOCK, 0, 0) for userdata in due)
            memory.write(caller, data, at_events)
            memory.write(caller, struct.pack("<I", len(due)), at_nevents)
            return 0
    if not isinstance(memory, wasmtime.Memory):
        return _ERRNO_NOTSUP
    # wasmtime's poll_oneoff finds the memory through its caller's "memory" export, and a call
    # from Python has no calling instance: go through a shim instance exporting the guest's.
    poll = execution._wasi_poll if execution is not None else None
    if poll is None:
        wasi = wasi_only.get(caller, WASI_MODULE, "poll_oneoff")
        shim = wasmtime.Instance(caller, poll_shim, [wasi, memory])
        export = shim.exports(caller)["poll"]
        assert isinstance(export, wasmtime.Func)
        poll = export
        if execution is not None:
            execution._wasi_poll = poll
    result: int = poll(caller, subscriptions, events, count, nevents)
    return result


_POLL_SHIM = """
(module
  (import "wasi" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "guest" "memory" (memory 0))
  (export "memory" (memory 0))
  (func (export "poll") (param i32 i32 i32 i32) (result i32)
    (call $poll (local.get 0) (local.get 1) (local.get 2) (local.get 3))))
"""
_ERRNO_NOTSUP = 58


def _relative_sleep(
    caller: wasmtime.Caller,
    memory: wasmtime.Memory,
    subscriptions: int,
    events: int,
    count: int,
    nevents: int,
) -> tuple[int, list[int]] | None:
    """(nanoseconds, userdata of the subscriptions then due) if this poll is a plain sleep."""
    size = memory.data_len(caller)
    end = subscriptions + count * _SUBSCRIPTION.size
    if end > size or events + count * _EVENT.size > size or nevents + 4 > size:
        return None  # let wasmtime answer with its own error
    raw = bytes(memory.read(caller, subscriptions, end))
    clocks = [_SUBSCRIPTION.unpack_from(raw, i * _SUBSCRIPTION.size) for i in range(count)]
    if any(
        tag != 0
        or clock not in (_CLOCK_REALTIME, _CLOCK_MONOTONIC)
        or flags & _SUBCLOCKFLAG_ABSTIME
        for _, tag, clock, _, _, flags in clocks
    ):
        return None
    shortest = min(timeout for *_, timeout, _, _ in clocks)
    return shortest, [userdata for userdata, *_, timeout, _, _ in clocks if timeout == shortest]


# --- Execution ------------------------------------------------------------------------------


class _Capture:
    """A WASI output stream kept up to `limit` bytes; the guest always sees its writes succeed.

    wasmtime calls it on one of its own worker threads, one write at a time.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.truncated = False

    def __call__(self, chunk: bytes) -> int:
        written = len(chunk)
        room = self.limit - len(self.data)
        if written > room:
            self.truncated = True
            chunk = chunk[: max(room, 0)]
        self.data += chunk
        return written

    def text(self) -> str:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # When cut short, drop a multi-byte character split by the cut instead of showing U+FFFD.
        return decoder.decode(bytes(self.data), final=not self.truncated)


class Execution:
    """One run of a prepared module. Create with `Runtime.execution`."""

    def __init__(
        self, runtime: Runtime, prepared: Prepared, invocation: Invocation, limits: Limits
    ) -> None:
        self._runtime = runtime
        self.prepared = prepared
        self.invocation = invocation
        self.limits = limits
        self._interrupt = Interruption()
        self._started = False
        self._wasi_poll: wasmtime.Func | None = None  # wasmtime's own poll_oneoff, when needed

    def stop(self) -> None:
        """Ask the run to end; safe from any thread, before, during or after `run()`."""
        self._interrupt.stop()
        self._runtime._nudge(self.prepared)

    def run(self) -> Outcome:
        """Run to the end, a limit or a stop. Blocks; returns an Outcome for every guest fault."""
        if self._started:
            raise RuntimeError("an Execution runs once")
        self._started = True
        started = time.monotonic()
        self._interrupt.start(started, self.limits.timeout_ms)
        stdout = _Capture(self.limits.output_bytes)
        stderr = _Capture(self.limits.output_bytes)

        def outcome(status: Status, **kwargs: Any) -> Outcome:
            return Outcome(
                status,
                stdout=stdout.text(),
                stderr=stderr.text(),
                truncated=stdout.truncated or stderr.truncated,
                elapsed_ms=(time.monotonic() - started) * 1e3,
                **kwargs,
            )

        if self._interrupt.stop_requested:
            return outcome("stopped", error="stopped")
        inv = self.invocation
        function = "_start" if inv.function is None else inv.function
        functype = self.prepared.functions.get(function)
        if functype is None:
            names = ", ".join(self.prepared.functions) or "(none)"
            return outcome("failed", error=f"function {function!r} not exported; exports: {names}")
        try:
            params = _parse_args(functype, inv.args if inv.function is not None else ())
        except ValueError as e:
            return outcome("failed", error=str(e))

        store = wasmtime.Store(self._runtime._engine_for(self.prepared))
        if not self._runtime._begin(self):
            store.close()
            return outcome("stopped", error="stopped: the runtime is closed")
        _current.execution = self
        instance: wasmtime.Instance | None = None
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(interruptible(store, self._interrupt))
            if self.limits.memory is not None:
                store.set_limits(memory_size=self.limits.memory)
            if self.prepared.metered:
                store.set_fuel(self.limits.fuel if self.limits.fuel is not None else 2**63 - 1)
            if self.prepared.wasi:
                store.set_wasi(self._wasi_config(stdout, stderr))
            try:
                instance = self.prepared.instance_pre.instantiate(store)
                exports = instance.exports(store)
                if inv.function is not None and "_initialize" in self.prepared.functions:
                    _func(exports, "_initialize")(store)  # a WASI reactor sets itself up first
                values = _func(exports, function)(store, *params)
            except wasmtime.ExitTrap as e:
                if self._interrupt.reason is not None:
                    return self._interrupted(outcome)
                if e.code == 0:
                    return outcome("completed", exit_code=0)
                return outcome("failed", exit_code=e.code, error=f"exited with code {e.code}")
            except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
                if self._interrupt.reason is not None:
                    return self._interrupted(outcome)
                return outcome("failed", error=self._describe(e, store, instance))
        finally:
            self._runtime._end(self)
            # Close now, on this thread: a store left to the garbage collector can be dropped
            # during interpreter shutdown, when wasmtime's output threads can no longer call in.
            store.close()
            stack.close()
            _current.execution = None
        if inv.function is None:
            return outcome("completed", exit_code=0)
        return outcome("completed", result=_format_results(functype, values))

    # -- internals

    def _sleep(self, seconds: float) -> None:
        """A guest's sleep, cut short by stop() or by the deadline."""
        self._interrupt.sleep(seconds)

    def _interrupted(self, outcome: Callable[..., Outcome]) -> Outcome:
        if self._interrupt.reason == "stopped":
            return outcome("stopped", error="stopped")
        return outcome("failed", error=f"timed out after {self.limits.timeout_ms} ms")

    def _wasi_config(self, stdout: _Capture, stderr: _Capture) -> wasmtime.WasiConfig:
        inv = self.invocation
        config = wasmtime.WasiConfig()
        config.argv = [inv.name, *(inv.args if inv.function is None else ())]
        config.env = list(inv.env.items())
        if inv.stdin is not None:
            _set_stdin_bytes(config, inv.stdin.encode())
        config.stdout_custom = stdout
        config.stderr_custom = stderr
        # The third argument says whether the guest may modify the directory and its files.
        if inv.data_dir is not None:
            config.preopen_dir(str(inv.data_dir), DATA_GUEST_PATH, False)
        if inv.inputs_dir is not None:
            config.preopen_dir(str(inv.inputs_dir), INPUTS_GUEST_PATH, False)
        if inv.outputs_dir is not None:
            config.preopen_dir(str(inv.outputs_dir), OUTPUTS_GUEST_PATH, True)
        return config

    def _describe(
        self,
        error: wasmtime.Trap | wasmtime.WasmtimeError,
        store: wasmtime.Store,
        instance: wasmtime.Instance | None,
    ) -> str:
        limit = self.limits.memory
        if instance is None:
            text = f"cannot instantiate: {_cause(error)}"
            if limit is not None and "exceeds memory limits" in text:
                return f"memory limit of {limit} bytes reached; {text}"
            return text
        code = error.trap_code if isinstance(error, wasmtime.Trap) else None
        if code == wasmtime.TrapCode.OUT_OF_FUEL:
            return f"out of fuel after {self.limits.fuel} units"
        text = _cause(error) if code is None else _TRAP_TEXT.get(code, f"trap: {_cause(error)}")
        if limit is not None and _memory_full(store, instance, limit):
            # The guest trapped with its memory at the limit: a refused memory.grow is the
            # likely cause (wasmtime reports only the trap that followed).
            return f"memory limit of {limit} bytes reached; then {text}"
        return text


_TRAP_TEXT: dict[wasmtime.TrapCode, str] = {
    wasmtime.TrapCode.STACK_OVERFLOW: "stack overflow (unbounded recursion?)",
    wasmtime.TrapCode.UNREACHABLE: "trap: unreachable executed",
    wasmtime.TrapCode.INTEGER_DIVISION_BY_ZERO: "trap: integer division by zero",
    wasmtime.TrapCode.INTEGER_OVERFLOW: "trap: integer overflow",
    wasmtime.TrapCode.MEMORY_OUT_OF_BOUNDS: "trap: out-of-bounds memory access",
    wasmtime.TrapCode.TABLE_OUT_OF_BOUNDS: "trap: out-of-bounds table access",
    wasmtime.TrapCode.INDIRECT_CALL_TO_NULL: "trap: indirect call to a null table entry",
    wasmtime.TrapCode.BAD_SIGNATURE: "trap: indirect call with the wrong signature",
    wasmtime.TrapCode.BAD_CONVERSION_TO_INTEGER: "trap: invalid conversion to integer",
}


def _func(exports: Mapping[str, Any], name: str) -> wasmtime.Func:
    func = exports[name]
    assert isinstance(func, wasmtime.Func)  # Prepared.functions lists function exports only
    return func


def _memory_full(store: wasmtime.Store, instance: wasmtime.Instance, limit: int) -> bool:
    total = sum(
        extern.data_len(store)
        for extern in instance.exports(store).values()
        if isinstance(extern, wasmtime.Memory)
    )
    return total + WASM_PAGE > limit


def _cause(error: Exception) -> str:
    """The root cause from a wasmtime error, without the backtrace."""
    text = str(error)
    if "Caused by:" in text:
        text = text.rsplit("Caused by:", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(error).__name__


def _set_stdin_bytes(config: wasmtime.WasiConfig, data: bytes) -> None:
    # wasmtime-py wraps only stdin_file; the C API also takes bytes and owns the vector after.
    vec = ffi.wasm_byte_vec_t()
    buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    ffi.wasm_byte_vec_new(ctypes.byref(vec), len(data), buffer)
    ffi.wasi_config_set_stdin_bytes(config.ptr(), ctypes.byref(vec))


# --- converting arguments and results --------------------------------------------------------

_INT_BITS = {"i32": 32, "i64": 64}


def _parse_args(functype: wasmtime.FuncType, args: tuple[str, ...]) -> list[int | float]:
    params = functype.params
    if len(args) != len(params):
        noun = "argument" if len(params) == 1 else "arguments"
        raise ValueError(f"expected {len(params)} {noun}, got {len(args)}")
    values: list[int | float] = []
    for position, (valtype, text) in enumerate(zip(params, args, strict=True), start=1):
        kind = str(valtype)
        try:
            if kind in _INT_BITS:
                values.append(_parse_int(text, _INT_BITS[kind]))
            elif kind in ("f32", "f64"):
                values.append(float(text))
            else:
                raise ValueError(f"parameter {position} is {kind}, which cannot be given as text")
        except ValueError as e:
            if "cannot be given" in str(e):
                raise
            raise ValueError(f"argument {position} {text!r} is not a valid {kind}") from None
    return values


def _parse_int(text: str, bits: int) -> int:
    value = int(text.strip())
    # Accept the signed and the unsigned spelling; wasm integers are sign-agnostic.
    if not -(2 ** (bits - 1)) <= value < 2**bits:
        raise ValueError("out of range")
    return value - 2**bits if value >= 2 ** (bits - 1) else value


def _format_results(functype: wasmtime.FuncType, values: Any) -> tuple[str, ...]:
    kinds = [str(t) for t in functype.results]
    if not kinds:
        return ()
    if len(kinds) == 1:
        values = [values]
    return tuple(_format_value(kind, value) for kind, value in zip(kinds, values, strict=True))


def _format_value(kind: str, value: Any) -> str:
    if kind == "f32" and isinstance(value, float):
        return _f32_text(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _f32_text(value: float) -> str:
    """The shortest decimal that reads back as the same f32 (0.1, not 0.10000000149011612)."""
    if not math.isfinite(value):
        return repr(value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", candidate))[0] == value:
            return repr(candidate)
    return repr(value)
