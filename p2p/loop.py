"""The asyncio side of the program: uvloop where installed, and a loop on a thread for sync callers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a fresh loop (uvloop where installed)."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro)


class BackgroundLoop:
    """An event loop on its own daemon thread, so synchronous code (the generation loop) can call
    coroutines with :meth:`call`."""

    def __init__(self):
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="swarm-asyncio", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for it; on ``timeout`` the coroutine is cancelled and
        ``TimeoutError`` raised."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        """Cancel the tasks still on the loop and let them finish (at most a few seconds, as
        ``asyncio.run`` does), then stop the loop. Tasks left pending when the loop stops (a step
        cancelled by Ctrl-C a moment earlier) would be destroyed pending, noisily, at exit."""
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(_cancel_all(), self.loop).result(timeout=5)
            except (TimeoutError, concurrent.futures.CancelledError, RuntimeError):
                pass  # a task that ignores cancellation: stop anyway
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()


async def _cancel_all() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=4)


class MainThreadExecutor(concurrent.futures.Executor):
    """Runs submitted calls on the thread that calls :meth:`run_until` (the process's main thread).

    Why: PyTorch's OpenMP kernels run about twice as slowly when started from a non-main thread
    here (a single-token step of 10 SmolLM2 blocks: 5.2 ms on the main thread, 9.5–10 ms on a
    worker thread), so a server computes on its main thread and runs its event loop elsewhere.
    """

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._shutdown = False

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        if self._shutdown:
            raise RuntimeError("executor is shut down")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((future, fn, args, kwargs))
        return future

    def wake(self) -> None:
        self._queue.put(None)

    def run_until(self, done: Callable[[], bool], poll: float = 0.5) -> None:
        """Run queued calls until ``done()`` is true (checked after each call and every ``poll`` s)."""
        while not done():
            try:
                item = self._queue.get(timeout=poll)
            except queue.Empty:
                continue
            if item is None:
                continue
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to the awaiting coroutine
                future.set_exception(exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        self.wake()
