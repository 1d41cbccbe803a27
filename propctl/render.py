"""Output formats: aligned tables for people, JSON and YAML for programs."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from schemas.messages import JobStatus


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=False) + "\n"


def to_yaml(value: Any) -> str:
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    out = io.StringIO()
    yaml.dump(value, out)
    return out.getvalue()


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, value in enumerate(row):
            widths[i] = max(widths[i], len(value))
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
    text = str(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def _figure(value: float | None) -> str | None:
    return None if value is None else f"{value:.4f}"


def job_rows(jobs: Sequence[JobStatus]) -> tuple[list[str], list[list[Any]]]:
    """One row per federated job: where it stands and its last round."""
    columns = ["job", "phase", "round", "participants", "rejected", "loss", "accuracy", "reason"]
    rows = []
    for job in jobs:
        last = job.history[-1] if job.history else None
        rows.append(
            [
                job.job,
                job.phase.value,
                f"{job.round}/{job.rounds}",
                f"{len(last.participants)}/{len(last.selected)}" if last else None,
                len(last.rejected) if last else None,
                _figure(last.loss) if last else None,
                _figure(last.accuracy) if last else None,
                job.reason,
            ]
        )
    return columns, rows


def round_rows(job: JobStatus) -> tuple[list[str], list[list[Any]]]:
    """One row per round of one job."""
    columns = [
        "round", "participants", "rejected", "missing", "train_loss", "loss", "accuracy",
        "seconds",
    ]  # fmt: skip
    rows = [
        [
            r.round,
            f"{len(r.participants)}/{len(r.selected)}",
            "; ".join(f"{p}: {why}" for p, why in sorted(r.rejected.items())) or None,
            ",".join(r.missing) or None,
            _figure(r.train_loss),
            _figure(r.loss),
            _figure(r.accuracy),
            f"{r.seconds:.2f}",
        ]
        for r in job.history
    ]
    return columns, rows
