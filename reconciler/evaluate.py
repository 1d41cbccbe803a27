"""Evaluation of a federated job's model: the job's own trainer, run here in evaluate mode.

The coordinator knows nothing of the model's layout; the trainer does. So each new global model
is evaluated by running the trainer module on wasmtime in this process, with the model at
``/in/model.npy``, the job's evaluation files at ``/data`` (read-only) and ``FL_MODE=evaluate``.
Its last stdout line is the same report a training run prints, with ``accuracy``.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

import wasmtime

from reconciler.federated import MODEL_FILE, ModelError, Report, parse_report

DEFAULT_FUEL = 50_000_000_000
DEFAULT_MEMORY = 256 * 1024 * 1024
OUTPUT_LIMIT = 64 * 1024


class Evaluator:
    """Runs one trainer module in evaluate mode; compiled once, reused for every round."""

    def __init__(
        self,
        wasm: bytes,
        data: Mapping[str, bytes],
        env: Mapping[str, str],
        *,
        memory: int | None = None,
        fuel: int | None = None,
    ) -> None:
        config = wasmtime.Config()
        config.consume_fuel = True
        self._engine = wasmtime.Engine(config)
        self._module = wasmtime.Module(self._engine, wasm)
        self._linker = wasmtime.Linker(self._engine)
        self._linker.define_wasi()
        self._env = dict(env)
        self._memory = memory or DEFAULT_MEMORY
        self._fuel = fuel or DEFAULT_FUEL
        self._dir = tempfile.TemporaryDirectory(prefix="propctl-eval-")
        root = Path(self._dir.name)
        self._data = root / "data"
        for name, content in data.items():
            target = self._data / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        self._data.mkdir(exist_ok=True)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._dir.cleanup()

    def evaluate(self, model: bytes) -> Report:
        """The trainer's report on ``model``, or ``ModelError`` with what went wrong."""
        with self._lock, tempfile.TemporaryDirectory(dir=self._dir.name) as run:
            run_dir = Path(run)
            inputs = run_dir / "in"
            inputs.mkdir()
            (inputs / MODEL_FILE).write_bytes(model)
            stdout, stderr = run_dir / "stdout", run_dir / "stderr"
            wasi = wasmtime.WasiConfig()
            wasi.argv = ["trainer"]
            wasi.env = [(k, v) for k, v in {**self._env, "FL_MODE": "evaluate"}.items()]
            wasi.stdout_file = str(stdout)
            wasi.stderr_file = str(stderr)
            wasi.preopen_dir(str(inputs), "/in", False)
            wasi.preopen_dir(str(self._data), "/data", False)
            store = wasmtime.Store(self._engine)
            store.set_limits(memory_size=self._memory)
            store.set_fuel(self._fuel)
            store.set_wasi(wasi)
            code = 0
            try:
                instance = self._linker.instantiate(store, self._module)
                start = instance.exports(store)["_start"]
                assert isinstance(start, wasmtime.Func)
                start(store)
            except wasmtime.ExitTrap as exit_trap:
                code = exit_trap.code
            except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
                raise ModelError(f"evaluation trapped: {str(exc).splitlines()[0]}") from None
            if code != 0:
                err = stderr.read_bytes()[:OUTPUT_LIMIT].decode(errors="replace").strip()
                raise ModelError(f"evaluation exited with {code}: {err[:300]}")
            return parse_report(stdout.read_bytes()[:OUTPUT_LIMIT].decode(errors="replace"))
