"""ctypes binding of ``libpropeller_board.so``: the board core's flat host interface (board.h).

``Library`` loads the shared object and declares every function's types. ``Core`` is one board
core living in an arena this process owns; it calls back into a ``Platform`` (publish,
subscribe, start and stop a run, key-value state, log, clocks) from inside the ``Core`` call
that triggers it, on the caller's thread. The core is not thread-safe: the owner serialises
every call into one ``Core`` (the emulator holds a per-board lock).

ctypes callback objects must outlive every call that may invoke them, or the core jumps into
freed memory: a ``Core`` keeps its own for its whole life.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

ENV_LIBRARY = "PROPELLER_BOARD_LIB"
LIBRARY_NAME = "libpropeller_board.so"
DEFAULT_PATH = Path(__file__).resolve().parent / "build" / LIBRARY_NAME

# pb_run_status
RUN_OK = 0
RUN_TRAP = 1
RUN_STOPPED = 2

# pb_log_level, as logging levels
LOG_LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.DEBUG}

WILL_TOPIC_CAP = 320
WILL_PAYLOAD_CAP = 256

_i64 = ctypes.c_int64
_size = ctypes.c_size_t
_p = ctypes.c_void_p
_str = ctypes.c_char_p
_bytes = ctypes.POINTER(ctypes.c_uint8)

ClockFn = ctypes.CFUNCTYPE(_i64, _p)
PublishFn = ctypes.CFUNCTYPE(ctypes.c_int, _p, _str, _bytes, _size, ctypes.c_int, ctypes.c_int)
SubscribeFn = ctypes.CFUNCTYPE(ctypes.c_int, _p, _str, ctypes.c_int)
WasmStartFn = ctypes.CFUNCTYPE(
    ctypes.c_int,
    _p,
    ctypes.c_int,
    _bytes,
    _size,
    _str,
    ctypes.c_int,
    ctypes.POINTER(_i64),
    _i64,
    _i64,
    _i64,
)
WasmStopFn = ctypes.CFUNCTYPE(None, _p, ctypes.c_int)
KvGetFn = ctypes.CFUNCTYPE(ctypes.c_int, _p, _str, _bytes, _size)
KvSetFn = ctypes.CFUNCTYPE(ctypes.c_int, _p, _str, _bytes, _size)
LogFn = ctypes.CFUNCTYPE(None, _p, ctypes.c_int, _str)

_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "pbh_size": (_size, []),
    "pbh_init": (ctypes.c_int, [_p, _size, _str, _str, _str, _str, ctypes.c_int, _str]),
    "pbh_set_now": (None, [_p, ClockFn, _p]),
    "pbh_set_wall": (None, [_p, ClockFn, _p]),
    "pbh_set_publish": (None, [_p, PublishFn, _p]),
    "pbh_set_subscribe": (None, [_p, SubscribeFn, _p]),
    "pbh_set_wasm_start": (None, [_p, WasmStartFn, _p]),
    "pbh_set_wasm_stop": (None, [_p, WasmStopFn, _p]),
    "pbh_set_kv_get": (None, [_p, KvGetFn, _p]),
    "pbh_set_kv_set": (None, [_p, KvSetFn, _p]),
    "pbh_set_log": (None, [_p, LogFn, _p]),
    "pbh_will": (ctypes.c_int, [_p, ctypes.c_char_p, _size, ctypes.c_char_p, _size]),
    "pbh_connect": (None, [_p]),
    "pbh_disconnect": (None, [_p]),
    "pbh_message_begin": (None, [_p, _str, _size]),
    "pbh_message_data": (None, [_p, ctypes.c_char_p, _size]),
    "pbh_message_end": (ctypes.c_int, [_p]),
    "pbh_message": (ctypes.c_int, [_p, _str, ctypes.c_char_p, _size]),
    "pbh_tick": (None, [_p, _i64]),
    "pbh_next_deadline": (_i64, [_p]),
    "pbh_task_finished": (None, [_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, _i64, _str]),
    "pbh_running": (ctypes.c_int, [_p]),
    "pbh_observed_generation": (_i64, [_p]),
    "pbh_last_error": (_str, [_p]),
    "pbh_max_tasks": (ctypes.c_int, []),
    "pbh_module_max": (ctypes.c_int, []),
    "pbh_chunk_size": (ctypes.c_int, []),
}


class LibraryNotFound(RuntimeError):
    """The shared library is missing or cannot be loaded."""


class CoreError(RuntimeError):
    """The core refused its set-up (bad identity or arena)."""


@dataclass(frozen=True, slots=True)
class Sizes:
    """Build-time sizes of the loaded library (config.h)."""

    max_tasks: int
    module_max: int
    chunk_size: int
    handle_bytes: int


def library_path() -> Path:
    """Where the library is: ``$PROPELLER_BOARD_LIB``, else the build directory of the package."""
    configured = os.environ.get(ENV_LIBRARY)
    return Path(configured) if configured else DEFAULT_PATH


class Library:
    """The loaded ``libpropeller_board.so`` with every function typed."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or library_path()
        if not self.path.is_file():
            raise LibraryNotFound(
                f"board library {self.path} not found: build it with `make -C zephyr host`"
                f" (or point {ENV_LIBRARY} at a built {LIBRARY_NAME})"
            )
        try:
            self.dll = ctypes.CDLL(str(self.path))
        except OSError as exc:
            raise LibraryNotFound(f"cannot load board library {self.path}: {exc}") from None
        for name, (restype, argtypes) in _SIGNATURES.items():
            try:
                function = getattr(self.dll, name)
            except AttributeError:
                raise LibraryNotFound(
                    f"board library {self.path} lacks {name}: rebuild it with `make -C zephyr host`"
                ) from None
            function.restype = restype
            function.argtypes = argtypes
        self.sizes = Sizes(
            max_tasks=int(self.dll.pbh_max_tasks()),
            module_max=int(self.dll.pbh_module_max()),
            chunk_size=int(self.dll.pbh_chunk_size()),
            handle_bytes=int(self.dll.pbh_size()),
        )


