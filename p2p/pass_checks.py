"""Spot checks of fine-tuning's passes (the training half of :mod:`swarm.p2p.checking`).

:class:`~swarm.p2p.remote_blocks.RemoteBlocks` sends each span a stateless forward or backward
request. When the client's policy (:class:`~swarm.p2p.verify.VerifyPolicy`) says a pass is due
for a check, the same request goes at the same time to other servers of the same blocks (the
*checker*), and the two results are compared: a forward's outputs as inference's are
(:func:`~swarm.p2p.verify.disagreement`), a backward's gradient with respect to the input and
its adapter gradients by :func:`~swarm.p2p.verify.relative_error`, within the two sides'
tolerance (:func:`~swarm.p2p.verify.grad_tolerance` for gradients: quantized weights change them
far more than outputs, and nf4's cannot be checked at all). A check of a training pass always
blocks: its result feeds the optimizer at once.

On a disagreement a third opinion decides (yet other servers, else this machine's own float32
copy of the blocks, from the checkpoint). The liar is banned (the ledger, as in inference) and
the pass goes on with the honest result, so a liar caught on a checked pass changes nothing.
A liar whose earlier passes went unchecked may already have taught the adapter something wrong,
and that cannot be undone: the training stops with :class:`PoisonedTraining`, naming it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from swarm.engine.adapters import span_tensors
from swarm.p2p.chain import SwarmError, _short
from swarm.p2p.checking import Dispute, announced, convict
from swarm.p2p.routing import NoRouteError, Span
from swarm.p2p.verify import (
    MAX_PENDING_PASSES,
    Precision,
    blame,
    disagreement,
    grad_tolerance,
    relative_error,
    tolerance,
    worst,
)

if TYPE_CHECKING:
    from swarm.engine.checkpoint import Checkpoint
    from swarm.p2p.remote_blocks import RemoteBlocks, _Pass

log = logging.getLogger("swarm.remote_blocks")


class PoisonedTraining(SwarmError):
    """A server was caught lying after passes through it that were not checked: the adapter
    may have learned from wrong results, so the training cannot go on as if nothing happened."""


class PassChecks:
    """The checks of one :class:`~swarm.p2p.remote_blocks.RemoteBlocks`' passes (see the module's
    docstring). ``checkpoint``: where this machine loads its own copy of blocks for a third
    opinion (None: only other servers give one)."""

    def __init__(self, remote: RemoteBlocks, checkpoint: Checkpoint | None = None, rng: random.Random | None = None):
        self.remote, self.client = remote, remote.client
        policy = remote.client.verify
        self.policy = replace(policy, max_pending=min(policy.max_pending, MAX_PENDING_PASSES))
        self.checkpoint = checkpoint
        self.rng = rng or random.Random()
        self.unchecked: dict[str, int] = {}  # peer -> passes through it since its last check
        self.checks = 0
        self.caught: list[str] = []
        self._local = None  # (start, end, LocalBlocks): the last range this machine ran

    def due(self, peer: str) -> bool:
        passed = self.client.ledger.passed(peer)
        return self.policy.due(passed, self.unchecked.get(peer, 0) + 1, self.policy.draw(self.rng))

    async def run(self, span: Span, kind: str, x: torch.Tensor, grad: torch.Tensor | None, job: _Pass):
        """``span``'s pass, checked when due. Returns (its result, the spans that computed it with
        their inputs: ``span`` itself, or the checker's spans when ``span``'s server lied). Raises
        as :meth:`RemoteBlocks._pass` does, :class:`PoisonedTraining`, or a
        :class:`~swarm.p2p.checking.Dispute`."""
        peer = span.peer_id
        if not self.due(peer):
            result = await self.remote._pass(span, kind, x, grad, job)
            self.unchecked[peer] = self.unchecked.get(peer, 0) + 1
            return result, [(span, x)]
        primary, other = await asyncio.gather(self.remote._pass(span, kind, x, grad, job),
                                              self._elsewhere(span, kind, x, grad, job, {peer}),
                                              return_exceptions=True)
        if isinstance(primary, BaseException):
            raise primary  # a failure: the caller routes around it
        if isinstance(other, BaseException):
            if isinstance(other, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                raise other
            if not isinstance(other, NoRouteError):
                log.warning("could not check %s on blocks %d:%d now: %s", _short(peer), span.start, span.end, other)
            self.unchecked[peer] = self.unchecked.get(peer, 0) + 1
            return primary, [(span, x)]
        got, trace = other
        self.checks += 1
        mine = self._precision(peer)
        theirs = worst([self._precision(s.peer_id) for s, _ in trace])
        ledger = self.client.ledger
        error = self._error(kind, x, primary, got)
        limit = self._limit(kind, mine, theirs)
        if error <= limit:
            ledger.count(peer, True)
            for s, _ in trace:
                ledger.count(s.peer_id, True)
            self.unchecked[peer] = 0
            return primary, [(span, x)]
        checkers = [s.peer_id for s, _ in trace]
        log.warning("%s disagrees with %s on a %s pass of blocks %d:%d (error %.3g > %.3g)", _short(peer),
                    ", ".join(_short(p) for p in checkers), kind, span.start, span.end, error, limit)
        third, third_precision, who = await self._third(span, kind, x, grad, job, {peer, *checkers})
        pt = ct = None
        if third is not None:
            pt = self._error(kind, x, primary, third) <= self._limit(kind, mine, third_precision)
            ct = self._error(kind, x, got, third) <= self._limit(kind, theirs, third_precision)
        verdict = blame(False, pt, ct)
        where = f"blocks {span.start}:{span.end}"
        if verdict == "primary":
            earlier = self.unchecked.pop(peer, 0)
            self._caught(peer, f"returned a wrong {kind} result for {where} (error {error:.3g}; "
                               f"{', '.join(_short(p) for p in checkers)} and {who} agree with each other)", span, x)
            for p in checkers:
                ledger.count(p, True)
            if earlier:
                raise PoisonedTraining(
                    f"{_short(peer)} returned a wrong {kind} result for {where} and is banned now; {earlier} earlier "
                    f"pass{'es' if earlier > 1 else ''} through it went unchecked, so the adapter may have learned "
                    f"from wrong results: train again from before (the swarm routes around it now), or with "
                    f"--verify strict to check every pass")
            return got, trace
        if verdict == "checker":
            for p in checkers:
                if len(checkers) == 1:
                    self._caught(p, f"returned a wrong {kind} result for {where} as a checker (error {error:.3g}; "
                                    f"{_short(peer)} and {who} agree)")
                    earlier = self.unchecked.pop(p, 0)
                    if earlier:  # it served this training unchecked before
                        raise PoisonedTraining(
                            f"{_short(p)} returned a wrong {kind} result for {where} (as a checker) and is banned "
                            f"now; {earlier} earlier pass{'es' if earlier > 1 else ''} through it went unchecked, so "
                            f"the adapter may have learned from wrong results: train again from before (the swarm "
                            f"routes around it now), or with --verify strict to check every pass")
                else:
                    ledger.count(p, False)
            ledger.count(peer, True)
            self.unchecked[peer] = 0
            return primary, [(span, x)]
        raise Dispute(
            f"servers {_short(peer)} and {', '.join(_short(p) for p in checkers)} disagree on a {kind} pass of "
            f"{where}, and " + ("no third server or local copy of those blocks can tell which is right"
                                if third is None else f"{who} agrees with neither")
            + "; the training cannot trust either (retry later, or train with --local)")

    def _caught(self, peer: str, reason: str, span: Span | None = None, x: torch.Tensor | None = None) -> None:
        """``peer`` lied: banned here; caught on ``span``'s pass of ``x``, evidence others can check
        is gathered and published (see :mod:`swarm.p2p.evidence`)."""
        convict(self.client, peer, reason)
        self.caught.append(peer)
        if span is not None:
            self.client.accuse(peer, span.start, span.end, x[:1], reason)

    def _precision(self, peer: str) -> Precision:
        return announced(self.client, peer, self.client.wire_for(peer))

    @staticmethod
    def _limit(kind: str, a: Precision, b: Precision) -> float:
        return grad_tolerance(a, b) if kind == "backward" else tolerance(a, b)

    @staticmethod
    def _error(kind: str, x: torch.Tensor, a, b) -> float:
        """How far apart two results of the same pass are (see the module's docstring)."""
        if kind == "forward":
            return float(disagreement(x, a, b).max())
        (ga, parts_a), (gb, parts_b) = a, b
        if set(parts_a) != set(parts_b):
            return float("inf")
        return max([relative_error(ga, gb), *(relative_error(parts_a[n], parts_b[n]) for n in parts_a)])

    async def _elsewhere(self, span: Span, kind: str, x, grad, job: _Pass, exclude: set[str]):
        """The pass on other servers of ``span``'s blocks (none of ``exclude`` nor any banned):
        (its result, [(span, input)] of the servers that computed it). Raises NoRouteError when
        nobody else serves them, SpanFailure when one fails (no failover for a check)."""
        exclude = exclude | self.client.ledger.banned() | self.client.banned()  # liars, and servers that failed lately
        spans = await self.client.route(span.start, span.end, wait=False, exclude=exclude)
        trace, y = [], x
        for s in spans[:-1] if kind == "backward" else spans:
            trace.append((s, y))
            y = await self.remote._pass(s, "forward", y, None, job)
        if kind == "forward":
            return y, trace
        trace.append((spans[-1], y))
        g, grads = grad, {}
        for s, inputs in reversed(trace):
            g, part = await self.remote._pass(s, "backward", inputs, g, job)
            grads.update(part)
        return (g, grads), trace

    async def _third(self, span: Span, kind: str, x, grad, job: _Pass, exclude: set[str]):
        """A third opinion: (result, its precision, who) from yet other servers, else from this
        machine's copy of the blocks; (None, None, "nobody") when neither can give one."""
        try:
            got, trace = await self._elsewhere(span, kind, x, grad, job, exclude)
            return got, worst([self._precision(s.peer_id) for s, _ in trace]), ", ".join(_short(s.peer_id) for s, _ in trace)
        except Exception as exc:  # no other server, or it failed: this machine's copy decides
            log.info("no third server for blocks %d:%d (%s)", span.start, span.end, exc)
        if self.checkpoint is None:
            return None, None, "nobody"
        got = await asyncio.to_thread(self._local_pass, span.start, span.end, kind, x, grad, job)
        return got, Precision(), "this machine"

    def _local_pass(self, start: int, end: int, kind: str, x: torch.Tensor, grad, job: _Pass):
        from swarm.engine.adapters import LocalBlocks

        if self._local is None or self._local[:2] != (start, end):
            self._local = None  # the previous range's memory first
            self._local = (start, end, LocalBlocks(self.checkpoint.load_blocks(start, end, torch.float32)))
        blocks = self._local[2]
        sub = span_tensors(job.tensors, start, end)
        if kind == "forward":
            with torch.no_grad():
                return blocks(x.float(), {n: t.detach().float() for n, t in sub.items()}, job.spec).to(x.dtype)
        xi = x.detach().float().requires_grad_()
        leaves = {n: t.detach().float().requires_grad_() for n, t in sub.items()}
        with torch.enable_grad():
            torch.autograd.backward(blocks(xi, leaves, job.spec), grad.float())
        zeros = torch.zeros_like
        return xi.grad, {n: (t.grad if t.grad is not None else zeros(t)) for n, t in leaves.items()}
