"""`lvita_data.pool.map_tasks` with local processes: order, bounded submission, failure."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from lvita_data.errors import WorkerLost
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
        # submitted when result number `handed_back` is handed back: the first `limit`, then
        # one more per result taken from the pool (this one's included)
        assert started <= limit + handed_back + 1, (started, handed_back)
        results.append(number)
    assert results == list(range(count)) if ordered else sorted(results) == list(range(count))


def test_the_first_failure_stops_the_run() -> None:
    results = map_tasks(_fail_on_seven, list(range(30)), workers=2)
    with pytest.raises(ValueError, match="task seven failed"):
        list(results)


def _die_on_three(number: int) -> int:
    if number == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would
    return number


def test_a_worker_that_dies_is_a_named_error() -> None:
    with pytest.raises(WorkerLost, match="a worker process died while running a task"):
        list(map_tasks(_die_on_three, list(range(10)), workers=2))


class _Stop(BaseException):
    pass


def _slow(number: int) -> int:
    time.sleep(0.3)
    return number


def test_sigterm_while_the_pool_runs_is_raised_at_a_safe_point() -> None:
    """A SIGTERM handler that raises (the CLI's) gets the signal once the pool is at a safe
    point, not inside concurrent.futures' locks (a hang on exit), and is restored after."""

    def stop(signum: int, frame: object) -> None:
        raise _Stop

    previous = signal.signal(signal.SIGTERM, stop)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        started = time.monotonic()
        timer.start()
        with pytest.raises(_Stop):
            list(map_tasks(_slow, list(range(200)), workers=2))
        assert time.monotonic() - started < 30  # not all 200 tasks (30 s of work), no hang
        assert signal.getsignal(signal.SIGTERM) is stop
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
