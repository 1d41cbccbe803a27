"""A reference federated job on real proplets, beside the same training done in one process.

Against a real Mosquitto on loopback and ``--clients`` real proplet processes (default 10), each
holding a tenth of the digits' 1,437-sample training split (IID) in its data directory:
``propctl apply --wait`` runs a FederatedJob of softmax regression (650 float32 parameters) with
``examples/fl-digits/trainer.wasm``: ``--rounds`` rounds (default 20), E=1, B=10, lr=0.1, every
client in every round, evaluated on the 360-sample test split after each round.

It prints:

* the final test accuracy beside the floor: the same training in one process with numpy
  (``examples/fl-digits/reference.py``), no orchestration. Goal: within one point of it.
* the orchestration overhead per round: the round's wall time (from the coordinator starting it
  to the aggregated, evaluated model) minus its slowest client's training time (the run time the
  proplet reports), p50 and p90 over the rounds. Goal: p50 under 50 ms. Round 1 includes every
  proplet fetching and compiling the trainer, so the figures are also given without it.
* the whole job's wall time, for scale.

    python benchmarks/fl_round.py [--clients N] [--rounds N] [--smoke] [-o json]

Progress goes to stderr, figures to stdout. Exit code 1 when a goal is missed (never with
``--smoke``, which CI runs with 3 clients and 3 rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.broker import Mosquitto
from tests.fldigits import EXAMPLE, load, npy
from tests.fleet import running_fleet

ROOT = Path(__file__).resolve().parent.parent
OVERHEAD_GOAL_S = 0.050
ACCURACY_TOLERANCE = 0.01
FLOWER_OVERHEAD_S = 10.5  # Flower 1.42 deployment engine on this kind of machine, per round


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


MANIFEST = """\
apiVersion: propeller/v1
kind: FederatedJob
metadata:
  name: digits-bench
