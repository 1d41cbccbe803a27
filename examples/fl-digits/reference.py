"""The fl-digits training in one process with numpy: the trainer's arithmetic, without a fleet.

`local_train` does what `trainer.wasm` does in train mode, step for step: the same shuffles (the
same splitmix64 stream and Fisher-Yates loop), the same minibatches and the same rounding, so its
result matches the trainer's `/out/update.npy` to within a few float32 ulps. `evaluate` matches
evaluate mode. `fedavg` runs whole rounds: every sampled client trains from the global model, and
the local models are averaged weighted by their sample counts.

The model is softmax regression over d features and C classes, stored as one float32 vector of
d * C weights (row-major, [feature][class]) followed by C biases: 650 values for the digits.
The weights are float32 between steps; within a minibatch everything (logits, softmax,
gradients, the update) is computed in float64 and the updated weights are rounded to float32.

Run `python reference.py --split iid --epochs 5 --rounds 20` to print accuracy per round.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import numpy as np

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
# The "epoch" that seeds client sampling: no training epoch ever has this index.
SAMPLING_STREAM = MASK64

Part = tuple[np.ndarray, np.ndarray]


class Update(NamedTuple):
    """What one client returns: its local model, its sample count, its loss after training."""

    model: np.ndarray
    samples: int
    loss: float


class Evaluation(NamedTuple):
    samples: int
    loss: float
    accuracy: float


# --- the shuffles -------------------------------------------------------------------------------


def _mix(z: int) -> int:
    """splitmix64's output function on one 64-bit state."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _mix_array(z: np.ndarray) -> np.ndarray:
    """`_mix` over a uint64 array (numpy's uint64 arithmetic wraps modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def stream_state(seed: int, round_: int, epoch: int) -> int:
    """The splitmix64 state that shuffles one epoch of one round.

    Two splitmix64 steps fold the round and the epoch into the seed: o1 = next(seed),
    o2 = next(o1 ^ round), state = o2 ^ epoch. Negative seeds are taken modulo 2**64.
    """
    o1 = _mix((seed + GAMMA) & MASK64)
    o2 = _mix(((o1 ^ (round_ & MASK64)) + GAMMA) & MASK64)
    return o2 ^ (epoch & MASK64)


def permutation(n: int, seed: int, round_: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a Fisher-Yates shuffle of 0..n-1.

    For i = n-1 down to 1, the next splitmix64 output r picks j = r mod (i + 1), and items i
    and j swap. (The modulo's bias is below 2**-50 for any n a proplet holds.)
    """
    order = list(range(n))
    if n < 2:
        return np.array(order, dtype=np.int64)
    # splitmix64's k-th state is state + k * GAMMA, so all draws can be computed at once.
    state = np.array([stream_state(seed, round_, epoch)], dtype=np.uint64)
    steps = np.arange(1, n, dtype=np.uint64) * np.uint64(GAMMA)
    draws = _mix_array(state + steps)
    bounds = np.arange(n, 1, -1, dtype=np.uint64)
    for i, j in zip(range(n - 1, 0, -1), (draws % bounds).tolist(), strict=True):
        order[i], order[j] = order[j], order[i]
    return np.array(order, dtype=np.int64)


def sample_clients(count: int, per_round: int, seed: int, round_: int) -> list[int]:
    """Which of `count` clients (in client-id order) train in a round: sorted indices.

    The first `per_round` of a shuffle drawn like an epoch's, with the epoch index 2**64 - 1.
    """
    if per_round >= count:
        return list(range(count))
    return sorted(permutation(count, seed, round_, SAMPLING_STREAM)[:per_round].tolist())


# --- the model ----------------------------------------------------------------------------------


def softmax_size(features: int, classes: int) -> int:
    return (features + 1) * classes


def _classes(size: int, features: int) -> int:
    if size % (features + 1) or size // (features + 1) < 2:
        raise ValueError(
            f"a model of {size} values does not fit {features} features: softmax regression"
            f" needs ({features} + 1) * classes values"
        )
    return size // (features + 1)


def _split(flat: np.ndarray, features: int) -> tuple[np.ndarray, np.ndarray]:
    classes = _classes(flat.size, features)
    return flat[: features * classes].reshape(features, classes), flat[features * classes :]


