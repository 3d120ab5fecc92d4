"""Time to accuracy: how soon a run had a network at least as accurate as a target.

Under a fixed memory budget a user asks which method gets to a usable accuracy first, not only
which ends higher after the same epochs. Every test evaluation a run logs (an ``epoch`` line of
its metrics.jsonl with a ``test_accuracy``) is a network that existed at that moment:

- end to end: the whole network after that epoch;
- parallel mode: modules 1..k after that epoch, with head k (one point per exit k);
- sequential mode: frozen modules 1..k-1, module k after that epoch, and head k.

A run's *curve* is those points, as seconds since the run's ``start`` line, accuracy and exit
(the 1-based module whose head classified, None end to end). *Time to X* is the first point
whose accuracy is at least X. Greedy runs count every exit: that is what early exits
(``edgetrain export --exit-at K``) deliver. The point's network is on disk then as the run's
resume checkpoint (a finished module's own file once the module is done). Times are wall
clock, so they compare only between runs that shared the machine in the same way; a resumed
run's curve also counts the time it was stopped (the bench runs every run afresh).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from edgetrain.records import RecordError
from edgetrain.runs.rundir import RunDir

Point = tuple[float, float, int | None]
"""(seconds since the run started, test accuracy in [0, 1], exit: 1-based module or None)."""


def accuracy_curve(records: Iterable[dict]) -> list[Point]:
    """The evaluated networks of one run's metrics log, in the order they were logged.

    >>> accuracy_curve([{"event": "start", "time": 100.0},
    ...                 {"event": "epoch", "module": 0, "time": 160.0, "test_accuracy": 0.8},
    ...                 {"event": "epoch", "module": 0, "time": 220.0, "test_accuracy": None},
    ...                 {"event": "epoch", "module": None, "time": 250.5, "test_accuracy": 0.9}])
    [(60.0, 0.8, 1), (150.5, 0.9, None)]
    """
    start = None
    points: list[Point] = []
    for record in records:
        if record.get("event") == "start" and start is None:
            start = record["time"]
        elif (record.get("event") == "epoch" and start is not None
              and record.get("test_accuracy") is not None):
            module = record.get("module")
            points.append((round(record["time"] - start, 1), float(record["test_accuracy"]),
                           None if module is None else int(module) + 1))
    return points


def run_curve(run_dir: str | Path) -> list[Point] | None:
    """The curve of the run folder ``run_dir``; None if it has no readable metrics log."""
    try:
        return accuracy_curve(RunDir(Path(run_dir)).read_metrics())
    except (OSError, RecordError, KeyError, TypeError, ValueError):
        return None


def time_to(curve: Iterable[Point], target: float) -> Point | None:
    """The first point at or above ``target`` accuracy (None if the run never got there).

    >>> time_to([(60.0, 0.8, 1), (150.5, 0.9, 2)], 0.85)
    (150.5, 0.9, 2)
    >>> time_to([(60.0, 0.8, 1)], 0.85) is None
    True
    """
    for point in curve:
        if point[1] >= target:
            return point
    return None
