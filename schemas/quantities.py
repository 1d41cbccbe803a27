"""Human-written quantities in manifests: memory sizes and durations, parsed to integers.

Memory is written like Kubernetes quantities (``64Ki``, ``16Mi``, ``1Gi``; decimal ``16M`` or
``16MB``; a plain integer is bytes). Durations are one or more ``<integer><unit>`` parts in
descending order (``500ms``, ``30s``, ``2m``, ``1h``, ``1m30s``); a bare number is refused because
its unit would be a guess.
"""

from __future__ import annotations

import re

_MEMORY_UNITS = {
    "": 1,
    "B": 1,
    "Ki": 1024,
    "KiB": 1024,
    "Mi": 1024**2,
    "MiB": 1024**2,
    "Gi": 1024**3,
    "GiB": 1024**3,
    "k": 1000,
    "K": 1000,
    "kB": 1000,
    "KB": 1000,
    "M": 1000**2,
    "MB": 1000**2,
    "G": 1000**3,
    "GB": 1000**3,
}
_MEMORY = re.compile(r"^\s*([0-9]+)\s*([A-Za-z]*)\s*$")
_DURATION_UNITS_MS = {"h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}
_DURATION_PART = re.compile(r"([0-9]+)(ms|h|m|s)")
MEMORY_PATTERN = r"^\s*[0-9]+\s*(B|Ki|KiB|Mi|MiB|Gi|GiB|k|K|kB|KB|M|MB|G|GB)?\s*$"
DURATION_PATTERN = r"^([0-9]+(h|m|s|ms))+$"


def parse_memory(value: object) -> int:
    """Return the number of bytes ``value`` stands for, or raise ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError("memory must be a size such as 16Mi, 64Ki or a number of bytes")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("memory must not be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("memory must be a size such as 16Mi, 64Ki or a number of bytes")
    match = _MEMORY.match(value)
    if match is None or match.group(2) not in _MEMORY_UNITS:
        raise ValueError(
            f"invalid memory size {value!r}: use a number with an optional unit"
            " (Ki, Mi, Gi for powers of 1024; k, M, G for powers of 1000), e.g. 16Mi"
        )
    return int(match.group(1)) * _MEMORY_UNITS[match.group(2)]


def parse_duration_ms(value: object) -> int:
    """Return the number of milliseconds ``value`` stands for, or raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError("a duration must be a string such as 30s, 500ms, 2m or 1m30s")
    if isinstance(value, int):
        raise ValueError(f"duration {value} needs a unit, e.g. {value}s or {value}ms")
    text = value.strip()
    total = 0
    position = 0
    last_rank = -1
    order = list(_DURATION_UNITS_MS)
    for part in _DURATION_PART.finditer(text):
        if part.start() != position:
            break
        rank = order.index(part.group(2))
        if rank <= last_rank:
            raise ValueError(
                f"invalid duration {value!r}: give each unit once, largest first (e.g. 1m30s)"
            )
        last_rank = rank
        total += int(part.group(1)) * _DURATION_UNITS_MS[part.group(2)]
        position = part.end()
    if position == 0 or position != len(text):
        raise ValueError(
            f"invalid duration {value!r}: use whole numbers with units h, m, s or ms,"
            " e.g. 30s, 500ms or 1m30s"
        )
    return total


def format_memory(size: int) -> str:
    """The shortest exact binary form of ``size`` bytes (``16Mi``), for messages."""
    for unit in ("Gi", "Mi", "Ki"):
        factor = _MEMORY_UNITS[unit]
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)
