"""What a server computes next, and which sessions' steps it computes together.

Every computation of a server (inference steps, training's forward and backward passes, a
throughput measurement) goes through one :class:`ComputeQueue` onto the single compute thread.
The queue decides with :func:`pick`, a pure function over what waits:

- **Interactive first.** Inference steps (``"step"``) go before training passes (``"pass"``), as a
  person waits on a token and nobody on a gradient step by the millisecond.
- **Fair by peer.** Within a class, peers take turns (round robin, starting after the peer served
  last), each peer's work in the order it came; a peer with sixty sessions waiting gets one turn
  per round like a peer with one.
- **Batched.** The first work in that order, when it is a batchable step (a session of batch 1,
  no adapter, at most a prefill chunk of positions), takes along the other batchable steps of the
  same blocks in the same fair order, up to ``max_batch`` sessions and ``max_positions``
  positions: one pass runs them all (:meth:`~swarm.engine.checkpoint.BlockRange.run_batch`),
  each session's output bit-identical to its step alone. Taken in the peers' turns, a batch
  gives each peer an equal share of its sessions, and a peer more only of what others leave: a
  peer that opened sixty sessions cannot push out another's step.
- **Steps inside long passes.** A training pass (thousands of positions, seconds) calls
  :meth:`ComputeQueue.between` before each of its blocks' forward and backward: the steps that
  wait then run (one pick of them) with the pass's adapter taken off the blocks, so a person's
  next token waits for one block of someone's backward, not all of it. Hence, when the oldest
  pass has waited :data:`PASS_PATIENCE` behind steps, passes go first (in their own turns):
  steady inference cannot starve training.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from swarm.p2p import hop_trace

class BatchStep(NamedTuple):
    """A batchable step (:attr:`Work.batch`): run on ``kv`` by ``blocks.run_batch`` with other
    sessions' steps; ``per_position``: a speculative verification (see
    :meth:`~swarm.engine.checkpoint.BlockRange.run_batch`); ``rewind_to``: the session's cache is
    cut back to that many positions first (the client discarded drafted tokens)."""

    blocks: object
    hidden: torch.Tensor
    kv: object
    should_stop: Callable[[], bool]
    per_position: bool = False
    rewind_to: int | None = None


KINDS = ("step", "pass")  # in the order they are served; "pass": training passes and the server's own work
PASS_PATIENCE = 2.0  # seconds a pass waits behind steps at most before it goes first (see fair_order)


@dataclass(eq=False)
class Work:
    """One computation waiting for the compute thread. ``batch_key`` and ``batch``: for a
    batchable step, the blocks' identity (steps batch only with steps of the same blocks) and a
    :class:`BatchStep` (or a tuple of its fields); None for a call ``fn(*args)``."""

    peer: str
    kind: str
    positions: int = 0
    fn: Callable | None = None
    args: tuple = ()
    batch_key: object = None
    batch: tuple | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    queued: float = field(default_factory=time.monotonic)


def fair_order(waiting: Sequence[Work], last: Mapping[str, str] | None, now: float | None = None) -> list[Work]:
    """``waiting`` in the order it would be served: the first class of :data:`KINDS` with work,
    its peers in turns (the first peer after ``last[kind]``, the peer of that kind served last,
    in order of their first work, then on, wrapping), one work per peer per round,
    each peer's work in arrival order. At time ``now`` (``time.monotonic``), while steps wait
    and the oldest pass has waited :data:`PASS_PATIENCE` or more, the passes go first (in their
    own turns), so steady inference cannot starve training: the steps that wait run between a
    pass's blocks anyway."""
    classes = {kind: [w for w in waiting if w.kind == kind] for kind in KINDS}
    kinds = list(KINDS)
    passes = classes["pass"]
    if now is not None and classes["step"] and passes and now - min(w.queued for w in passes) >= PASS_PATIENCE:
        kinds = ["pass", "step"]
    for kind in kinds:
        if classes[kind]:
            return _turns(classes[kind], (last or {}).get(kind))
    return []


def _turns(works: Sequence[Work], after_peer: str | None) -> list[Work]:
    by_peer: dict[str, deque] = {}
    for work in works:
        by_peer.setdefault(work.peer, deque()).append(work)
    peers = list(by_peer)
    if after_peer in by_peer:
        turn = peers.index(after_peer) + 1
        peers = peers[turn:] + peers[:turn]
    order = []
    while by_peer:
        for peer in peers:
            queue = by_peer.get(peer)
            if queue:
                order.append(queue.popleft())
                if not queue:
                    del by_peer[peer]
    return order


def pick(
    waiting: Sequence[Work], last: Mapping[str, str] | None, max_batch: int, max_positions: int,
    now: float | None = None,
) -> list[Work]:
    """The work to run next (see the module's docstring): one call, or batchable steps to run
    as one pass (the first of them the one whose turn it is). Empty when nothing waits.
    ``last`` and ``now``: see :func:`fair_order`."""
    order = fair_order(waiting, last, now)
    if not order:
        return []
    first = order[0]
    if first.batch is None or max_batch <= 1:
        return [first]
    chosen, positions = [first], first.positions
    for work in order[1:]:  # peers in turns: a peer gets more than others only of what they leave
        if len(chosen) >= max_batch:
            break
        if work.batch is not None and work.batch_key == first.batch_key and positions + work.positions <= max_positions:
            chosen.append(work)
            positions += work.positions
    return chosen


