"""``--workers N``: a relay's channels spread over N event loops, each in a thread.

One event loop moves every byte of every channel it runs, so one core capped a whole
relay. With more than one worker, the main loop keeps everything the channels share
and each channel runs on a worker loop of its own thread:

* **The main loop** accepts connections, admits them, decides (sessions, quotas,
  channel order, the destination's unix connect), counts (metrics, bytes) and stops the
  relay. Everything shared lives there and is touched only there.
* **A worker loop** owns a connection's transports from the moment it is wrapped in
  one: the TLS handshake, the HTTP upgrade, the `~migrelay.aio.channel.Channel` and its
  timers. A TLS connection cannot change loops after its handshake, so the main loop
  hands over raw sockets (`SocketHandoff`), never transports.
* They talk by hops only: `call_on` (a callback on the other loop, in order: two hops
  from one thread run in the order they were made) and `run_on` (a coroutine on the
  other loop, awaited from this one). No asyncio future or event of one loop is ever
  awaited on another.

A channel goes to the worker with the fewest connections (in handshake or relaying:
the channels of a multifd migration arrive together, before any of them is a channel).

With one worker (``--workers 1``) there is no thread: the one `Worker` is the main
loop, `call_on` calls at once and `run_on` awaits the coroutine itself, so the relay
runs as it always did.

Workers scale with cores as far as a channel's byte-moving steps (socket reads and
writes in the loop's C code, masking in ``_speedups.c``) run without the GIL. What still
needs it is short, but a loop waiting for the GIL waits up to the interpreter's switch
interval each time: at 5 ms (Python's default) a main loop busy with many small events
(a flood of connections) next to a worker busy with Python code fell seconds behind, and
a migration's upgrade timed out. While worker threads run, the switch interval is
`SWITCH_INTERVAL_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Final, ParamSpec, TypeVar

from migrelay.aio.channel import Channel

__all__ = [
    "DEFAULT_MAX_WORKERS",
    "DESCRIPTORS_PER_WORKER",
    "SocketHandoff",
    "Worker",
    "WorkerPool",
    "abort_channel",
    "call_on",
    "close_channel",
    "default_workers",
    "resolve_workers",
    "run_on",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

#: ``--workers 0`` (the default): one worker per available CPU, at most this many. A
#: migration has 1 main channel, QEMU's 2 multifd channels by default (4 is common)
#: and maybe a postcopy-preempt one: 4 workers run 4 channels on 4 cores; beyond that
#: only several migrations at once gain, and both QEMUs need cores too.
DEFAULT_MAX_WORKERS: Final = 4
#: Descriptors one worker loop holds (its epoll and wake-up descriptors), for the
#: descriptor budget of ``serve``.
DESCRIPTORS_PER_WORKER: Final = 4
#: Event loop iterations a stopping worker runs after cancelling what was left, so that
#: transports closed by then deliver their connection_lost().
_DRAIN_ITERATIONS: Final = 5
#: The interpreter's switch interval (`sys.setswitchinterval`) while worker threads run:
#: the longest a thread that wants the GIL waits for one that runs Python code. Measured
#: (``tests/e2e/test_soak.py``: a migration through a serve under attack, 2 workers, 2
#: cores): at Python's 5 ms the migration's upgrade timed out (10 s) in 2 runs of 7 and
#: the test took 7-20 s; at 1 ms it passed 7 of 7 in 7-8 s, as with one loop.
SWITCH_INTERVAL_S: Final = 0.001


class _SwitchInterval:
    """Lowers the switch interval while any pool's threads run; restores it after."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools = 0
        self._saved = 0.0

    def acquire(self) -> None:
        with self._lock:
            if self._pools == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, SWITCH_INTERVAL_S))
            self._pools += 1

    def release(self) -> None:
        with self._lock:
            self._pools -= 1
            if self._pools == 0:
                sys.setswitchinterval(self._saved)


_switch_interval = _SwitchInterval()


def default_workers() -> int:
    """The CPUs this process may run on (its affinity), at most `DEFAULT_MAX_WORKERS`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, DEFAULT_MAX_WORKERS))


def resolve_workers(count: int) -> int:
    """``--workers``: 0 means `default_workers`; any other count is taken as given.

    Raises:
        ValueError: ``count`` is negative.
    """
    if count < 0:
        raise ValueError(f"workers must be 0 (automatic) or more, not {count}")
    return count or default_workers()


def call_on(loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: Any) -> None:
    """Run ``callback(*args)`` on ``loop``: at once when it is the running loop, else as
    soon as ``loop`` gets to it. Hops from one thread to one loop keep their order."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        callback(*args)
    else:
        loop.call_soon_threadsafe(callback, *args)


