"""A :class:`~swarm.p2p.chain.RemoteChain` as the engine's synchronous inference session: its
steps run on the client's background loop, and a step may be started and awaited later (so the
caller can draft meanwhile)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import torch

from swarm.p2p.chain import RemoteChain
from swarm.p2p.loop import BackgroundLoop


class PendingStep:
    """A step in flight: calling it waits for the output (at most ``timeout`` seconds, then the
    step is cancelled); ``done()`` says whether it has come, ``arrived`` when (``time.monotonic``)."""

    def __init__(self, future: concurrent.futures.Future, timeout: float):
        self.future, self.timeout = future, timeout
        self.arrived: float | None = None
        future.add_done_callback(self._stamp)

    def _stamp(self, _future) -> None:
        self.arrived = time.monotonic()

    def done(self) -> bool:
        return self.future.done()

    def __call__(self) -> torch.Tensor:
        try:
            return self.future.result(self.timeout)
        except BaseException:
            self.future.cancel()
            raise


class SyncChain:
    """A :class:`RemoteChain` as the engine's synchronous inference session."""

    def __init__(self, background: BackgroundLoop, chain: RemoteChain, timeout: float):
        self.background, self.chain, self.timeout = background, chain, timeout

    def step(self, hidden: torch.Tensor, hypo_ids: torch.Tensor | None = None, per_position: bool = False) -> torch.Tensor:
        return self.background.call(self.chain.step(hidden, hypo_ids, per_position), timeout=self.timeout)

    def rewind(self, position: int) -> None:
        # no I/O (the servers cut their caches at the next step), but on the loop: checks in the
        # background read the chain
        self.background.call(on_loop(self.chain.rewind, position), timeout=self.timeout)

    def settle(self) -> None:
        """Wait for the chain's checks and check what is unchecked (raises Rewound)."""
        self.background.call(self.chain.settle(), timeout=self.timeout)

    def step_async(self, hidden: torch.Tensor, per_position: bool = False) -> PendingStep:
        """Start a step and return at once its :class:`PendingStep` (so the caller can draft
        meanwhile); the wait is bounded as :meth:`step`'s."""
        future = asyncio.run_coroutine_threadsafe(self.chain.step(hidden, None, per_position), self.background.loop)
        return PendingStep(future, self.timeout)

    def close(self) -> None:
        self.background.call(self.chain.close(), timeout=self.timeout)


async def on_loop(function, *args):
    """``function(*args)`` as a coroutine: a plain call run on the loop that owns its objects."""
    return function(*args)
