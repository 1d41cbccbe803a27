"""Board core size: flash (text/data/bss) on Cortex-M4 and static RAM per task-table size.

The portable C core in ``zephyr/core`` is cross-compiled with Debian's ``arm-none-eabi-gcc``
(``-mcpu=cortex-m4 -mthumb -Os -ffunction-sections -fdata-sections -std=c11``), one object per
source file. Two kinds of figures:

* flash: text, data and bss of the core's objects (``arm-none-eabi-size``), summed. The sum is
  an upper bound of what a firmware links in, since ``--gc-sections`` can only drop code. The
  goal is text < 24 KiB; WAMR's classic interpreter alone is about 56 KiB on the same target,
  printed for scale.
* RAM: the core needs no heap and no globals, only the arena handed to ``pb_init``. Its size is
  read from the ARM objects themselves: a translation unit per ``PB_MAX_TASKS`` value (1, 2, 4,
  8) defines a static arena of ``sizeof(struct pb_core)`` and ``arm-none-eabi-nm -S`` gives its
  size, so struct layout and padding are the target's. The module buffers
  (``PB_MODULE_SLOTS`` x ``PB_MODULE_MAX``) are shown apart, since they do not grow with the
  task table.

    python benchmarks/board_size.py [--smoke] [-o json]

Progress goes to stderr, figures to stdout. The exit code is 1 when the flash goal is missed
(never with ``--smoke``), 2 when the ARM toolchain is missing (0 with ``--smoke``, which then
reports the run as skipped).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CORE = REPO_ROOT / "zephyr" / "core"
CFLAGS = [
    "-mcpu=cortex-m4",
    "-mthumb",
    "-Os",
    "-ffunction-sections",
    "-fdata-sections",
    "-std=c11",
    "-Wall",
    "-Wextra",
    "-Werror",
]
TEXT_GOAL = 24 * 1024
WAMR_CLASSIC_INTERP = 56 * 1024  # approximate, for scale only
SLOT_COUNTS = (1, 2, 4, 8)
SMOKE_SLOT_COUNTS = (1, 4)

ARENA_UNIT = """\
#include "internal.h"
/* The arena as a firmware would place it, and the part taken by the module buffers. */
struct pb_core pb_board_arena;
unsigned char pb_board_modules[sizeof(((struct pb_core *)0)->module_data)];
"""


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Tools:
    gcc: str
    size: str
    nm: str


@dataclass
class ObjectSize:
    name: str
    text: int
    data: int
    bss: int


@dataclass
class Ram:
    max_tasks: int
    arena_bytes: int
    module_bytes: int  # module buffers within the arena
    table_bytes: int  # everything else: task table, staging, buffers for one message


@dataclass
class Figures:
    smoke: bool
    objects: list[ObjectSize]
    text: int
    data: int
    bss: int
    text_goal: int
    text_ratio: float
    wamr_classic_interp: int
    ram: list[Ram]
    passed: bool


def find_tools() -> Tools | None:
    found = [shutil.which(f"arm-none-eabi-{tool}") for tool in ("gcc", "size", "nm")]
    if any(path is None for path in found):
        return None
    gcc, size, nm = (str(path) for path in found)
    return Tools(gcc, size, nm)


def compile_object(tools: Tools, source: Path, out: Path, defines: list[str]) -> None:
    include = [f"-I{CORE / 'include'}", f"-I{CORE / 'src'}"]
    command = [tools.gcc, *CFLAGS, *defines, *include, "-c", str(source), "-o", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"compiling {source.name} failed:\n{done.stderr}")


def measure_flash(tools: Tools, tmp: Path) -> list[ObjectSize]:
    sources = sorted((CORE / "src").glob("*.c"))
    progress(f"flash: compiling {len(sources)} core sources for Cortex-M4 (-Os)")
    objects = []
    for source in sources:
        out = tmp / f"{source.stem}.o"
        compile_object(tools, source, out, [])
        objects.append(out)
    listing = subprocess.run(
        [tools.size, "-B", *map(str, objects)], capture_output=True, text=True, check=True
    ).stdout
    sizes = []
    for line in listing.splitlines()[1:]:
        fields = line.split()
        text, data, bss = (int(v) for v in fields[:3])
        sizes.append(ObjectSize(Path(fields[-1]).name, text, data, bss))
    return sizes


def symbol_sizes(tools: Tools, obj: Path) -> dict[str, int]:
    listing = subprocess.run(
        [tools.nm, "-S", str(obj)], capture_output=True, text=True, check=True
    ).stdout
    sizes = {}
    for line in listing.splitlines():
        match = re.match(r"^[0-9a-f]+ ([0-9a-f]+) \w (\w+)$", line)
        if match:
            sizes[match.group(2)] = int(match.group(1), 16)
    return sizes


def measure_ram(tools: Tools, tmp: Path, counts: tuple[int, ...]) -> list[Ram]:
    progress(f"RAM: arena size on the target for PB_MAX_TASKS = {', '.join(map(str, counts))}")
    unit = tmp / "arena.c"
    unit.write_text(ARENA_UNIT)
    figures = []
    for count in counts:
        out = tmp / f"arena{count}.o"
        compile_object(tools, unit, out, [f"-DPB_MAX_TASKS={count}"])
        sizes = symbol_sizes(tools, out)
        arena, modules = sizes["pb_board_arena"], sizes["pb_board_modules"]
        figures.append(Ram(count, arena, modules, arena - modules))
    return figures


def report(f: Figures) -> str:
    lines = [
        "flash, Cortex-M4 -Os (sum of the core's objects; linking with --gc-sections can only"
        " drop code):",
    ]
    for o in f.objects:
        lines.append(f"  {o.name:<14} text {o.text:>6}  data {o.data:>4}  bss {o.bss:>4}")
    lines += [
        f"  total          text {f.text:>6}  data {f.data:>4}  bss {f.bss:>4}"
        f"  ({f.text / 1024:.1f} KiB text)",
        f"  goal: text < {f.text_goal // 1024} KiB; ratio {f.text_ratio:.2f}:"
        f" {'PASS' if f.passed else 'MISSED'}"
        f" (for scale: WAMR's classic interpreter alone is about"
        f" {f.wamr_classic_interp // 1024} KiB)",
        "static RAM: the arena given to pb_init (no heap, no globals):",
    ]
    for r in f.ram:
        lines.append(
            f"  PB_MAX_TASKS={r.max_tasks}: arena {r.arena_bytes} bytes"
            f" ({r.arena_bytes / 1024:.1f} KiB) = module buffers {r.module_bytes}"
            f" + tables and message buffers {r.table_bytes}"
        )
    if len(f.ram) >= 2:
        first, last = f.ram[0], f.ram[-1]
        per_slot = (last.table_bytes - first.table_bytes) / (last.max_tasks - first.max_tasks)
        lines.append(f"  each task slot adds {per_slot:.0f} bytes")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="quick run, never fails on the goal")
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")
    options = parser.parse_args(argv)
    tools = find_tools()
    if tools is None:
        message = (
            "arm-none-eabi-gcc, -size and -nm are needed"
            " (Debian: apt-get install gcc-arm-none-eabi binutils-arm-none-eabi)"
        )
        if options.smoke:
            progress(f"skipped: {message}")
            print(json.dumps({"skipped": message}) if options.output == "json" else "skipped")
            return 0
        progress(f"error: {message}")
        return 2
    with tempfile.TemporaryDirectory(prefix="board-size-") as tmp:
        objects = measure_flash(tools, Path(tmp))
        ram = measure_ram(tools, Path(tmp), SMOKE_SLOT_COUNTS if options.smoke else SLOT_COUNTS)
    text = sum(o.text for o in objects)
    figures = Figures(
        smoke=options.smoke,
        objects=objects,
        text=text,
        data=sum(o.data for o in objects),
        bss=sum(o.bss for o in objects),
        text_goal=TEXT_GOAL,
        text_ratio=text / TEXT_GOAL,
        wamr_classic_interp=WAMR_CLASSIC_INTERP,
        ram=ram,
        passed=text < TEXT_GOAL,
    )
    if options.output == "json":
        print(json.dumps(asdict(figures)))
    else:
        print(report(figures))
    return 0 if figures.passed or options.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
