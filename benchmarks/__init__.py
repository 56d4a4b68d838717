"""`make bench`: each `bench_*.py` module maps figure names to functions returning a `Figure`.

Every figure is a ratio or a time measured side by side in one run, never a timed unit test.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Figure:
    """One benchmark result: the value, its unit, the goal as text, and details worth printing."""

    value: float
    unit: str
    goal: str
    details: dict[str, object] = field(default_factory=dict)


def steady_rate(stamps: list[tuple[float, int]], first: int, last: int) -> float:
    """Units a second between the progress reports (time, count) at counts `first` and `last` (tasks,
    frames): the steady state, without the set-up before `first`."""
    at = {count: t for t, count in stamps}
    return (last - first) / (at[last] - at[first])
