"""Metrics of the serve loop, rendered in the Prometheus text exposition format 0.0.4.

A deliberately small registry (counters, gauges, histograms with fixed label names), safe to
update from the webhook threads and the pass thread while ``/metrics`` renders it. One lock per
registry, so a scrape sees a consistent snapshot.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import TypeVar

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

_F = TypeVar("_F", bound="_Family")

LabelKey = tuple[str, ...]
"""Label values in the order of the family's declared label names."""

PASS_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PASS_RESULTS = ("applied", "invalid", "unreachable", "failed")
ERROR_STAGES = ("fetch", "load", "observe", "converge")
WEBHOOK_RESULTS = ("accepted", "ignored", "unauthorized", "bad_request")


def format_value(value: float) -> str:
    """Integral values without a fraction (``3``), others as Python's shortest repr."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels_text(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{name}="{escape_label_value(value)}"' for name, value in pairs)
    return "{" + inner + "}" if inner else ""


class _Family:
    kind = ""

    def __init__(self, lock: threading.Lock, name: str, help: str, labels: Iterable[str]) -> None:
        self._lock = lock
        self.name = name
        self.help = help
        self.labelnames: tuple[str, ...] = tuple(labels)
        for label in self.labelnames:
            if not _LABEL.match(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r} for {name}")
        if len(set(self.labelnames)) != len(self.labelnames):
            raise ValueError(f"duplicate label names for {name}: {self.labelnames}")

    def _key(self, labels: Mapping[str, str]) -> LabelKey:
        if set(labels) != set(self.labelnames):
            raise ValueError(
                f"{self.name} takes labels {list(self.labelnames)}, got {sorted(labels)}"
            )
        return tuple(str(labels[name]) for name in self.labelnames)

    def _check_key(self, key: LabelKey) -> LabelKey:
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {list(self.labelnames)}, got {key!r}")
        return tuple(str(v) for v in key)

    def _header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def _lines(self) -> list[str]:  # called with the lock held
        raise NotImplementedError


class _Scalar(_Family):
    """A family of one float per label set: the common part of counters and gauges."""

    def __init__(self, lock: threading.Lock, name: str, help: str, labels: Iterable[str]) -> None:
        super().__init__(lock, name, help, labels)
        self._values: dict[LabelKey, float] = {}

    def get(self, **labels: str) -> float:
        key = self._key(labels)
        with self._lock:
            return self._values.get(key, 0.0)

    def _add(self, value: float, labels: Mapping[str, str]) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + value

    def _lines(self) -> list[str]:
        lines = self._header()
        values = self._values
        if not self.labelnames and not values:
            values = {(): 0.0}  # an unlabelled metric exists from the start
        for key in sorted(values):
            pairs = _labels_text(zip(self.labelnames, key, strict=True))
            lines.append(f"{self.name}{pairs} {format_value(values[key])}")
        return lines


class Counter(_Scalar):
    kind = "counter"

    def inc(self, value: float = 1, **labels: str) -> None:
        """Add ``value`` (>= 0); ``inc(0, ...)`` shows a label set before its first event."""
        if value < 0:
            raise ValueError(f"{self.name}: a counter only goes up (got {value})")
        self._add(value, labels)


class Gauge(_Scalar):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, value: float = 1, **labels: str) -> None:
        self._add(value, labels)

    def dec(self, value: float = 1, **labels: str) -> None:
        self._add(-value, labels)

    def replace(self, values: Mapping[LabelKey, float]) -> None:
        """Swap the whole family at once: label sets missing from ``values`` disappear.

        Keys are tuples of label values in declared order, e.g. ``{("running",): 3}``.
        """
        fresh = {self._check_key(key): float(value) for key, value in values.items()}
        with self._lock:
            self._values = fresh


class Histogram(_Family):
    kind = "histogram"

    def __init__(
        self,
        lock: threading.Lock,
        name: str,
        help: str,
        labels: Iterable[str],
        buckets: Iterable[float],
    ) -> None:
        super().__init__(lock, name, help, labels)
        if "le" in self.labelnames:
            raise ValueError(f"{name}: 'le' is reserved for histogram buckets")
        bounds = [float(b) for b in buckets]
        if bounds and math.isinf(bounds[-1]):
            bounds.pop()  # +Inf is always added
        if not bounds or any(a >= b for a, b in pairwise(bounds)):
            raise ValueError(f"{name}: buckets must be non-empty and strictly increasing")
        self.buckets: tuple[float, ...] = tuple(bounds)
        # per label set: per-bucket counts (not cumulative; the last is +Inf), sum
        self._counts: dict[LabelKey, list[int]] = {}
        self._sums: dict[LabelKey, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        index = len(self.buckets)
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                index = i
                break
        with self._lock:
            counts = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
            counts[index] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value

    def count(self, **labels: str) -> int:
        key = self._key(labels)
        with self._lock:
            return sum(self._counts.get(key, ()))

    def _lines(self) -> list[str]:
        lines = self._header()
        counts = self._counts
        if not self.labelnames and not counts:
            counts = {(): [0] * (len(self.buckets) + 1)}
        for key in sorted(counts):
            pairs = list(zip(self.labelnames, key, strict=True))
            running = 0
            for bound, n in zip((*self.buckets, math.inf), counts[key], strict=True):
                running += n
                le = _labels_text([*pairs, ("le", format_value(bound))])
                lines.append(f"{self.name}_bucket{le} {running}")
            labels = _labels_text(pairs)
            lines.append(f"{self.name}_sum{labels} {format_value(self._sums.get(key, 0.0))}")
            lines.append(f"{self.name}_count{labels} {running}")
        return lines


class Metrics:
    """A registry; families render in the order they were created, samples sorted by labels."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, _Family] = {}

    def _register(self, family: _F) -> _F:
        if not _NAME.match(family.name):
            raise ValueError(f"invalid metric name {family.name!r}")
        with self._lock:
            if family.name in self._families:
                raise ValueError(f"metric {family.name} is already registered")
            self._families[family.name] = family
        return family

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> Counter:
        return self._register(Counter(self._lock, name, help, labels))

    def gauge(self, name: str, help: str, labels: Iterable[str] = ()) -> Gauge:
        return self._register(Gauge(self._lock, name, help, labels))

    def histogram(
        self, name: str, help: str, buckets: Iterable[float], labels: Iterable[str] = ()
    ) -> Histogram:
        return self._register(Histogram(self._lock, name, help, labels, buckets))

    def render(self) -> str:
        with self._lock:
            lines = [line for family in self._families.values() for line in family._lines()]
        return "\n".join(lines) + "\n" if lines else ""


