"""A trio thread bridged to one asyncio loop.

py-libp2p runs only on trio, the rest of the program on asyncio (uvloop where installed), and
trio-asyncio cannot drive uvloop. So the trio side lives in ``trio.run`` on a daemon thread of its own
and the two loops exchange work without ever blocking each other:

* asyncio → trio (:meth:`TrioThread.call`): ``TrioToken.run_sync_soon`` starts a task in a long-lived
  nursery; the task resolves an asyncio future through ``loop.call_soon_threadsafe``. About 0.1 ms a
  round trip; each call runs in its own ``trio.CancelScope`` so a timeout or a cancelled asyncio
  task cancels the trio work too.
* trio → asyncio (:meth:`TrioThread.run_in_asyncio`): ``asyncio.run_coroutine_threadsafe``; the trio
  task sleeps on a ``trio.Event`` set from the future's done-callback; cancelling the trio task
  cancels the asyncio one.

Whatever happens on the trio side, an awaiting asyncio caller gets a result or an exception:
``P2PTimeoutError`` when its timeout expires, ``P2PError`` once the thread is stopping or gone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import trio

log = logging.getLogger(__name__)

T = TypeVar("T")


class P2PError(Exception):
    """Base of every error the p2p layer raises."""


class P2PTimeoutError(P2PError, TimeoutError):
    """An operation exceeded its timeout (the trio-side work has been cancelled)."""


def _resolve(fut: asyncio.Future, result: Any, exc: BaseException | None, orphan: Callable[[Any], None] | None):
    # runs on the asyncio loop
    if fut.done():  # the caller was cancelled meanwhile
        if exc is None and orphan is not None:
            try:
                orphan(result)
            except Exception as error:  # e.g. the host closed meanwhile: nothing left to release
                log.debug("releasing an orphaned result failed: %r", error)
    elif exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class _Call:
    __slots__ = ("args", "cancelled", "fn", "fut", "orphan", "scope", "timeout", "what")

    def __init__(self, fn, args, fut, timeout, what, orphan):
        self.fn, self.args, self.fut, self.timeout, self.what, self.orphan = fn, args, fut, timeout, what, orphan
        self.scope: trio.CancelScope | None = None
        self.cancelled = False

    def cancel(self) -> None:  # trio thread, via run_sync_soon; must not raise
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()


class TrioThread:
    """``trio.run`` on a daemon thread, serving calls from the asyncio loop that started it.

    :meth:`start` enters an async context manager on the trio side (the libp2p host and its
    services) and keeps it entered until :meth:`close`. Calls run in a nursery *inside* that context,
    so on close they are cancelled first (their callers get ``P2PError``) and the context exits after.
    """

    def __init__(self, name: str):
        self.name = name
        self.in_flight = 0  # trio tasks started by call(); read by tests to see cancellation land
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._stop_requested = False
        self._running = False  # started successfully
        self._thread: threading.Thread | None = None
        self._finished: asyncio.Future | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    # ---- lifetime ---------------------------------------------------------------------------

    async def start(self, context: Callable[[], AbstractAsyncContextManager[T]], timeout: float) -> T:
        """Start the thread, enter ``context()`` there and return what it yields.

        Raises whatever entering the context raised (the thread is then gone), or
        ``P2PTimeoutError`` after ``timeout`` seconds (the thread is stopped).
        """
        loop = self._loop = asyncio.get_running_loop()
        started = loop.create_future()
        self._finished = loop.create_future()
        self._thread = threading.Thread(target=self._thread_main, args=(context, started), name=self.name, daemon=True)
        self._thread.start()
        try:
            return await asyncio.wait_for(asyncio.shield(started), timeout)
        except BaseException as exc:
            started.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody will read it now
            await self.close()
            if isinstance(exc, asyncio.TimeoutError):
                raise P2PTimeoutError(f"{self.name}: not started within {timeout:g} s") from None
            raise

    def _thread_main(self, context, started) -> None:
        try:
            trio.run(self._trio_main, context, started)
        except BaseException as exc:  # a failed start, or a crash of the libp2p services
            self._settle(started, None, exc)  # a no-op if start() already returned
            if self._running and not self._stop_requested:  # else start() or close() reports it
                log.warning("%s: trio run ended with %r", self.name, exc)
            else:
                log.debug("%s: trio run ended with %r", self.name, exc)
        finally:
            self._settle(self._finished, None, None)

    async def _trio_main(self, context, started) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with context() as value, trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._stop_requested:
                self._stop.set()
            self._running = True
            self._settle(started, value, None)
            await self._stop.wait()
            self._nursery = None  # calls submitted from now on are refused
            nursery.cancel_scope.cancel()

    async def close(self, timeout: float = 15.0) -> None:
        """Stop the trio side (in-flight calls get ``P2PError``) and join the thread. Idempotent.
        Should the trio side not finish within ``timeout`` seconds, a warning is logged and the
        (daemon) thread left behind rather than hanging the caller."""
        if self._thread is None:
            return
        self._stop_requested = True
        token = self._token
        if token is not None:
            try:
                token.run_sync_soon(self._request_stop)
            except trio.RunFinishedError:
                pass
        assert self._finished is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._finished), timeout)
        except asyncio.TimeoutError:
            log.warning("%s: the trio thread did not stop within %g s; leaving it behind", self.name, timeout)
            return
        self._thread.join()

    def _request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    # ---- asyncio -> trio --------------------------------------------------------------------

    async def call(
        self,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        timeout: float | None,
        what: str,
        orphan: Callable[[T], None] | None = None,
    ) -> T:
        """Run ``await fn(*args)`` on the trio thread and return its result here.

        ``what`` names the operation in error messages. Raises what ``fn`` raised,
        ``P2PTimeoutError`` after ``timeout`` seconds, ``P2PError`` if the thread is closing. If the
        calling task is cancelled the trio task is cancelled too; should ``fn`` have finished anyway,
        ``orphan(result)`` is called on this loop so the result (a stream, say) can be released.
        """
        fut = self.loop.create_future()
        call = _Call(fn, args, fut, timeout, what, orphan)
        self._submit(self._spawn, call, what=what)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # the result arrived, but this task was cancelled before it resumed: release it
                if fut.exception() is None and orphan is not None:
                    try:
                        orphan(fut.result())
                    except Exception as error:
                        log.debug("releasing an orphaned result failed: %r", error)
                raise
            try:
                self._token.run_sync_soon(call.cancel)
            except trio.RunFinishedError:
                pass
            raise

    def run_soon(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` (synchronous) on the trio thread soon, in order with :meth:`call`."""
        self._submit(self._guarded, fn, args, what=getattr(fn, "__name__", "call"))

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        """Start ``fn(*args)`` as a fire-and-forget task on the trio side; errors are logged."""
        self.run_soon(self._spawn_detached, fn, args)

    def _submit(self, sync_fn, *args, what: str) -> None:
        if self._token is None:
            raise P2PError(f"{what}: host is not running")
        try:
            self._token.run_sync_soon(sync_fn, *args)
        except trio.RunFinishedError:
            raise P2PError(f"{what}: host is closed") from None

    def _guarded(self, fn, args) -> None:  # trio thread; an exception here would crash trio.run
        try:
            fn(*args)
        except Exception:
            log.exception("%s: %r failed", self.name, fn)

    def start_here(self, fn: Callable[..., Awaitable[object]], *args: Any) -> bool:
        """On the trio thread: start ``fn(*args)`` as a background task of the thread's nursery
        (which owns it: cancelled and awaited when the thread stops); errors are logged. False
        when the thread is stopping (nothing started)."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(self._detached, fn, args)
        return True

    def _spawn_detached(self, fn, args) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._detached, fn, args)

    async def _detached(self, fn, args) -> None:
        try:
            await fn(*args)
        except Exception:
            log.exception("%s: background %r failed", self.name, fn)

    def _spawn(self, call: _Call) -> None:  # trio thread
        if self._nursery is None:
            self._settle(call.fut, None, P2PError(f"{call.what}: host is closed"))
        else:
            self._nursery.start_soon(self._run_call, call)

    async def _run_call(self, call: _Call) -> None:
        self.in_flight += 1
        result, error = None, P2PError(f"{call.what}: host is closed")  # unless fn ends on its own
        try:
            with trio.CancelScope() as scope:
                call.scope = scope
                if call.cancelled:
                    scope.cancel()
                if call.timeout is not None:
                    scope.deadline = trio.current_time() + call.timeout
                try:
                    result, error = await call.fn(*call.args), None
                except Exception as exc:
                    error = exc
            if scope.cancel_called and (error is not None or scope.cancelled_caught):
                # our own scope fired: a timeout or a cancelled caller, whatever fn made of it
                error = (
                    P2PError(f"{call.what}: cancelled")
                    if call.cancelled
                    else P2PTimeoutError(f"{call.what}: timed out after {call.timeout:g} s")
                )
        finally:
            self.in_flight -= 1  # before settling, so a caller that sees the result sees the count
            self._settle(call.fut, result, error, call.orphan)

    def _settle(self, fut, result, exc, orphan=None) -> None:
        try:
            self.loop.call_soon_threadsafe(_resolve, fut, result, exc, orphan)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    # ---- trio -> asyncio --------------------------------------------------------------------

    def to_asyncio(self, fn: Callable[..., object], *args: Any) -> None:
        """Call ``fn(*args)`` on the asyncio loop soon (from the trio thread); dropped if it is closed."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass

    async def run_in_asyncio(self, coro: Coroutine[Any, Any, T]) -> T:
        """From the trio thread: run ``coro`` on the asyncio loop and wait without blocking trio.

        Cancelling the waiting trio task cancels the asyncio task. Raises what the coroutine raised,
        or ``P2PError`` if the loop is closed or the asyncio task was cancelled by someone else.
        """
        try:
            cf = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:
            coro.close()
            raise P2PError("the asyncio loop is closed") from None
        try:
            return await wait_future(cf)  # cancelling this task cancels the asyncio one
        except concurrent.futures.CancelledError:
            raise P2PError("cancelled on the asyncio side") from None


async def wait_future(future: concurrent.futures.Future) -> Any:
    """From a trio task: the result of ``future`` (set on another thread, e.g. the compute
    thread's), waiting without blocking trio. Cancelling the task cancels the future if its work
    has not started."""
    done = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def wake(_) -> None:
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    future.add_done_callback(wake)
    try:
        await done.wait()
    except BaseException:
        future.cancel()
        raise
    return future.result()
