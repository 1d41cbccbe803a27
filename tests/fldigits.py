"""The fl-digits example as tests and benchmarks use it: its modules, and arrays as .npy bytes.

``examples/`` is not a package, so its scripts are loaded by path, once each.
"""

from __future__ import annotations

import functools
import importlib.util
import io
from pathlib import Path
from types import ModuleType

import numpy as np

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fl-digits"


@functools.cache
def load(name: str) -> ModuleType:
    """``examples/fl-digits/{name}.py`` as a module (``prepare`` or ``reference``)."""
    spec = importlib.util.spec_from_file_location(f"fl_digits_{name}", EXAMPLE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def npy(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a .npy file, any dtype."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
