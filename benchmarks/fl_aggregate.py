"""Aggregation speed: FedAvg of many updates, beside numpy's own copy bandwidth in the same run.

The coordinator keeps a round's accepted updates as rows of one float32 matrix
(``reconciler.federated.Updates``), so FedAvg is one matrix-vector product that reads every
update once. This times that product for ``--updates`` updates of ``--params`` float32
parameters (default 100 x 1M, 400 MB) and compares its throughput (update bytes per second)
with the bandwidth numpy reaches copying the same bytes (``np.copyto`` of the matrix into
another). Goal: at least 50% of the copy bandwidth. The median and trimmed mean are timed too,
for scale (they sort every coordinate; no goal).

    python benchmarks/fl_aggregate.py [--updates N] [--params N] [--repeats N] [--smoke] [-o json]

Progress goes to stderr, figures to stdout. Exit code 1 when the goal is missed (never with
``--smoke``, which CI runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reconciler.federated import Updates

GOAL_RATIO = 0.5


def best_of(repeats: int, action: object) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="small and quick; never fails")
    parser.add_argument("-o", "--output", choices=["text", "json"], default="text")
    args = parser.parse_args()
    if args.smoke:
        args.updates, args.params, args.repeats = 10, 100_000, 5

    rng = np.random.default_rng(0)
    print(f"filling {args.updates} updates of {args.params} parameters", file=sys.stderr)
    updates = Updates(args.updates, (args.params,))
    ingest = []
    for index in range(args.updates):
        row = rng.standard_normal(args.params, dtype=np.float32)
        start = time.perf_counter()
        updates.add(f"client-{index}", row, float(rng.integers(50, 200)))
        ingest.append(time.perf_counter() - start)
    nbytes = updates.matrix.nbytes
    target = np.empty_like(updates.matrix)

    # Correctness first: the product equals the plain weighted mean.
    weights = np.asarray(updates.weights, dtype=np.float64)
    expected = (weights[:, None] * updates.matrix.astype(np.float64)).sum(0) / weights.sum()
    got = updates.aggregate("fedavg")
    error = float(np.max(np.abs(got - expected)))
    if error > 1e-4:
        print(f"error: fedavg differs from the weighted mean by {error}", file=sys.stderr)
        return 1

    print("timing copy and fedavg", file=sys.stderr)
    copy_s = best_of(args.repeats, lambda: np.copyto(target, updates.matrix))
    fedavg_s = best_of(args.repeats, lambda: updates.aggregate("fedavg"))
    small = max(1, args.repeats // 3)
    median_s = best_of(small, lambda: updates.aggregate("median"))
    trimmed_s = best_of(small, lambda: updates.aggregate("trimmed-mean", 0.1))

    copy_bw = nbytes / copy_s / 1e9
    fedavg_bw = nbytes / fedavg_s / 1e9
    ratio = fedavg_bw / copy_bw
    figures = {
        "updates": args.updates,
        "params": args.params,
        "bytes": nbytes,
        "copy_seconds": round(copy_s, 5),
        "copy_gb_per_s": round(copy_bw, 2),
        "fedavg_seconds": round(fedavg_s, 5),
        "fedavg_gb_per_s": round(fedavg_bw, 2),
        "fedavg_vs_copy": round(ratio, 3),
        "goal_ratio": GOAL_RATIO,
        "ingest_ms_per_update_p50": round(statistics.median(ingest) * 1000, 3),
        "median_seconds": round(median_s, 4),
        "trimmed_mean_seconds": round(trimmed_s, 4),
        "max_abs_error": error,
    }
    passed = ratio >= GOAL_RATIO
    if args.output == "json":
        print(json.dumps({**figures, "passed": passed}))
    else:
        mb = nbytes / 1e6
        print(f"updates: {args.updates} x {args.params} float32 ({mb:.0f} MB)")
        print(f"numpy copy of the same bytes: {copy_s * 1000:.1f} ms, {copy_bw:.2f} GB/s")
        print(
            f"fedavg: {fedavg_s * 1000:.1f} ms, {fedavg_bw:.2f} GB/s = {ratio:.2f}x the copy"
            f" bandwidth (goal >= {GOAL_RATIO}x): {'PASS' if passed else 'MISSED'}"
        )
        print(f"ingest (one update into the matrix): p50 {figures['ingest_ms_per_update_p50']} ms")
        print(f"median: {median_s * 1000:.0f} ms; trimmed mean (10%): {trimmed_s * 1000:.0f} ms")
    return 0 if passed or args.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