_loaded: dict[Path, Library] = {}


def load(path: Path | None = None) -> Library:
    """The library at ``path`` (default ``library_path()``), loaded once per process."""
    resolved = (path or library_path()).resolve()
    if resolved not in _loaded:
        _loaded[resolved] = Library(resolved)
    return _loaded[resolved]


class Platform(Protocol):
    """What a board gives its core. Every method runs inside a ``Core`` call."""

    def now_ms(self) -> int:
        """Monotonic milliseconds."""
        ...

    def wall_ms(self) -> int:
        """Unix time in milliseconds, negative while unknown."""
        ...

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> bool: ...

    def subscribe(self, topic_filter: str, qos: int) -> bool: ...

    def wasm_start(self, slot: int, module: bytes, function: str, args: tuple[int, ...],
                   memory: int, timeout_ms: int, fuel: int) -> int:  # fmt: skip
        """Start a run and return 0, or return non-zero when nothing runs."""
        ...

    def wasm_stop(self, slot: int) -> None: ...

    def kv_get(self, key: str) -> bytes | None: ...

    def kv_set(self, key: str, value: bytes) -> bool:
        """Store ``value``; an empty value deletes the key."""
        ...

    def log(self, level: int, message: str) -> None: ...


class Core:
    """One board core in memory this object owns. Not thread-safe: serialise every call."""

    def __init__(
        self,
        library: Library,
        platform: Platform,
        *,
        proplet_id: str,
        domain: str = "default",
        channel: str = "default",
        labels: Mapping[str, str] | None = None,
        heartbeat_ms: int = 5000,
        version: str | None = None,
    ) -> None:
        self.library = library
        self.platform = platform
        dll = library.dll
        words = (library.sizes.handle_bytes + 7) // 8
        self._memory = (ctypes.c_uint64 * words)()  # the arena, aligned to 8
        self._handle = ctypes.cast(self._memory, ctypes.c_void_p)
        label_text = ",".join(f"{k}={v}" for k, v in (labels or {}).items())
        status = dll.pbh_init(
            self._handle,
            words * 8,
            proplet_id.encode(),
            domain.encode(),
            channel.encode(),
            label_text.encode(),
            heartbeat_ms,
            version.encode() if version is not None else None,
        )
        if status != 0:
            raise CoreError(
                f"board core refused its set-up ({status}): check the id {proplet_id!r},"
                f" domain, channel and labels {label_text!r}"
            )
        # Kept referenced for the life of the core: the C side holds only raw pointers.
        self._callbacks = (
            ClockFn(self._now),
            ClockFn(self._wall),
            PublishFn(self._publish),
            SubscribeFn(self._subscribe),
            WasmStartFn(self._wasm_start),
            WasmStopFn(self._wasm_stop),
            KvGetFn(self._kv_get),
            KvSetFn(self._kv_set),
            LogFn(self._log),
        )
        now, wall, publish, subscribe, start, stop, kv_get, kv_set, log_fn = self._callbacks
        h = self._handle
        dll.pbh_set_now(h, now, None)
        dll.pbh_set_wall(h, wall, None)
        dll.pbh_set_publish(h, publish, None)
        dll.pbh_set_subscribe(h, subscribe, None)
        dll.pbh_set_wasm_start(h, start, None)
        dll.pbh_set_wasm_stop(h, stop, None)
        dll.pbh_set_kv_get(h, kv_get, None)
        dll.pbh_set_kv_set(h, kv_set, None)
        dll.pbh_set_log(h, log_fn, None)

    # -- calls into the core

    def will(self) -> tuple[str, bytes]:
        """The last will to register before connecting: (topic, payload)."""
        topic = ctypes.create_string_buffer(WILL_TOPIC_CAP)
        payload = ctypes.create_string_buffer(WILL_PAYLOAD_CAP)
        length = self.library.dll.pbh_will(
            self._handle, topic, WILL_TOPIC_CAP, payload, WILL_PAYLOAD_CAP
        )
        if length < 0:
            raise CoreError(f"the last will does not fit in {WILL_PAYLOAD_CAP} bytes")
        return topic.value.decode(), payload.raw[:length]

    def connect(self) -> None:
        self.library.dll.pbh_connect(self._handle)

    def disconnect(self) -> None:
        self.library.dll.pbh_disconnect(self._handle)

    def message_begin(self, topic: str, total_len: int) -> None:
        self.library.dll.pbh_message_begin(self._handle, topic.encode(), total_len)

    def message_data(self, data: bytes) -> None:
        self.library.dll.pbh_message_data(self._handle, data, len(data))

    def message_end(self) -> bool:
        """True when the core took the message, False when it dropped it (see last_error)."""
        return bool(self.library.dll.pbh_message_end(self._handle) == 0)

    def message(self, topic: str, payload: bytes, slice_bytes: int | None = None) -> bool:
        """Feed one message whole, or streamed in slices of ``slice_bytes``."""
        if slice_bytes is None:
            return bool(
                self.library.dll.pbh_message(self._handle, topic.encode(), payload, len(payload))
                == 0
            )
        self.message_begin(topic, len(payload))
        view = memoryview(payload)
        for start in range(0, len(payload), slice_bytes):
            self.message_data(bytes(view[start : start + slice_bytes]))
        return self.message_end()

    def tick(self, now_ms: int) -> None:
        self.library.dll.pbh_tick(self._handle, now_ms)

    def next_deadline(self) -> int:
        return int(self.library.dll.pbh_next_deadline(self._handle))

    def task_finished(
        self, slot: int, status: int, result: int | None = None, error: str | None = None
    ) -> None:
        self.library.dll.pbh_task_finished(
            self._handle,
            slot,
            status,
            0 if result is None else 1,
            0 if result is None else result,
            error.encode("utf-8", errors="replace") if error is not None else None,
        )

    @property
    def running(self) -> int:
        return int(self.library.dll.pbh_running(self._handle))

    @property
    def observed_generation(self) -> int:
        return int(self.library.dll.pbh_observed_generation(self._handle))

    @property
    def last_error(self) -> str:
        text = self.library.dll.pbh_last_error(self._handle)
        return text.decode(errors="replace") if text else ""

    # -- callbacks from the core (on the thread of the call that triggered them)
    #
    # An exception must not cross back into C: ctypes would print it and return garbage.

    def _now(self, _ctx: int | None) -> int:
        try:
            return self.platform.now_ms()
        except Exception:
            log.exception("now_ms failed")
            return 0

    def _wall(self, _ctx: int | None) -> int:
        try:
            return self.platform.wall_ms()
        except Exception:
            log.exception("wall_ms failed")
            return -1

    def _publish(
        self, _ctx: int | None, topic: bytes, payload: Any, length: int, qos: int, retain: int
    ) -> int:
        try:
            data = ctypes.string_at(payload, length) if length else b""
            return 0 if self.platform.publish(topic.decode(), data, qos, bool(retain)) else -1
        except Exception:
            log.exception("publish failed")
            return -1

    def _subscribe(self, _ctx: int | None, topic_filter: bytes, qos: int) -> int:
        try:
            return 0 if self.platform.subscribe(topic_filter.decode(), qos) else -1
        except Exception:
            log.exception("subscribe failed")
            return -1

    def _wasm_start(
        self,
        _ctx: int | None,
        slot: int,
        module: Any,
        length: int,
        function: bytes,
        argc: int,
        args: Any,
        memory: int,
        timeout_ms: int,
        fuel: int,
    ) -> int:
        try:
            return self.platform.wasm_start(
                slot,
                ctypes.string_at(module, length),
                function.decode(errors="replace"),
                tuple(int(args[i]) for i in range(argc)),
                memory,
                timeout_ms,
                fuel,
            )
        except Exception:
            log.exception("wasm_start failed")
            return -1

    def _wasm_stop(self, _ctx: int | None, slot: int) -> None:
        try:
            self.platform.wasm_stop(slot)
        except Exception:
            log.exception("wasm_stop failed")

    def _kv_get(self, _ctx: int | None, key: bytes, buf: Any, length: int) -> int:
        try:
            value = self.platform.kv_get(key.decode())
            if value is None:
                return -1
            ctypes.memmove(buf, value, min(len(value), length))
            return len(value)
        except Exception:
            log.exception("kv_get failed")
            return -1

    def _kv_set(self, _ctx: int | None, key: bytes, buf: Any, length: int) -> int:
        try:
            value = ctypes.string_at(buf, length) if length else b""
            return 0 if self.platform.kv_set(key.decode(), value) else -1
        except Exception:
            log.exception("kv_set failed")
            return -1

    def _log(self, _ctx: int | None, level: int, message: bytes) -> None:
        try:
            self.platform.log(level, message.decode(errors="replace") if message else "")
        except Exception:
            log.exception("log failed")
