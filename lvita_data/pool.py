"""The one way lvita runs tasks in parallel: `map_tasks` over local processes or Ray.

Used by planning (one task per dataset file), the build (one task per shard), `lvita stats` and
`lvita verify` (one task per shard). A task function is a module-level function called as
``fn(task)``, or ``fn(task, shared)`` when a `shared` object (e.g. the build context: tokenizer
spec, manifest) is given; `shared` is sent to each worker once, not with every task.

Local processes are started with ``spawn``, never ``fork``: a forked child inherits locks held
by threads of the parent (PyAV's decoder threads, the tokenizer's thread pool) and can deadlock
when it touches them (a test that forced ``fork`` hung exactly so, in PyAV's locks). A spawned
worker imports the caller's main module again, so a script that runs tasks in parallel needs the
usual ``if __name__ == "__main__":`` guard. Every worker runs `watch_parent`, so a killed parent
(``kill -9``) takes its workers with it within 0.1 s instead of leaving them writing. With one
worker or one task, tasks run in this process (no pickling, plain tracebacks).

Results come back in task order (``ordered=True``) or as they complete (``ordered=False``, for
progress and for writing completion records early). A worker that dies (killed, out of memory)
is a `WorkerLost` error, unless this process was interrupted too (Ctrl-C to the process group):
then the interrupt is what is raised. At most `IN_FLIGHT_PER_WORKER` tasks per worker are
submitted and not yet handed back, so a 35,000-shard build holds a few dozen tasks and results
at a time, not all of them. The first failing task stops the run: its exception is raised here
and the tasks not yet started are cancelled.

``executor="ray"``: Ray tasks of 1 CPU each, spread over the nodes, retried up to 3 times if a
worker dies, on the Ray this process is connected to, else the cluster of ``RAY_ADDRESS``, else
a local Ray of `workers` CPUs; a Ray that `map_tasks` started is shut down when it ends. A Ray
task runs in this process's working directory, as a local worker does, so relative paths
(``lvita build --out shards/x``) name the same files on every node of a cluster with a shared
filesystem (a worker of a cluster started with ``ray start`` otherwise works in the directory
that ``ray start`` ran in).
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Literal, TypeVar

from lvita_data.errors import PoolError, WorkerLost

T = TypeVar("T")
R = TypeVar("R")
Executor = Literal["local", "ray"]
EXECUTORS: tuple[Executor, ...] = ("local", "ray")
_NO_SHARED = object()
IN_FLIGHT_PER_WORKER = 4
"""Tasks submitted ahead per local worker (enough to keep every worker busy)."""
LOST_WORKER_GRACE_S = 0.5
"""How long a dead worker's error waits for this process's own pending Ctrl-C."""
SIGNAL_POLL_S = 0.2
"""How often a run waiting for results looks at a noted SIGINT / SIGTERM."""
_shared: Any = _NO_SHARED  # the `shared` object in a local worker process


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.1)
    os._exit(1)  # the parent died (kill -9): stop working at once instead of lingering


def watch_parent() -> None:
    """End this worker within 0.1 s of its parent process dying."""
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_quietly(signum: int, frame: object) -> None:
    os._exit(128 + signum)  # Ctrl-C reaches the whole process group: the parent reports it


def _init_worker(has_shared: bool, shared: Any) -> None:
    global _shared
    _shared = shared if has_shared else _NO_SHARED  # the sentinel does not survive pickling
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a background job ignores Ctrl-C
        signal.signal(signal.SIGINT, _exit_quietly)
    watch_parent()


def _call(fn: Callable[..., R], task: Any) -> R:
    return fn(task) if _shared is _NO_SHARED else fn(task, _shared)


def map_tasks(
    fn: Callable[..., R],
    tasks: Sequence[T],
    *,
    workers: int = 1,
    executor: Executor = "local",
    shared: Any = _NO_SHARED,
    ordered: bool = True,
) -> Iterator[R]:
    """``fn(task[, shared])`` for every task, in `workers` processes (see the module doc)."""
    if executor not in EXECUTORS:
        raise PoolError(f"unknown executor {executor!r}, expected one of {list(EXECUTORS)}")
    if executor == "ray":
        return _map_ray(fn, tasks, workers, shared, ordered)
    if workers <= 1 or len(tasks) <= 1:
        if shared is _NO_SHARED:
            return (fn(task) for task in tasks)
        return (fn(task, shared) for task in tasks)
    return _map_local(fn, tasks, workers, shared, ordered)


def _map_local(
    fn: Callable[..., R], tasks: Sequence[T], workers: int, shared: Any, ordered: bool
) -> Iterator[R]:
    limit = IN_FLIGHT_PER_WORKER * workers
    with (
        _deferred_signals() as interrupted,
        ProcessPoolExecutor(
            max_workers=min(workers, len(tasks)),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(shared is not _NO_SHARED, None if shared is _NO_SHARED else shared),
        ) as pool,
    ):
        try:
            yield from _bounded_results(pool, fn, tasks, limit, ordered, interrupted)
        except BrokenProcessPool:
            # Ctrl-C reaches the whole process group: the workers exit at once, and their
            # deaths can reach this thread before its own Ctrl-C does; let that one win.
            time.sleep(LOST_WORKER_GRACE_S)
            interrupted()
            raise WorkerLost(
                f"a worker process died while running a task ({fn.__name__}): killed, or out "
                "of memory? Finished work is kept; run the command again to go on"
            ) from None


@contextlib.contextmanager
def _deferred_signals() -> Iterator[Callable[[], None]]:
    """While a local pool runs (shut down included), the first SIGINT or SIGTERM is only
    noted, and the yielded check hands it to the handler installed before (Ctrl-C's
    KeyboardInterrupt, the CLI's SIGTERM exception, or the default action) at a safe point; at
    the latest when the pool has shut down. A handler that raises inside concurrent.futures'
    own code can leave one of its locks held (a future's condition, the shutdown lock) and the
    pool then hangs on exit: a SIGTERM test hung so in a random-order run. A second signal goes
    straight to the previous handler (press Ctrl-C again to stop at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    noted: list[int] = []
    previous = {
        number: signal.getsignal(number)
        for number in (signal.SIGINT, signal.SIGTERM)
        if signal.getsignal(number) not in (signal.SIG_IGN, None)
    }

    def restore() -> None:
        for number, handler in previous.items():
            signal.signal(number, handler)

    def note(signum: int, frame: object) -> None:
        noted.append(signum)
        restore()

    def interrupted() -> None:
        if noted:
            signum = noted.pop()
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            else:  # SIG_DFL: the default action, now that the pool is left alone
                os.kill(os.getpid(), signum)

    for number in previous:
        signal.signal(number, note)
    try:
        yield interrupted
    finally:
        restore()
        interrupted()


def _bounded_results(
    pool: ProcessPoolExecutor,
    fn: Callable[..., R],
    tasks: Sequence[T],
    limit: int,
    ordered: bool,
    interrupted: Callable[[], None],
) -> Iterator[R]:
    """Results of `tasks` with at most `limit` submitted and not yet handed back: the pool's
    queues and the finished results held here stay bounded however many tasks there are. Every
    `SIGNAL_POLL_S` (and before each result) `interrupted()` may raise a noted signal."""
    upcoming = iter(tasks)
    in_flight: dict[Future[R], None] = {}  # insertion order = task order

    def submit(count: int) -> None:
        for task in itertools.islice(upcoming, count):
            in_flight[pool.submit(_call, fn, task)] = None

    submit(limit)
    try:
        while in_flight:
            candidates = [next(iter(in_flight))] if ordered else list(in_flight)
            done, _ = wait(candidates, timeout=SIGNAL_POLL_S, return_when=FIRST_COMPLETED)
            interrupted()
            if not done:
                continue
            future = candidates[0] if ordered else next(f for f in in_flight if f in done)
            result = future.result()
            del in_flight[future]
            submit(1)
            yield result
    except BaseException:
        for future in in_flight:  # a failed task stops the run now, not after all others
            future.cancel()
        raise


def _import_ray():
    try:
        import ray
    except Exception as error:  # ray is an optional extra; its import can fail in many ways
        raise PoolError(f"--executor ray needs Ray: pip install 'lvita[ray]' ({error})") from None
    return ray


@contextlib.contextmanager
def executor_session(executor: Executor, workers: int) -> Iterator[None]:
    """Keep one Ray for several `map_tasks` calls (planning, then the shards): connected or
    started on entry (see the module doc), shut down on exit if this started it. A no-op for
    local processes."""
    if executor != "ray":
        yield
        return
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=False)
        else:
            ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False)
        started = True
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _map_ray(
    fn: Callable[..., R], tasks: Sequence[T], workers: int, shared: Any, ordered: bool
) -> Iterator[R]:
    with executor_session("ray", workers):
        yield from _ray_results(_import_ray(), fn, tasks, shared, ordered)


def _in_directory(directory: str, fn: Callable[..., R], *args: Any) -> R:
    """``fn(*args)`` in `directory` (a Ray task: see the module doc); where the directory does
    not exist on a node, in the worker's own, so absolute paths still work."""
    with contextlib.suppress(OSError):
        os.chdir(directory)
    return fn(*args)


def _ray_results(ray, fn: Callable[..., R], tasks: Sequence[T], shared: Any, ordered: bool):
    pending: list = []
    try:
        # named after `fn`: Ray's task lists and the worker's process title say ray::build_shard;
        # spread over the nodes (Ray's default packs tasks onto the driver's node first)
        remote = ray.remote(num_cpus=1, max_retries=3, scheduling_strategy="SPREAD")(
            _in_directory
        ).options(name=fn.__name__)
        cwd = os.getcwd()
        if shared is _NO_SHARED:
            pending = [remote.remote(cwd, fn, task) for task in tasks]
        else:
            shared_ref = ray.put(shared)
            pending = [remote.remote(cwd, fn, task, shared_ref) for task in tasks]
        if ordered:
            for ref in list(pending):
                yield ray.get(ref)
                pending.remove(ref)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
