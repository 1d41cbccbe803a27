"""Data for the fl-digits example: scikit-learn's bundled digits, split and partitioned per client.

The 1,797 8x8 images of `sklearn.datasets.load_digits` (shipped inside the scikit-learn wheel, so
nothing is downloaded) are scaled to [0, 1] by dividing by 16 and split into a stratified train
split of 1,437 samples and a test split of 360 (`train_test_split(test_size=0.2,
random_state=0, stratify=y)`). The train split is partitioned across clients, either IID or
non-IID as in the FedAvg paper, and each part is written where a proplet reads its local data:

    OUT/client-00/data/digits/x.npy   float32 (n, 64)
    OUT/client-00/data/digits/y.npy   int64 (n,)   (a proplet with --data-dir OUT/client-00)
    ...
    OUT/eval/digits/x.npy, y.npy the test split, for the coordinator's evaluation

Run `python prepare.py --out DIR [--clients 10] [--split iid|noniid] [--seed 0]`. The functions
are importable too (by path: examples/ is not a package).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

DATASET = "digits"
EVAL_ID = "eval"
SPLITS = ("iid", "noniid")
TEST_SIZE = 0.2
SPLIT_STATE = 0  # random_state of the train/test split; fixed so every run uses the same test set

Part = tuple[np.ndarray, np.ndarray]


def load_split() -> tuple[Part, Part]:
    """The scaled digits as ((x_train, y_train), (x_test, y_test)): float32 in [0, 1], int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, random_state=SPLIT_STATE, stratify=y
    )
    return (x_train, y_train), (x_test, y_test)


def client_ids(clients: int) -> list[str]:
    """`client-00`, `client-01`, ...: zero-padded so that the ids sort in client order."""
    width = max(2, len(str(clients - 1)))
    return [f"client-{i:0{width}d}" for i in range(clients)]


def partition(
    x: np.ndarray, y: np.ndarray, clients: int = 10, split: str = "iid", seed: int = 0
) -> dict[str, Part]:
    """Distributes (x, y) across `clients`, keyed by client id in client order.

    `iid`: the samples are shuffled and cut into `clients` near-equal shares (sizes differ by at
    most one). `noniid`: the samples are sorted by label and cut into 2 * clients near-equal
    shards, and each client gets two shards chosen at random, so most clients see only two
    digits. Both are deterministic for a given seed.
    """
    if clients < 1:
        raise ValueError("clients must be at least 1")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    if len(y) < 2 * clients:
        raise ValueError(f"{len(y)} samples are too few for {clients} clients")
    rng = np.random.default_rng(seed)
    if split == "iid":
        parts = np.array_split(rng.permutation(len(y)), clients)
    elif split == "noniid":
        # A stable sort keeps the (already shuffled) train order within each label.
        shards = np.array_split(np.argsort(y, kind="stable"), 2 * clients)
        order = rng.permutation(2 * clients)
        parts = [
            np.concatenate([shards[order[2 * k]], shards[order[2 * k + 1]]]) for k in range(clients)
        ]
    else:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    return {cid: (x[idx], y[idx]) for cid, idx in zip(client_ids(clients), parts, strict=True)}


def write_part(directory: Path, part: Part) -> Path:
    """Writes one part as `directory/digits/x.npy` and `y.npy`; returns the dataset directory."""
    x, y = part
    target = directory / DATASET
    target.mkdir(parents=True, exist_ok=True)
    np.save(target / "x.npy", np.ascontiguousarray(x, dtype="<f4"))
    np.save(target / "y.npy", np.ascontiguousarray(y, dtype="<i8"))
    return target


def write_partitions(out: Path, partitions: Mapping[str, Part], test: Part | None = None) -> None:
    """Writes each client's part under `out/<client-id>/data/`, the test split under `out/eval/`.

    `out/<client-id>` is then the `--data-dir` of that client's proplet, which shows its
    `data/` directory to tasks, read-only, at `/data`.
    """
    for cid, part in partitions.items():
        write_part(out / cid / "data", part)
    if test is not None:
        write_part(out / EVAL_ID, test)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    parser.add_argument("--clients", type=int, default=10, help="number of clients (10)")
    parser.add_argument("--split", choices=SPLITS, default="iid", help="partitioning (iid)")
    parser.add_argument("--seed", type=int, default=0, help="partitioning seed (0)")
    args = parser.parse_args(argv)
    train, test = load_split()
    try:
        parts = partition(*train, clients=args.clients, split=args.split, seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    write_partitions(args.out, parts, test)
    for cid, (_, y) in parts.items():
        counts = np.bincount(y, minlength=10)
        labels = " ".join(f"{label}:{count}" for label, count in enumerate(counts) if count)
        print(f"{cid}  {len(y):4d} samples  labels {labels}")
    print(f"{EVAL_ID}  {len(test[1]):4d} samples (test split)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
