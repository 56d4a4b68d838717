"""Worker processes in which a crash fails one item, not the run.

Decoders are native code: a truncated file can segfault PyAV/FFmpeg, which takes the whole process
down. `concurrent.futures` then fails every pending future (BrokenProcessPool); here each worker
holds exactly one item at a time, so a dead worker fails only that item, is replaced, and the rest
go on. Workers start with forkserver (spawn where there is none), never plain fork, so no decoder
or thread state is shared with the parent.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import signal
import sys
import time
import types
from collections import deque
from collections.abc import Callable, Container, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, TypeAlias, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_Context: TypeAlias = "mp.context.SpawnContext | mp.context.ForkServerContext"
_STOP = b""  # a message with no payload asks a worker to exit
# The one worker policy of every decoding pool (manifest, extract, predict, synth): a worker that has
# not finished its item in this time (a decoder blocked on a stalled mount, a stream that never ends)
# is stopped and only that item fails. Ten minutes is far beyond any real video's decode here.
TIME_LIMIT_S = 600.0
# A worker's own start (a fresh process importing torch and the decoders) is not its item's time: the
# limit counts from the worker's word that it has the item, and a worker that never says so gets this
# much longer.
START_ALLOWANCE_S = 120.0
_STARTED = b"s"  # the worker has unpickled its item and starts on it (a reply is a pickle: never b"s")


def _context() -> _Context:
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    # Import torch and the decoders once in the fork server rather than in every new worker
    # (seconds each); it takes effect when the server first starts.
    context.set_forkserver_preload(["pipeline.data.video"])
    return context


def _worker_main(fn: Callable[[Any], Any], conn: Connection, threads: int | None) -> None:
    """Run fn on each item received, send back ("ok", result) or ("error", reason)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers
    if threads is not None and "torch" in sys.modules:  # fn's module imported torch
        sys.modules["torch"].set_num_threads(threads)
    while True:
        try:
            message = conn.recv_bytes()
            if message == _STOP:
                return
            item = pickle.loads(message)
            conn.send_bytes(_STARTED)
            try:
                reply = pickle.dumps(("ok", fn(item)), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:  # fn's failure (or an unpicklable result) fails this item only
                reply = pickle.dumps(("error", f"{type(exc).__name__}: {exc}"))
            conn.send_bytes(reply)
        except (EOFError, OSError):  # the parent is gone (killed, or stopped by a signal): nothing to report to
            return


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection
    item: Any = None
    busy: bool = False
    since: float = 0.0  # when it was sent its item, then when it said it started on it (for timeout_s)
    started: bool = False

    def deadline(self, timeout_s: float) -> float:
        return self.since + timeout_s + (0.0 if self.started else START_ALLOWANCE_S)


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"worker process died ({name}) while processing this item"
    return f"worker process exited (code {exitcode}) while processing this item"


@contextmanager
def _without_main() -> Iterator[None]:
    """While a worker starts, `__main__` is a blank module.

    forkserver and spawn re-import the parent's main module in a new worker: a script without
    `if __name__ == "__main__":` would run again there (loading its checkpoint, starting workers of
    its own) and the worker would die. Workers run library functions on library objects and need
    nothing from the script, so they start without it, guard or not.
    """
    main = sys.modules.get("__main__")
    if main is None or (getattr(main, "__file__", None) is None and getattr(main, "__spec__", None) is None):
        yield  # an interactive session: nothing to re-import
        return
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _start(ctx: _Context, pool: list[_Worker], fn: Callable[[Any], Any], threads: int | None) -> _Worker:
    """A fresh worker, added to the pool (at first, and in place of one that died)."""
    parent, child = ctx.Pipe(duplex=True)
    process = ctx.Process(target=_worker_main, args=(fn, child, threads), daemon=True)
    with _without_main():
        process.start()
    child.close()
    worker = _Worker(process, parent)
    pool.append(worker)
    return worker


def _retire(pool: list[_Worker], worker: _Worker) -> None:
    """Remove a worker and make sure its process is gone (killed if it still runs)."""
    pool.remove(worker)
    if worker.process.is_alive():
        worker.process.kill()
    worker.process.join()
    worker.conn.close()


def _outcome(worker: _Worker, ready: Container[object], timeout_s: float | None) -> tuple[str, Any] | None:
    """A busy worker's news after `wait`: ("ok" | "error", its reply), ("died", why), or None (still working).

    A reply already in the pipe wins over the process's exit, so a result sent just before dying counts.
    """
    if worker.conn in ready or (worker.process.sentinel in ready and worker.conn.poll()):
        try:
            message = worker.conn.recv_bytes()
        except (EOFError, OSError):  # the pipe closed: the process is dying
            worker.process.join(timeout=10)
            return "died", _death_reason(worker.process.exitcode)
        if message == _STARTED:
            worker.since, worker.started = time.monotonic(), True
            return _outcome(worker, (), timeout_s) if worker.conn.poll() else None
        status, payload = pickle.loads(message)
        return status, payload
    if worker.process.sentinel in ready:
        worker.process.join()
        return "died", _death_reason(worker.process.exitcode)
    if timeout_s is not None and time.monotonic() >= worker.deadline(timeout_s):
        if not worker.started:
            return (
                "died",
                f"the worker did not start within {timeout_s + START_ALLOWANCE_S:g} s; worker process stopped",
            )
        return "died", f"timed out after {timeout_s:g} s; worker process stopped"
    return None


def _shut_down(pool: list[_Worker]) -> None:
    """Ask idle workers to exit (a grace period to do so), kill busy ones: no process outlives the iterator."""
    for worker in list(pool):
        if not worker.busy:
            try:
                worker.conn.send_bytes(_STOP)
            except OSError:
                pass
    for worker in list(pool):
        worker.process.join(timeout=5 if not worker.busy else 0)
        _retire(pool, worker)


def imap_isolated(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    max_in_flight: int | None = None,
    *,
    timeout_s: float | None = TIME_LIMIT_S,
    threads_per_worker: int | None = 1,
) -> Iterator[tuple[T, R | None, str | None]]:
    """Yield (item, result, None) or (item, None, reason) for every item, in completion order.

    fn must be a picklable top-level function; items and results must pickle. At most
    `max_in_flight` items (default: `workers`) are taken from `items` and not yet yielded, so a
    lazy iterable and large results stay bounded. A worker that dies (segfault, os._exit) or runs
    past `timeout_s` on one item is replaced and only that item fails. `threads_per_worker` caps
    torch's intra-op threads in each worker (the processes are the parallelism).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    limit = max(1, max_in_flight if max_in_flight is not None else workers)
    ctx = _context()
    pool: list[_Worker] = []
    waiting: deque[T] = deque()  # taken from items, not yet given to a worker
    source = iter(items)
    exhausted = False
    in_flight = 0
    try:
        while True:
            while not exhausted and in_flight < limit:
                try:
                    waiting.append(next(source))
                    in_flight += 1
                except StopIteration:
                    exhausted = True
            if in_flight == 0:
                return
            idle = [w for w in pool if not w.busy]
            while waiting and (idle or len(pool) < workers):
                worker = idle.pop() if idle else _start(ctx, pool, fn, threads_per_worker)
                worker.item, worker.busy, worker.since = waiting.popleft(), True, time.monotonic()
                worker.started = False
                worker.conn.send_bytes(pickle.dumps(worker.item, protocol=pickle.HIGHEST_PROTOCOL))
            busy = [w for w in pool if w.busy]
            wait_s = None
            if timeout_s is not None:
                wait_s = max(0.0, min(w.deadline(timeout_s) for w in busy) - time.monotonic())
            ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=wait_s))
            for worker in busy:
                outcome = _outcome(worker, ready, timeout_s)
                if outcome is None:
                    continue
                status, payload = outcome
                item = worker.item
                worker.item, worker.busy = None, False
                if status == "died":
                    _retire(pool, worker)
                in_flight -= 1
                if status == "ok":
                    yield item, payload, None
                else:
                    yield item, None, payload
    finally:
        _shut_down(pool)
