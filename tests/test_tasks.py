"""A server's background tasks have an owner (:class:`swarm.p2p.tasks.Tasks`): closing it cancels
and awaits every task still running, a task that fails is logged as it ends, and one started after
the close never runs."""

from __future__ import annotations

import asyncio
import logging

from swarm.p2p.loop import run
from swarm.p2p.tasks import Tasks


def test_close_cancels_and_awaits_the_running_tasks_and_failures_are_logged(caplog):
    log = logging.getLogger("swarm.test.tasks")
    ran = []

    async def forever(name):
        try:
            await asyncio.Event().wait()
        finally:
            ran.append(f"{name} ended")

    async def fails():
        raise RuntimeError("boom")

    async def done():
        ran.append("done")

    async def scenario():
        tasks = Tasks(log)
        a, b = tasks.spawn(forever("a"), "a"), tasks.spawn(forever("b"), "b")
        failed = tasks.spawn(fails(), "fails")
        tasks.spawn(done(), "done")
        await asyncio.wait([failed])
        await asyncio.sleep(0)  # the done callbacks run
        assert len(tasks) == 2
        await tasks.close()
        assert a.cancelled() and b.cancelled() and len(tasks) == 0
        late = tasks.spawn(done(), "late")
        await tasks.close()
        assert late.cancelled()

    with caplog.at_level(logging.ERROR, logger="swarm.test.tasks"):
        run(scenario())
    assert sorted(ran) == ["a ended", "b ended", "done"]  # "late" never ran
    assert [r.getMessage() for r in caplog.records] == ["background task fails failed"]
    assert "boom" in caplog.text
