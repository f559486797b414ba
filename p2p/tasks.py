"""Background tasks with an owner: every task a long-lived object starts (a server's announcement
loop, its sessions' push connections) belongs to a :class:`Tasks` that the object closes when it
stops, so none outlives it, none is cancelled by hand from a list, and none fails unseen.

Not :class:`asyncio.TaskGroup`: a group lives within one ``async with`` block and cancels every
task when one fails, while a server's tasks start in :meth:`~swarm.p2p.server.BlockServer.start`,
end in :meth:`~swarm.p2p.server.BlockServer.stop`, and are independent (a failed bandwidth
measurement must not stop the announcements).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any


class Tasks:
    """The background tasks of one owner. :meth:`spawn` starts one; :meth:`close` cancels those
    still running and waits for them to end. A task that fails is logged (to ``log``) as it ends;
    one spawned after :meth:`close` is cancelled at once."""

    def __init__(self, log: logging.Logger):
        self._log = log
        self._running: set[asyncio.Task] = set()
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._running.add(task)
        task.add_done_callback(self._ended)
        if self._closed:
            task.cancel()
        return task

    def _ended(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    async def close(self) -> None:
        """Cancel the running tasks and wait until each has ended (idempotent)."""
        self._closed = True
        while running := [task for task in self._running if not task.done()]:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    def __len__(self) -> int:
        """Tasks running now."""
        return sum(not task.done() for task in self._running)
