"""`lvita_data.pool.map_tasks` with local processes: order, bounded submission, failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from lvita_data.pool import IN_FLIGHT_PER_WORKER, map_tasks


def _started(task: tuple[str, int]) -> int:
    """Record that the task started (a file per task), return its number."""
    directory, number = task
    (Path(directory) / f"{number:04d}").touch()
    return number


def _fail_on_seven(number: int) -> int:
    if number == 7:
        raise ValueError("task seven failed")
    return number * number


@pytest.mark.parametrize("ordered", [True, False])
def test_tasks_are_submitted_a_bounded_number_ahead(tmp_path: Path, ordered: bool) -> None:
    workers, count = 2, 40
    limit = IN_FLIGHT_PER_WORKER * workers
    tasks = [(str(tmp_path), n) for n in range(count)]
    results = []
    for handed_back, number in enumerate(
        map_tasks(_started, tasks, workers=workers, ordered=ordered)
    ):
        started = sum(1 for _ in tmp_path.iterdir())
        # submitted when this result is handed back: the first `limit`, then one per result
        assert started <= limit + handed_back, (started, handed_back)
        results.append(number)
    assert results == list(range(count)) if ordered else sorted(results) == list(range(count))


def test_the_first_failure_stops_the_run() -> None:
    results = map_tasks(_fail_on_seven, list(range(30)), workers=2)
    with pytest.raises(ValueError, match="task seven failed"):
        list(results)
