"""Time ``plan`` on a synthetic fleet: 10,000 tasks over 1,000 proplets by default.

The fleet has a few label groups and both runtimes; tasks use various selectors, replicas,
pins and a few ``spread: all``. Two passes are timed: the first onto an empty fleet, the second
after 50 proplets joined, 5% of the specs changed and 2% of the tasks were removed, with every
set from the first pass retained (the usual steady state). The figure compared to the limit is
the slower of the two.

    python benchmarks/plan_scale.py [--smoke] [--tasks N] [--proplets N]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reconciler.desired import DesiredState, ResolvedTask
from reconciler.observed import ObservedProplet, ObservedState
from reconciler.plan import Plan, plan
from schemas.manifests import TaskSpec
from schemas.messages import DesiredSet, ReportedState, Runtime

LIMIT_S = 0.5
ZONES = ("a", "b", "c", "d")
TIERS = ("edge", "cloud")


def fleet(count: int, rng: random.Random, start: int = 0) -> list[ReportedState]:
    states = []
    for i in range(start, start + count):
        runtime = Runtime.WAMR if i % 5 == 0 else Runtime.WASMTIME
        labels = {"zone": ZONES[i % len(ZONES)], "tier": TIERS[(i // 4) % len(TIERS)]}
        states.append(
            ReportedState(
                proplet=f"proplet-{i:05d}",
                runtime=runtime,
                labels=labels,
                max_tasks=rng.choice((24, 32, 48)),
                observed_generation=0,
                ts=0.0,
            )
        )
    return states


def tasks(count: int, proplets: int, rng: random.Random, version: int = 0) -> list[ResolvedTask]:
    result = []
    for i in range(count):
        placement: dict[str, object] = {}
        roll = rng.random()
        if roll < 0.3:
            placement["selector"] = {"zone": rng.choice(ZONES)}
        elif roll < 0.45:
            placement["selector"] = {"zone": rng.choice(ZONES), "tier": rng.choice(TIERS)}
        elif roll < 0.5:
            placement["runtime"] = "wamr"
        elif roll < 0.52:
            placement["proplet"] = f"proplet-{rng.randrange(proplets):05d}"
        if roll >= 0.52:
            placement["runtime"] = rng.choice(("any", "any", "wasmtime"))
        if i < 3:
            placement = {"spread": "all", "selector": {"zone": ZONES[i]}}
        elif "proplet" not in placement and rng.random() < 0.2:
            placement["replicas"] = rng.choice((2, 3))
        spec = TaskSpec.model_validate(
            {
                "module": {"file": f"modules/m{i % 20}.wasm"},
                "function": "run",
                "args": [str(i), str(version)],
                "env": {"TASK": str(i)},
                "daemon": i % 2 == 0,
                "placement": placement,
                "limits": {"memory": "1Mi", "timeout": "30s"},
            }
        )
        digest = f"sha256:{i % 20:064x}"
        result.append(
            ResolvedTask(f"task-{i:05d}", {}, spec, digest, 1000, None, "bench.yaml", i + 1)
        )
    return result


def timed(desired: DesiredState, observed: ObservedState) -> tuple[Plan, float]:
    start = time.perf_counter()
    result = plan(desired, observed, prune=True)
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny fleet, for CI")
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--proplets", type=int, default=1_000)
    options = parser.parse_args(argv)
    n_tasks, n_proplets = (200, 20) if options.smoke else (options.tasks, options.proplets)
    rng = random.Random(42)

    reported = fleet(n_proplets, rng)
    desired = DesiredState("rev-1", tuple(tasks(n_tasks, n_proplets, rng)))
    empty = ObservedState.of(
        ObservedProplet.of(r.proplet, reported=r, alive=True) for r in reported
    )
    first, first_s = timed(desired, empty)

    # Steady state: the first sets are retained, a few proplets join, some specs change.
    joined = fleet(n_proplets // 20, rng, start=n_proplets)
    held: dict[str, DesiredSet] = dict(first.sets)
    observed = ObservedState.of(
        ObservedProplet.of(r.proplet, reported=r, desired=held.get(r.proplet), alive=True)
        for r in (*reported, *joined)
    )
    changed = list(desired.tasks)
    for index in rng.sample(range(n_tasks), n_tasks // 20):
        spec = changed[index].spec
        changed[index] = dataclasses.replace(
            changed[index], spec=spec.model_copy(update={"args": [*spec.args, "v2"]})
        )
    removed = set(rng.sample(range(n_tasks), n_tasks // 50))
    second_desired = DesiredState(
        "rev-2", tuple(t for i, t in enumerate(changed) if i not in removed)
    )
    second, second_s = timed(second_desired, observed)

    worst = max(first_s, second_s)
    for label, result, seconds in (("empty fleet", first, first_s), ("steady", second, second_s)):
        counts: dict[str, int] = {}
        for action in result.actions:
            counts[action.kind] = counts.get(action.kind, 0) + 1
        summary = ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))
        print(f"  {label}: {seconds:.3f} s, {len(result.sets)} sets; {summary}", file=sys.stderr)
    print(
        f"plan {n_tasks} tasks / {n_proplets} proplets: {worst:.2f} s"
        f" (limit {LIMIT_S} s, ratio {worst / LIMIT_S:.2f})"
    )
    return 0 if worst <= LIMIT_S or options.smoke else 1


if __name__ == "__main__":
    raise SystemExit(main())
