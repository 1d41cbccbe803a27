"""A federated job's accuracy and loss per round as an SVG image (no plotting library needed).

Accuracy is drawn against the left axis (0 to 1), the evaluation loss (or the training loss when
the job has no evaluation set) against the right axis, from 0 to its largest value.
"""

from __future__ import annotations

from html import escape

from schemas.messages import JobStatus

WIDTH, HEIGHT = 720, 400
LEFT, RIGHT, TOP, BOTTOM = 64, 64, 48, 48
ACCURACY_COLOUR = "#1f77b4"
LOSS_COLOUR = "#d62728"


def job_chart(job: JobStatus) -> str:
    rounds = [r.round for r in job.history]
    accuracy: list[tuple[int, float | None]] = [
        (r.round, r.accuracy) for r in job.history if r.accuracy is not None
    ]
    use_eval = any(r.loss is not None for r in job.history)
    loss: list[tuple[int, float | None]] = [
        (r.round, r.loss if use_eval else r.train_loss)
        for r in job.history
        if (r.loss if use_eval else r.train_loss) is not None
    ]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    first, last = (min(rounds), max(rounds)) if rounds else (1, 1)
    span = max(last - first, 1)
    loss_top = max((value for _, value in loss if value is not None), default=1.0) or 1.0

    def x(round_: int) -> float:
        return LEFT + (round_ - first) / span * plot_w

    def y(fraction: float) -> float:
        return TOP + (1 - fraction) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}"'
        f' viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="24" text-anchor="middle" font-size="15">'
        f"{escape(job.job)}: {escape(job.phase.value)}, round {job.round}/{job.rounds}</text>",
    ]
    for step in range(6):
        fraction = step / 5
        parts.append(
            f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(fraction):.1f}" y2="{y(fraction):.1f}"'
            ' stroke="#ddd"/>'
        )
        parts.append(
            f'<text x="{LEFT - 8}" y="{y(fraction) + 4:.1f}" text-anchor="end"'
            f' fill="{ACCURACY_COLOUR}">{fraction:.1f}</text>'
        )
        parts.append(
            f'<text x="{LEFT + plot_w + 8}" y="{y(fraction) + 4:.1f}"'
            f' fill="{LOSS_COLOUR}">{fraction * loss_top:.3g}</text>'
        )
    ticks = sorted({first, last, *range(first, last + 1, max(1, span // 10))})
    for tick in ticks:
        parts.append(
            f'<text x="{x(tick):.1f}" y="{TOP + plot_h + 18}" text-anchor="middle">{tick}</text>'
        )
    parts.append(
        f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 10}" text-anchor="middle">round</text>'
    )
    parts.append(
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/>'
    )
    series: list[tuple[list[tuple[int, float | None]], float, str, str]] = [
        (accuracy, 1.0, ACCURACY_COLOUR, "accuracy"),
        (loss, loss_top, LOSS_COLOUR, "loss" if use_eval else "training loss"),
    ]
    for index, (points, top, colour, label) in enumerate(series):
        if points:
            path = " ".join(f"{x(r):.1f},{y((v or 0) / top):.1f}" for r, v in points)
            parts.append(
                f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>'
            )
            parts.extend(
                f'<circle cx="{x(r):.1f}" cy="{y((v or 0) / top):.1f}" r="2.5" fill="{colour}"/>'
                for r, v in points
            )
        parts.append(
            f'<text x="{LEFT + 10 + index * 120}" y="{TOP - 8}" fill="{colour}">{label}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
