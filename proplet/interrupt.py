"""Stopping a running Wasm store from another thread: wasmtime's epoch deadline callback.

wasmtime-py does not expose the callback, so it is set through the raw C API. Each store gets
a deadline of one epoch; when a ticker thread increments the engine's epoch, the callback asks
the store's owner (``Interruptible.interruption``) whether to go on. ``None`` extends the
deadline by one epoch; a reason ends the run with a trap whose message is that reason.

Stores find their owner through an integer key passed as the callback's data pointer, so one
module-level callback serves every store, and no per-store ctypes closure can be freed while
wasmtime still holds it. The board emulator (``zephyr.host``) uses the same hook.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, Protocol

import wasmtime
from wasmtime import _ffi as ffi


class Interruptible(Protocol):
    def interruption(self) -> str | None:
        """Why the run must end now, or ``None`` to let it go on. Called on its own thread."""
        ...


_EpochCallbackType = ctypes.CFUNCTYPE(
    ctypes.c_size_t,
    ctypes.POINTER(ffi.wasmtime_context_t),
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(ctypes.c_uint8),
)
_FinalizerType = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_UPDATE_DEADLINE_CONTINUE = 0

_owners: dict[int, Interruptible] = {}
_keys = itertools.count(1)


def _on_epoch(_context: Any, data: int | None, delta: Any, kind: Any) -> int:
    owner = _owners.get(data or 0)
    reason = owner.interruption() if owner is not None else None
    if reason is None:
        delta[0] = 1
        kind[0] = _UPDATE_DEADLINE_CONTINUE
        return 0
    error = ffi.wasmtime_error_new(ctypes.create_string_buffer(reason.encode()))
    return ctypes.cast(error, ctypes.c_void_p).value or 0


def _no_finalizer(_data: int | None) -> None:
    return None


_EPOCH_CALLBACK = _EpochCallbackType(_on_epoch)
_NO_FINALIZER = _FinalizerType(_no_finalizer)


@contextmanager
def interruptible(store: wasmtime.Store, owner: Interruptible) -> Iterator[None]:
    """While inside, every epoch tick of ``store``'s engine asks ``owner`` whether to go on."""
    key = next(_keys)
    _owners[key] = owner
    try:
        store.set_epoch_deadline(1)
        ffi.wasmtime_store_epoch_deadline_callback(store.ptr(), _EPOCH_CALLBACK, key, _NO_FINALIZER)
        yield
    finally:
        _owners.pop(key, None)


class Stoppable(Protocol):
    def stop(self) -> None: ...


class Ticker:
    """The runs in progress, and one thread that ticks their engines' epochs while any runs.

    Each tick makes wasmtime call every running store's epoch callback (``interruptible``),
    which is how a stop or a timeout reaches a guest spinning in Wasm code. With no run in
    progress the thread sleeps on a condition and costs nothing.
    """

    def __init__(self, engines: Callable[[], Iterable[wasmtime.Engine]], period: float) -> None:
        self._engines = engines
        self._period = period
        self._cond = threading.Condition()
        self._active: set[Stoppable] = set()
        self._thread: threading.Thread | None = None
        self.closed = False

    @property
    def running(self) -> int:
        with self._cond:
            return len(self._active)

    def begin(self, run: Stoppable) -> bool:
        """Count ``run`` as running and make sure epochs tick; False once closed."""
        with self._cond:
            if self.closed:
                return False
            self._active.add(run)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._tick, name="wasm-epoch-ticker", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
            return True

    def end(self, run: Stoppable) -> None:
        with self._cond:
            self._active.discard(run)

    def close(self) -> None:
        """Stop every run, then the thread."""
        with self._cond:
            self.closed = True
            active = list(self._active)
            self._cond.notify_all()
        for run in active:
            run.stop()
        if self._thread is not None:
            # Bounded: a guest blocked in a host call other than a sleep sees its stop only
            # when that call returns.
            self._thread.join(timeout=2.0)

    def _tick(self) -> None:
        while True:
            with self._cond:
                while not self._active and not self.closed:
                    self._cond.wait()
                if self.closed and not self._active:
                    return
            time.sleep(self._period)
            for engine in self._engines():
                engine.increment_epoch()


class Interruption:
    """Why a run must end, if it must: a stop asked from any thread, or its deadline.

    It is what ``interruptible`` asks on every epoch tick, and a guest's sleep in a host
    function goes through ``sleep`` so that a stop or the deadline ends it early. The first
    reason found sticks.
    """

    def __init__(self) -> None:
        self.stop_requested = False
        self.reason: Literal["stopped", "timeout"] | None = None
        self._deadline: float | None = None
        self._wake = threading.Event()

    def start(self, started: float, timeout_ms: int | None) -> None:
        """The run began at ``started`` (monotonic clock); it may last ``timeout_ms``."""
        if timeout_ms is not None:
            self._deadline = started + timeout_ms / 1000

    def stop(self) -> None:
        self.stop_requested = True
        self._wake.set()

    def interruption(self) -> str | None:
        if self.reason is None:
            if self.stop_requested:
                self.reason = "stopped"
            elif self._deadline is not None and time.monotonic() >= self._deadline:
                self.reason = "timeout"
        return self.reason

    def sleep(self, seconds: float) -> None:
        """Sleep, cut short by ``stop`` or by the deadline."""
        if self._deadline is not None:
            seconds = min(seconds, max(self._deadline - time.monotonic(), 0.0))
        self._wake.wait(seconds)