async def run_on(
    loop: asyncio.AbstractEventLoop,
    function: Callable[P, Coroutine[Any, Any, T]],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """Run ``function(*args, **kwargs)`` as a task on ``loop``; return its outcome here.

    When ``loop`` is the running loop, the coroutine is simply awaited. Otherwise it is
    made and run on ``loop`` (never made when the caller is cancelled first), and
    cancelling the caller cancels it there; the caller waits for it to end before it
    raises CancelledError. So once this returns or raises, whatever the coroutine told
    the caller's loop (`call_on`) has been done, and whatever it was handed is no
    longer in use.
    """
    here = asyncio.get_running_loop()
    if loop is here:
        return await function(*args, **kwargs)
    outcome: asyncio.Future[T] = here.create_future()
    remote: list[asyncio.Task[T]] = []

    def settle(task: asyncio.Task[T]) -> None:  # on the caller's loop
        if outcome.done():
            return
        if task.cancelled():
            outcome.cancel()
        elif (error := task.exception()) is not None:
            outcome.set_exception(error)
        else:
            outcome.set_result(task.result())

    def begin() -> None:  # on ``loop``
        task = loop.create_task(function(*args, **kwargs))
        remote.append(task)
        task.add_done_callback(lambda done: here.call_soon_threadsafe(settle, done))

    def cancel() -> None:  # on ``loop``, after begin(): hops keep their order
        remote[0].cancel()

    loop.call_soon_threadsafe(begin)
    try:
        return await asyncio.shield(outcome)
    except asyncio.CancelledError:
        if not outcome.done():
            loop.call_soon_threadsafe(cancel)
        while not outcome.done():
            # The caller goes on only once the task has ended, cancelled again or not.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(outcome)
        if not outcome.cancelled():
            outcome.exception()  # retrieved: the caller was cancelled, the outcome is moot
        raise


def close_channel(channel: Channel, code: int, reason: str) -> None:
    """`Channel.close` on the channel's own loop, unless it has ended meanwhile."""
    call_on(channel._loop, _close_if_open, channel, code, reason)


def abort_channel(channel: Channel, reason: str) -> None:
    """`Channel.abort` on the channel's own loop, unless it has ended meanwhile."""
    call_on(channel._loop, _abort_if_open, channel, reason)


def _close_if_open(channel: Channel, code: int, reason: str) -> None:
    if channel.ended is None:
        channel.close(code, reason)


def _abort_if_open(channel: Channel, reason: str) -> None:
    if channel.ended is None:
        channel.abort(reason)


class SocketHandoff:
    """A connected socket on its way from the main loop to a worker.

    The worker `take`\\ s it (and from then on its transport owns it); whoever handed it
    over `close`\\ s it once the worker is done with it, which closes it only if the
    worker never took it (cancelled before it started).
    """

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = [sock]

    def take(self) -> socket.socket:
        """The socket, once. Raises RuntimeError when it was taken or closed already."""
        try:
            return self._sock.pop()
        except IndexError:
            raise RuntimeError("socket handed over twice") from None

    def close(self) -> bool:
        """Close the socket unless it was taken; return whether it was closed here."""
        try:
            sock = self._sock.pop()
        except IndexError:
            return False
        sock.close()
        return True


class Worker:
    """One event loop that runs channels: a worker thread's, or the main loop itself.

    ``load`` and ``channels`` are kept by the main loop alone.
    """

    __slots__ = ("channels", "index", "load", "loop", "thread")

    def __init__(
        self, index: int, loop: asyncio.AbstractEventLoop, thread: threading.Thread | None
    ) -> None:
        self.index = index
        self.loop = loop
        #: None for the main loop (``--workers 1``).
        self.thread = thread
        #: Connections assigned to it and not ended: in handshake, opening, or channels.
        self.load = 0
        #: Open channels.
        self.channels = 0

    def __repr__(self) -> str:
        return f"<Worker {self.index} load={self.load} channels={self.channels}>"


class WorkerPool:
    """The event loops a relay's channels run on (`start` it on the main loop).

    Args:
        count: how many (``--workers``, resolved: see `resolve_workers`). With 1 the
            only worker is the main loop and no thread is started.
    """

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError(f"a worker pool needs at least one worker, not {count}")
        self.count = count
        self.workers: list[Worker] = []
        self._main: asyncio.AbstractEventLoop | None = None
        #: Set (on the main loop) by each worker thread as its last act.
        self._stopped: dict[Worker, asyncio.Future[None]] = {}
        self._stopping = False
        self._next = 0

    @property
    def threaded(self) -> bool:
        """Whether the channels run in worker threads (more than one worker)."""
        return self.count > 1

    @property
    def active(self) -> bool:
        """Whether its loops take work: started, and not stopping or stopped."""
        return self._main is not None and not self._stopping

    @property
    def main_loop(self) -> asyncio.AbstractEventLoop:
        """The loop that started the pool: the owner of everything shared."""
        if self._main is None:
            raise RuntimeError("the worker pool was not started")
        return self._main

    def start(self) -> None:
        """Start the worker threads (none for one worker). Call it on the main loop.

        Raises:
            RuntimeError: a thread cannot be started (the ones started are stopped).
        """
        main = self._main = asyncio.get_running_loop()
        if not self.threaded:
            self.workers = [Worker(0, main, None)]
            return
        _switch_interval.acquire()
        try:
            for index in range(self.count):
                worker = Worker(index, _new_loop_like(main), None)
                self.workers.append(worker)
                worker.thread = threading.Thread(
                    target=self._serve,
                    args=(worker,),
                    name=f"migrelay-worker-{index}",
                    daemon=True,
                )
                worker.thread.start()
        except BaseException:
            for worker in self.workers:
                if worker.thread is not None and worker.thread.is_alive():
                    worker.loop.call_soon_threadsafe(worker.loop.stop)
                    worker.thread.join(1.0)
                elif not worker.loop.is_closed():
                    worker.loop.close()
            self.workers = []
            self._main = None
            _switch_interval.release()
            raise
        logger.debug("%d worker threads run the channels", self.count)

    def pick(self) -> Worker:
        """The worker for a new connection: the least loaded; ties take turns."""
        workers = self.workers
        count = len(workers)
        chosen = min(
            workers, key=lambda worker: (worker.load, (worker.index - self._next) % count)
        )
        self._next = (chosen.index + 1) % count
        return chosen

    async def stop(self, timeout_s: float) -> None:
        """Stop the worker loops and join their threads (nothing to do for one worker).

        Whatever still runs on a worker is cancelled first; its transports are closed
        before the loop is. Each thread gets up to ``timeout_s`` seconds.
        """
        main = self._main
        if main is None or self._stopping:
            return
        self._stopping = True
        if not self.threaded:
            return
        waits: list[asyncio.Future[None]] = []
        for worker in self.workers:
            thread = worker.thread
            if thread is None or not thread.is_alive():
                continue
            stopped = self._stopped[worker] = main.create_future()
            waits.append(stopped)
            worker.loop.call_soon_threadsafe(worker.loop.stop)
        if waits:
            await asyncio.wait(waits, timeout=timeout_s)
        for worker in self.workers:
            thread = worker.thread
            if thread is None:
                continue
            # It has signalled its end (or ran out of time): this is a short wait.
            thread.join(0 if not thread.is_alive() else 1.0)
            if thread.is_alive():
                logger.warning("worker thread %s did not stop within %g s", thread.name, timeout_s)
        _switch_interval.release()

    # -- in the worker thread ------------------------------------------------------------

    def _serve(self, worker: Worker) -> None:
        """A worker thread: its loop runs until `stop`, then ends what is left and closes."""
        _name_os_thread(f"migrelay-w{worker.index}")
        loop = worker.loop
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(self._forward)
        try:
            loop.run_forever()
        finally:
            try:
                self._finish(worker)
            finally:
                asyncio.set_event_loop(None)
                loop.close()
                stopped = self._stopped.get(worker)
                if stopped is not None:
                    with contextlib.suppress(RuntimeError):  # the main loop has closed
                        self.main_loop.call_soon_threadsafe(_set_done, stopped)

    def _finish(self, worker: Worker) -> None:
        loop = worker.loop
        left = asyncio.all_tasks(loop)
        for task in left:
            # A relay ends its tasks before it stops the pool: one left is a bug.
            self._forward(loop, {"message": f"task left running on a worker: {task!r}"})
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        for _ in range(_DRAIN_ITERATIONS):
            loop.run_until_complete(asyncio.sleep(0))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())

    def _forward(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """A worker loop's exception handler: report to the main loop's (one place to
        look, and the one tests check), or log here when the main loop has closed."""
        context = {**context, "message": f"{threading.current_thread().name}: "
                   f"{context.get('message', 'error')}"}  # fmt: skip
        main = self.main_loop
        try:
            main.call_soon_threadsafe(main.call_exception_handler, context)
        except RuntimeError:
            loop.default_exception_handler(context)


def _name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` (at most 15 bytes) in the kernel's view, so that
    ``top -H``, ``ps -L`` and ``/proc/PID/task/TID/comm`` (the relay bench's per-worker
    CPU) tell the workers apart. Best effort: Linux only."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


#: prctl(2)'s option that names the calling thread.
_PR_SET_NAME: Final = 15


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _new_loop_like(loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
    """A new event loop of ``loop``'s kind: uvloop for uvloop, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    if isinstance(loop, uvloop.Loop):
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()
