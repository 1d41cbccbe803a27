"""The live fleet as one snapshot: per proplet, what it reports and the desired set it holds.

Values only; building them from retained MQTT messages and heartbeats is ``observe``'s job. A
proplet can be known only from a retained desired set (it never reported, or its state was
cleared): its runtime is then ``None`` and it receives no new tasks.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

from schemas.messages import DesiredSet, ReportedState, Runtime


@dataclass(frozen=True, slots=True)
class ObservedProplet:
    id: str
    runtime: Runtime | None
    labels: Mapping[str, str] = field(default_factory=dict)
    max_tasks: int = 0
    alive: bool = False
    desired: DesiredSet | None = None
    reported: ReportedState | None = None
    # Offline for longer than the serve loop's bound: its unpinned tasks move elsewhere.
    lost: bool = False

    @classmethod
    def of(
        cls,
        proplet: str,
        *,
        reported: ReportedState | None = None,
        desired: DesiredSet | None = None,
        alive: bool = False,
    ) -> ObservedProplet:
        """A proplet as its retained messages describe it; ``alive`` comes from heartbeats."""
        if reported is None:
            return cls(proplet, None, {}, 0, alive, desired, None)
        return cls(
            proplet,
            reported.runtime,
            dict(reported.labels),
            reported.max_tasks,
            alive,
            desired,
            reported,
        )

    @property
    def known(self) -> bool:
        """Whether its runtime, labels and capacity are known (it has reported)."""
        return self.runtime is not None

    @property
    def generation(self) -> int:
        """The highest generation this snapshot shows for it, written or observed."""
        written = self.desired.generation if self.desired is not None else 0
        seen = self.reported.observed_generation if self.reported is not None else 0
        return max(written, seen)

    @property
    def next_generation(self) -> int:
        """Generation of the next desired set: higher than any this or another host wrote."""
        return self.generation + 1


@dataclass(frozen=True, slots=True)
class ObservedState:
    proplets: Mapping[str, ObservedProplet] = field(default_factory=dict)

    @classmethod
    def of(cls, proplets: Iterable[ObservedProplet]) -> ObservedState:
        return cls({proplet.id: proplet for proplet in sorted(proplets, key=lambda p: p.id)})

    @classmethod
    def from_messages(
        cls,
        reported: Mapping[str, ReportedState],
        desired: Mapping[str, DesiredSet],
        alive: Collection[str],
        lost: Collection[str] = (),
    ) -> ObservedState:
        """Join retained reported states and desired sets by proplet id."""
        return cls.of(
            replace(
                ObservedProplet.of(
                    proplet,
                    reported=reported.get(proplet),
                    desired=desired.get(proplet),
                    alive=proplet in alive,
                ),
                lost=proplet in lost and proplet not in alive,
            )
            for proplet in set(reported) | set(desired)
        )