class ComputeQueue:
    """The server's compute thread, fed in :func:`pick`'s order (thread-safe; awaited from the
    event loop through the futures :meth:`submit` returns).

    ``executor`` runs the queue's drain (one thread: PyTorch computes there). ``max_batch``:
    sessions per batched pass (1: every step alone). Counts what it ran, for the announcements
    and `swarm status`: ``passes``, ``batched_steps`` (steps run in passes of more than one),
    ``steps`` and the recent mean batch size."""

    def __init__(self, executor: concurrent.futures.Executor, max_batch: int, max_positions: int):
        self._executor = executor
        self.max_batch, self.max_positions = max_batch, max_positions
        self._lock = threading.Lock()
        self._waiting: list[Work] = []
        self._draining = False
        self._last_peer: dict[str, str] = {}  # per kind: the peer served last
        self.steps = self.passes = self.batched_steps = 0
        self.interleaved = 0  # times steps ran inside a long pass (see between)
        self.occupancy = 1.0  # the recent mean number of sessions per batched pass (moving average)

    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def submit(self, work: Work) -> concurrent.futures.Future:
        with self._lock:
            self._waiting.append(work)
            if self._draining:
                return work.future
            self._draining = True
        try:
            self._schedule_drain()
        except RuntimeError as exc:  # the executor is shut down: the server is stopping
            with self._lock:
                self._draining = False
                self._waiting.remove(work)
            work.future.set_exception(exc)
        return work.future

    def _drain(self) -> None:
        """On the compute thread: run the next work, then hand the thread back to its executor
        with another drain queued while work waits (so the executor's owner sees between passes,
        e.g. a server's main thread noticing a stop request while clients keep stepping)."""
        with self._lock:
            self._waiting = [w for w in self._waiting if not w.future.cancelled()]
            chosen = self._take(self._waiting, time.monotonic())
        try:
            self._run(chosen)
        finally:
            with self._lock:
                more = bool(self._waiting)
                self._draining = more
            if more:
                try:
                    self._schedule_drain()
                except RuntimeError:  # shut down: fail what waits, nobody will run it
                    self.fail_waiting()

    def _schedule_drain(self) -> None:
        """Queue a drain on the executor; should a shutdown cancel it before it runs, what waits
        fails at once instead of staying pending (raises ``RuntimeError`` if already shut down)."""
        self._executor.submit(self._drain).add_done_callback(lambda f: f.cancelled() and self.fail_waiting())

    def fail_waiting(self) -> None:
        """Fail every work still waiting (the executor was shut down: a drain it cancelled or
        refused will not run them)."""
        with self._lock:
            waiting, self._waiting, self._draining = self._waiting, [], False
        for work in waiting:
            if work.future.set_running_or_notify_cancel():
                work.future.set_exception(RuntimeError("the server is stopping"))

    def between(self, suspend: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        """On the compute thread, inside a running pass (before one of its blocks): run the
        steps that wait, one :func:`pick` of them, under ``suspend()`` (which takes what the pass
        lent the blocks off them, e.g. :func:`swarm.engine.adapters.suspended`)."""
        with self._lock:
            chosen = self._take([w for w in self._waiting if w.kind == "step" and not w.future.cancelled()])
        if chosen:
            self.interleaved += 1
            with suspend(), torch.no_grad():
                self._run(chosen)

    def _take(self, candidates: list[Work], now: float | None = None) -> list[Work]:
        """Under the lock: :func:`pick` among ``candidates``, taken off the queue, their peer's
        turn noted."""
        chosen = pick(candidates, self._last_peer, self.max_batch, self.max_positions, now)
        for work in chosen:
            self._waiting.remove(work)
        if chosen:
            self._last_peer[chosen[0].kind] = chosen[0].peer
        return chosen

    def _run(self, chosen: list[Work]) -> None:
        chosen = [w for w in chosen if w.future.set_running_or_notify_cancel()]
        if chosen and chosen[0].batch is None:
            _run_call(chosen[0])
        elif chosen:
            self._run_batch(chosen)

    def _run_batch(self, chosen: list[Work]) -> None:
        ready, steps = [], []
        for work in chosen:  # a step that cannot run fails alone, before the pass
            step = BatchStep(*work.batch)
            try:
                if step.rewind_to is not None:
                    step.kv.rewind(step.rewind_to)
                step.blocks.check_batch_step(step.hidden, step.kv)
            except BaseException as exc:
                work.future.set_exception(exc)
            else:
                ready.append(work)
                steps.append(step)
        if not ready:
            return
        hop_trace.mark("started")  # a step's compute, for the benchmarks (with "done" below)
        blocks = steps[0].blocks
        stops = [s.should_stop for s in steps]
        try:
            with torch.no_grad():
                outputs = blocks.run_batch(
                    [(s.hidden, s.kv) for s in steps], lambda: all(s() for s in stops), [s.per_position for s in steps]
                )
        except BaseException as exc:  # handed to every awaiting step
            for work in ready:
                work.future.set_exception(exc)
            return
        self.steps += len(ready)
        self.passes += 1
        if len(ready) > 1:
            self.batched_steps += len(ready)
        self.occupancy = 0.9 * self.occupancy + 0.1 * len(ready)
        hop_trace.mark("done")
        for work, output in zip(ready, outputs):
            work.future.set_result((output, True))


def _run_call(work: Work) -> None:
    try:
        work.future.set_result(work.fn(*work.args))
    except BaseException as exc:  # handed to the awaiting coroutine
        work.future.set_exception(exc)