@dataclass(frozen=True)
class ServeMetrics:
    """The registry of ``propctl serve`` and the instruments its loop and listener update."""

    registry: Metrics
    passes: Counter  # result: applied | invalid | unreachable | failed
    pass_duration: Histogram
    actions: Counter  # outcome: the converge outcome kind
    errors: Counter  # stage: fetch | load | observe | converge
    proplets_alive: Gauge
    tasks: Gauge  # state: replace() the family after each observation
    webhooks: Counter  # provider, result: accepted | ignored | unauthorized | bad_request
    last_pass: Gauge  # unix time the last pass finished

    def render(self) -> str:
        return self.registry.render()


def serve_metrics() -> ServeMetrics:
    registry = Metrics()
    metrics = ServeMetrics(
        registry=registry,
        passes=registry.counter(
            "propeller_passes_total", "Reconcile passes by result.", ["result"]
        ),
        pass_duration=registry.histogram(
            "propeller_pass_duration_seconds",
            "Duration of reconcile passes.",
            PASS_DURATION_BUCKETS,
        ),
        actions=registry.counter(
            "propeller_actions_total", "Planned actions by converge outcome.", ["outcome"]
        ),
        errors=registry.counter(
            "propeller_errors_total", "Pass errors by pipeline stage.", ["stage"]
        ),
        proplets_alive=registry.gauge(
            "propeller_proplets_alive", "Proplets alive in the last observation."
        ),
        tasks=registry.gauge("propeller_tasks", "Tasks reported by proplets, by state.", ["state"]),
        webhooks=registry.counter(
            "propeller_webhooks_total",
            "Webhook requests by provider and result.",
            ["provider", "result"],
        ),
        last_pass=registry.gauge(
            "propeller_last_pass_timestamp_seconds",
            "Unix time at which the last reconcile pass finished.",
        ),
    )
    # Known label sets start at zero so rate() and increase() see the first event.
    for result in PASS_RESULTS:
        metrics.passes.inc(0, result=result)
    for stage in ERROR_STAGES:
        metrics.errors.inc(0, stage=stage)
    return metrics