def _logits(x64: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return x64 @ weights.astype(np.float64) + bias.astype(np.float64)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _losses(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-sample cross-entropy, log-sum-exp(z) - z[y], with the max subtracted first."""
    top = z.max(axis=1)
    lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    return lse - z[np.arange(len(y)), y]


def _check(model: np.ndarray, x: np.ndarray, y: np.ndarray) -> int:
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        raise ValueError(f"need x (n, d) and y (n,) with n > 0, got {x.shape} and {y.shape}")
    classes = _classes(model.size, x.shape[1])
    if y.min() < 0 or y.max() >= classes:
        raise ValueError(f"labels must lie in 0..{classes - 1}")
    return classes


def evaluate(model: np.ndarray, x: np.ndarray, y: np.ndarray) -> Evaluation:
    """Mean cross-entropy and accuracy of `model` on (x, y), as the trainer's evaluate mode."""
    flat = np.asarray(model, dtype=np.float32).reshape(-1)
    y = np.asarray(y, dtype=np.int64)
    _check(flat, x, y)
    weights, bias = _split(flat, x.shape[1])
    z = _logits(np.asarray(x, dtype=np.float64), weights, bias)
    # argmax picks the first of equal maxima, as the trainer does.
    correct = int((z.argmax(axis=1) == y).sum())
    return Evaluation(len(y), float(_losses(z, y).mean()), correct / len(y))


def local_train(
    model: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    round_: int,
    seed: int,
    epochs: int = 1,
    batch: int = 10,
    lr: float = 0.1,
) -> Update:
    """E epochs of minibatch SGD from `model`, as the trainer's train mode.

    Each epoch visits the samples in `permutation(n, seed, round_, epoch)` order (epoch is
    0-based) in batches of `batch`, the last one partial. A step is
    w <- float32(w - lr * (sum of the batch's gradients) / batch size). The loss returned is the
    mean cross-entropy of the trained model over all local samples.
    """
    model = np.asarray(model, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    _check(model, x, y)
    flat = model.reshape(-1).copy()
    weights, bias = _split(flat, x.shape[1])
    x64 = np.asarray(x, dtype=np.float64)
    n = len(y)
    for epoch in range(epochs):
        order = permutation(n, seed, round_, epoch)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            xb = x64[idx]
            delta = _softmax(_logits(xb, weights, bias))
            delta[np.arange(len(idx)), y[idx]] -= 1.0
            size = float(len(idx))
            grad_w = (xb.T @ delta) / size
            grad_b = delta.sum(axis=0) / size
            # The views write through into `flat`.
            weights[...] = (weights.astype(np.float64) - lr * grad_w).astype(np.float32)
            bias[...] = (bias.astype(np.float64) - lr * grad_b).astype(np.float32)
    if not np.isfinite(flat).all():
        raise FloatingPointError("training diverged: non-finite weights (lower the learning rate)")
    trained = flat.reshape(model.shape)
    return Update(trained, n, evaluate(trained, x, y).loss)


# --- federated averaging ------------------------------------------------------------------------


def aggregate(updates: Sequence[Update]) -> np.ndarray:
    """The sample-weighted mean of the local models, summed in float64, rounded to float32."""
    total = sum(u.samples for u in updates)
    acc = np.zeros(updates[0].model.shape, dtype=np.float64)
    for u in updates:
        acc += u.samples * u.model.astype(np.float64)
    return (acc / total).astype(np.float32)


def fedavg(
    partitions: Mapping[str, Part] | Sequence[Part],
    test: Part,
    rounds: int,
    epochs: int = 1,
    batch: int = 10,
    lr: float = 0.1,
    seed: int = 0,
    clients_per_round: int | float | None = None,
    init: np.ndarray | None = None,
    stop_at: float | None = None,
) -> list[dict[str, float]]:
    """Runs FedAvg and returns one {round, accuracy, loss, train_loss, clients} per round.

    `partitions` are the clients' (x, y), in client-id order when a mapping. Every client gets
    the job's `seed` unchanged. `clients_per_round` is a count, a fraction of the clients
    (at least one is taken), or None for all of them; see `sample_clients`. The global model
    starts from `init`, zeros by default. `accuracy` and `loss` are the global model's on `test`
    after the round's aggregation; `train_loss` is the sample-weighted mean of the clients'
    reported losses. With `stop_at`, the run ends at the first round reaching that accuracy.
    """
    parts = list(partitions.values()) if isinstance(partitions, Mapping) else list(partitions)
    count = len(parts)
    if clients_per_round is None:
        per_round = count
    elif isinstance(clients_per_round, float):
        per_round = max(1, round(clients_per_round * count))
    else:
        per_round = max(1, min(count, clients_per_round))
    features = test[0].shape[1]
    classes = int(max(int(np.max(y)) for _, y in [*parts, test])) + 1
    model = (
        np.zeros(softmax_size(features, classes), dtype=np.float32)
        if init is None
        else np.asarray(init, dtype=np.float32)
    )
    history: list[dict[str, float]] = []
    for r in range(1, rounds + 1):
        chosen = sample_clients(count, per_round, seed, r)
        updates = [local_train(model, *parts[k], r, seed, epochs, batch, lr) for k in chosen]
        model = aggregate(updates)
        total = sum(u.samples for u in updates)
        result = evaluate(model, *test)
        history.append(
            {
                "round": r,
                "accuracy": result.accuracy,
                "loss": result.loss,
                "train_loss": sum(u.samples * u.loss for u in updates) / total,
                "clients": len(chosen),
            }
        )
        if stop_at is not None and result.accuracy >= stop_at:
            break
    return history


def rounds_to(history: Sequence[Mapping[str, float]], accuracy: float) -> int | None:
    """The first round whose test accuracy reaches `accuracy`, or None."""
    return next((int(h["round"]) for h in history if h["accuracy"] >= accuracy), None)


# --- command line -------------------------------------------------------------------------------


def _load_prepare() -> ModuleType:
    path = Path(__file__).with_name("prepare.py")
    spec = importlib.util.spec_from_file_location("fl_digits_prepare", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="FedAvg on the digits, in-process with numpy.")
    parser.add_argument("--split", choices=("iid", "noniid"), default="iid")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=None, help="clients per round (all)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0, help="training seed (FL_SEED)")
    parser.add_argument("--data-seed", type=int, default=0, help="partitioning seed")
    parser.add_argument("--target", type=float, default=0.95, help="accuracy goal to report")
    args = parser.parse_args(argv)
    prepare = _load_prepare()
    train, test = prepare.load_split()
    parts = prepare.partition(*train, clients=args.clients, split=args.split, seed=args.data_seed)
    history = fedavg(
        parts,
        test,
        args.rounds,
        epochs=args.epochs,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        clients_per_round=args.fraction,
    )
    print("round  accuracy  test_loss  train_loss")
    for h in history:
        print(f"{h['round']:5d}  {h['accuracy']:8.4f}  {h['loss']:9.4f}  {h['train_loss']:10.4f}")
    reached = rounds_to(history, args.target)
    print(f"rounds to {args.target:.2%}: {reached if reached is not None else 'not reached'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