spec:
  trainer:
    file: trainer.wasm
  model:
    shape: [650]
  rounds: {rounds}
  clients:
    selector:
      fl: bench
    min: {clients}
  roundTimeout: 60s
  hyperparams:
    dataset: digits
    epochs: {epochs}
    batch: 10
    lr: {lr}
  evaluation:
    data: eval
    files: [digits/x.npy, digits/y.npy]
{target}  seed: 0
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--split", choices=["iid", "noniid"], default="iid")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--target", type=float, default=None, help="stop at this accuracy")
    parser.add_argument("--smoke", action="store_true", help="3 clients, 3 rounds; never fails")
    parser.add_argument("-o", "--output", choices=["text", "json"], default="text")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.rounds = 3, 3

    prepare, reference = load("prepare"), load("reference")
    train, test = prepare.load_split()
    partitions = prepare.partition(train[0], train[1], args.clients, args.split, 0)

    progress("floor: the same training in one process")
    started = time.perf_counter()
    floor_history = reference.fedavg(
        partitions, test, rounds=args.rounds, epochs=args.epochs, batch=10, lr=args.lr, seed=0,
        stop_at=args.target,
    )  # fmt: skip
    floor_seconds = time.perf_counter() - started
    floor_accuracy = float(floor_history[-1]["accuracy"])

    with tempfile.TemporaryDirectory(prefix="fl-bench-") as tmp_name:
        tmp = Path(tmp_name)
        source = tmp / "source"
        (source / "eval" / "digits").mkdir(parents=True)
        (source / "trainer.wasm").write_bytes((EXAMPLE / "trainer.wasm").read_bytes())
        (source / "eval" / "digits" / "x.npy").write_bytes(npy(test[0]))
        (source / "eval" / "digits" / "y.npy").write_bytes(npy(test[1]))
        (source / "job.yaml").write_text(
            MANIFEST.format(
                rounds=args.rounds,
                clients=args.clients,
                epochs=args.epochs,
                lr=args.lr,
                target=""
                if args.target is None
                else f"  target:\n    metric: accuracy\n    value: {args.target}\n",
            )
        )
        with Mosquitto(tmp / "broker") as broker, running_fleet(broker, tmp / "fleet") as fleet:
            progress(f"starting {args.clients} proplets on {broker.url}")
            for name, (x, y) in partitions.items():
                data = fleet.tmp / name / "data" / "digits"
                data.mkdir(parents=True)
                (data / "x.npy").write_bytes(npy(x))
                (data / "y.npy").write_bytes(npy(y))
            for name in partitions:
                fleet.start_proplet(name, "--label", "fl=bench", wait=False, verbose=False)
            for name in partitions:
                fleet.wait(lambda o, n=name: o.presence.get(n) is True and n in o.states,
                           timeout=30, what=f"{name} online")  # fmt: skip
            env = {k: v for k, v in os.environ.items() if not k.startswith("PROPELLER_")}
            env.update(PYTHONPATH=str(ROOT), PROPELLER_BROKER=broker.url,
                       PROPELLER_CACHE_DIR=str(tmp / "cache"))  # fmt: skip
            progress(f"propctl apply --wait: {args.rounds} rounds")
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "propctl", "apply", "-f", str(source / "job.yaml"),
                 "--wait", "--state-dir", str(tmp / "state"), "-o", "json"],
                env=env, capture_output=True, text=True, timeout=600, check=False,
            )  # fmt: skip
            job_seconds = time.perf_counter() - started
            if done.returncode != 0:
                progress(done.stderr)
                progress(f"error: propctl apply exited with {done.returncode}")
                return 1
    [job] = json.loads(done.stdout)["jobs"]
    history = job["history"]
    overheads = [r["seconds"] - r["training_seconds"] for r in history]
    warm = overheads[1:] or overheads
    accuracy = float(history[-1]["accuracy"])
    figures = {
        "clients": args.clients,
        "rounds": len(history),
        "phase": job["phase"],
        "accuracy": round(accuracy, 4),
        "floor_accuracy": round(floor_accuracy, 4),
        "accuracy_gap": round(accuracy - floor_accuracy, 4),
        "overhead_p50_ms": round(statistics.median(overheads) * 1000, 2),
        "overhead_p90_ms": round(percentile(overheads, 0.9) * 1000, 2),
        "overhead_warm_p50_ms": round(statistics.median(warm) * 1000, 2),
        "overhead_warm_p90_ms": round(percentile(warm, 0.9) * 1000, 2),
        "first_round_overhead_ms": round(overheads[0] * 1000, 2),
        "round_p50_ms": round(statistics.median(r["seconds"] for r in history) * 1000, 2),
        "training_p50_ms": round(
            statistics.median(r["training_seconds"] for r in history) * 1000, 2
        ),
        "job_seconds": round(job_seconds, 2),
        "floor_seconds": round(floor_seconds, 2),
        "accuracy_per_round": [r["accuracy"] for r in history],
        "floor_accuracy_per_round": [round(float(r["accuracy"]), 4) for r in floor_history],
    }
    accuracy_ok = abs(accuracy - floor_accuracy) <= ACCURACY_TOLERANCE and len(history) == len(
        floor_history
    )
    overhead_ok = figures["overhead_p50_ms"] < OVERHEAD_GOAL_S * 1000
    passed = accuracy_ok and overhead_ok and job["phase"] == "Completed"
    if args.output == "json":
        print(json.dumps({**figures, "passed": passed}))
    else:
        print(
            f"job: {args.clients} clients ({args.split}), E={args.epochs}, B=10, lr={args.lr},"
            f" {len(history)} rounds (floor: {len(floor_history)}), {job['phase']}"
        )
        print("accuracy per round: " + " ".join(f"{a:.4f}" for a in figures["accuracy_per_round"]))
        print(
            f"final test accuracy {accuracy:.4f}; in-process floor {floor_accuracy:.4f};"
            f" gap {accuracy - floor_accuracy:+.4f} (goal within {ACCURACY_TOLERANCE}):"
            f" {'PASS' if accuracy_ok else 'MISSED'}"
        )
        p50 = figures["overhead_p50_ms"]
        print(
            f"orchestration overhead per round: p50 {p50} ms, p90 {figures['overhead_p90_ms']} ms"
            f" (goal p50 < {OVERHEAD_GOAL_S * 1000:.0f} ms, ratio {p50 / 50:.2f}):"
            f" {'PASS' if overhead_ok else 'MISSED'}"
        )
        print(
            f"  without round 1 (cold fetch and compile, {figures['first_round_overhead_ms']} ms):"
            f" p50 {figures['overhead_warm_p50_ms']} ms, p90 {figures['overhead_warm_p90_ms']} ms"
        )
        print(
            f"  for scale: Flower 1.42's deployment engine, about {FLOWER_OVERHEAD_S} s per round"
            f" on this kind of machine (not measured here): {FLOWER_OVERHEAD_S * 1000 / p50:.0f}x"
        )
        print(
            f"round wall time p50 {figures['round_p50_ms']} ms; slowest client's training p50"
            f" {figures['training_p50_ms']} ms; whole job {job_seconds:.2f} s"
            f" (the floor trains the same in {floor_seconds:.2f} s)"
        )
    return 0 if passed or args.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
