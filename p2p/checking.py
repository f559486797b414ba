"""Spot checks of an inference chain's servers by its client (the network half of
:mod:`swarm.p2p.verify`).

For every span of a chain the client keeps what it sent the span's server (the history, as for
failover) and what the server returned (``outputs``, reordered with beam search the same way).
A check of a span sends the inputs its server has not been checked on to a *checker*: another
chain over the same blocks (other servers, never the checked one), kept open for the span's life
and caught up lazily, so a check costs one pass over the positions since the last check, in one
step (a prefill, cheaper than the decode steps it checks). The two outputs are compared position
by position within the tolerance of the two sides' precisions (:func:`~swarm.p2p.verify.tolerance`).

Where they disagree, a third opinion decides: a fresh chain over the blocks on yet other servers,
or, where there is none, the client's own copy of the blocks (:attr:`SwarmClient.arbiter`). The
side the other two agree against lied:

- the checked server: it is banned (:class:`~swarm.p2p.ledger.Ledger`, persisted), its span is
  taken over by other servers with the history up to the first position it got wrong, every span
  is rewound there, and the step raises :class:`~swarm.engine.generation.Rewound`: the generation
  loop computes the tokens from there again, through honest servers, and gets what an honest
  swarm gives;
- the checker: it is banned and replaced; the checked server's outputs stand.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING

import torch

from swarm.engine.generation import Rewound
from swarm.p2p.chain import SwarmError, _short
from swarm.p2p.routing import NoRouteError
from swarm.p2p.verify import Precision, blame, disagreement, first_disagreeing, tolerance, worst

if TYPE_CHECKING:
    from swarm.p2p.chain import RemoteChain, SpanSession

log = logging.getLogger("swarm.client")

UNVERIFIABLE_RETRY = 30.0  # s: a span no other server holds is checked again after this (the table may change)


class Dispute(SwarmError):
    """Servers disagree on blocks and nothing can tell which is right."""


class ChainVerifier:
    """The checks of one :class:`~swarm.p2p.chain.RemoteChain` (see the module's docstring)."""

    def __init__(self, chain: RemoteChain, rng: random.Random | None = None):
        self.chain, self.client = chain, chain.client
        self.policy = chain.client.verify
        self.rng = rng or random.Random()
        self.checks = 0  # checks run by this chain
        self.caught: list[str] = []  # servers caught lying, in order

    def precision(self, peer_id: str, wire: str) -> Precision:
        info = self.client.table.snapshot().get(peer_id)
        if info is None:
            return Precision("float32", "nf4", wire)  # unknown now: the most lenient guess
        return Precision(info.dtype, info.quant, wire)

    async def after_step(self) -> None:
        """Run the checks due after a step (concurrently, one per span); raises
        :class:`~swarm.engine.generation.Rewound` when a server of the chain was caught lying."""
        chain = self.chain
        due = []
        now = time.monotonic()
        for session in chain.sessions:
            if session.unverifiable_until > now:
                continue
            pending = chain.position - session.verified_to
            passed = self.client.ledger.passed(session.span.peer_id)
            if self.policy.due(passed, session.unchecked_steps if pending else 0, self.policy.draw(self.rng)):
                due.append(session)
        if not due:
            return
        results = await asyncio.gather(*(self._compare(s) for s in due), return_exceptions=True)
        rewind_to = None
        for session, result in zip(due, results):
            if isinstance(result, BaseException):
                if isinstance(result, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                    raise result
                await self._drop_checker(session, broken=True)  # a new checker next time
                log.warning("could not check %s on blocks %d:%d now: %s", _short(session.span.peer_id),
                            session.span.start, session.span.end, result)
                continue
            if result is None:
                continue
            at = await self._settle(session, *result)
            if at is not None:
                rewind_to = at if rewind_to is None else min(rewind_to, at)
        if rewind_to is not None:
            await self._recover(rewind_to)

    async def _compare(self, session: SpanSession):
        """Check ``session``'s unchecked positions on its checker. None if they agree (the
        session is then verified to the chain's position); else (first bad position, the
        checker's outputs, the errors) for :meth:`_settle`."""
        chain = self.chain
        start = session.verified_to
        end = chain.position
        inputs = session.history.inputs[:, :end]
        checker = session.checker
        if checker is not None and checker.position != start:
            await self._drop_checker(session)
            checker = None
        local = False
        if checker is None:
            try:
                checker = await self._open(session, exclude={session.span.peer_id})
            except NoRouteError:  # nobody else serves these blocks
                if self.policy.mode != "strict" or self.client.arbiter is None:
                    self._unverifiable(session)
                    return None
                local = True  # strict: this machine checks with its own copy of the blocks
            else:
                session.checker = checker
        if local:
            got = (await self._local(session, inputs))[:, start:]
        elif start == 0 or checker.position == 0:
            got = (await checker.step(inputs))[:, start:]
        else:
            got = await checker.step(inputs[:, start:end], session.perm)
        session.perm = None
        self.checks += 1
        expected = session.outputs.inputs[:, start:end]
        errors = disagreement(inputs[:, start:end], expected, got)
        theirs = Precision() if local else self._chain_precision(checker)
        limit = tolerance(self.precision(session.span.peer_id, session.wire), theirs)
        bad = first_disagreeing(errors, limit)
        ledger = self.client.ledger
        if bad is None:
            session.verified_to = end
            session.unchecked_steps = 0
            ledger.count(session.span.peer_id, True)
            for s in ([] if local else checker.spans):
                ledger.count(s.peer_id, True)
            return None
        who = "this machine" if local else ", ".join(_short(s.peer_id) for s in checker.spans)
        log.warning("%s disagrees with %s on blocks %d:%d at position %d (error %.3g > %.3g)",
                    _short(session.span.peer_id), who, session.span.start, session.span.end, start + bad,
                    float(errors[bad]), limit)
        if local:  # this machine's own computation needs no third opinion
            self._caught(session.span.peer_id, f"returned wrong outputs for blocks {session.span.start}:"
                         f"{session.span.end} at position {start + bad} (error {float(errors[bad]):.3g}; "
                         f"this machine computed them)")
            return start + bad, None, errors
        return start + bad, got, errors

    def _unverifiable(self, session: SpanSession) -> None:
        if session.unverifiable_until == 0.0:
            log.warning("cannot check %s on blocks %d:%d: no other server serves them; its steps go "
                        "unchecked until one does (or use --verify strict: this machine then checks)",
                        _short(session.span.peer_id), session.span.start, session.span.end)
        session.unverifiable_until = time.monotonic() + UNVERIFIABLE_RETRY

    async def _local(self, session: SpanSession, inputs: torch.Tensor) -> torch.Tensor:
        """The span's blocks run on ``inputs`` by this machine (:attr:`SwarmClient.arbiter`)."""
        return await asyncio.to_thread(self.client.arbiter, session.span.start, session.span.end, inputs,
                                       self.chain.adapter)

    async def _settle(self, session: SpanSession, bad: int, got: torch.Tensor, errors: torch.Tensor) -> int | None:
        """A disagreement at position ``bad``: the third opinion, the liar's ban; the position to
        rewind the chain to if the checked server lied, else None."""
        if got is None:  # caught by this machine's own computation
            return bad
        chain = self.chain
        start, end = session.verified_to, chain.position
        inputs = session.history.inputs[:, :end]
        expected = session.outputs.inputs[:, start:end]
        checker = session.checker
        checker_peers = [s.peer_id for s in checker.spans]
        third, third_precision, who_third = None, None, "nobody"
        try:
            third_chain = await self._open(session, exclude={session.span.peer_id, *checker_peers})
            try:
                third = (await third_chain.step(inputs))[:, start:]
                third_precision = self._chain_precision(third_chain)
                who_third = ", ".join(_short(s.peer_id) for s in third_chain.spans)
            finally:
                await third_chain.close()
        except Exception as exc:  # no other server (NoRouteError), or it failed: this machine's copy decides
            log.info("no third server for blocks %d:%d (%s)", session.span.start, session.span.end, exc)
        if third is None and self.client.arbiter is not None:
            third = (await self._local(session, inputs))[:, start:]
            third_precision, who_third = Precision(), "this machine"
        mine = self.precision(session.span.peer_id, session.wire)
        theirs = self._chain_precision(checker)
        pt = ct = None
        if third is not None:
            x = inputs[:, start:end]
            pt = first_disagreeing(disagreement(x, expected, third), tolerance(mine, third_precision)) is None
            ct = first_disagreeing(disagreement(x, got, third), tolerance(theirs, third_precision)) is None
        verdict = blame(False, pt, ct)
        ledger = self.client.ledger
        if verdict == "primary":
            peer = session.span.peer_id
            reason = (f"returned wrong outputs for blocks {session.span.start}:{session.span.end} at position {bad} "
                      f"(error {float(errors[bad - start]):.3g}; {', '.join(_short(p) for p in checker_peers)} and "
                      f"{who_third} agree with each other)")
            self._caught(peer, reason)
            for p in checker_peers:
                ledger.count(p, True)
            await self._drop_checker(session)
            return bad
        if verdict == "checker":
            for p in checker_peers:
                if len(checker_peers) == 1:
                    self._caught(p, f"returned wrong outputs for blocks {session.span.start}:{session.span.end} "
                                    f"as a checker (error {float(errors[bad - start]):.3g}; "
                                    f"{_short(session.span.peer_id)} and {who_third} agree)")
                else:
                    ledger.count(p, False)
            ledger.count(session.span.peer_id, True)
            await self._drop_checker(session)
            session.verified_to = end
            session.unchecked_steps = 0
            return None
        await self._drop_checker(session)
        raise Dispute(
            f"servers {_short(session.span.peer_id)} and {', '.join(_short(p) for p in checker_peers)} disagree on "
            f"blocks {session.span.start}:{session.span.end} from position {bad}, and "
            + ("no third server or local copy of those blocks can tell which is right"
               if third is None else f"{who_third} agrees with neither")
            + "; the output cannot be trusted (retry later, or run --local)"
        )

    def _caught(self, peer: str, reason: str) -> None:
        log.warning("%s lied: %s; banned", _short(peer), reason)
        self.client.ledger.count(peer, False)
        self.client.ledger.ban(peer, reason)
        self.caught.append(peer)

    async def _recover(self, position: int) -> None:
        """Replace the chain's liars (banned now) and rewind it to ``position``; raises Rewound."""
        chain = self.chain
        chain.rewind(position)
        await chain.replace_banned()
        raise Rewound(position, self.caught[-1] if self.caught else "")

    async def _open(self, session: SpanSession, exclude: set[str]) -> RemoteChain:
        from swarm.p2p.chain import RemoteChain

        chain = self.chain
        exclude = exclude | self.client.ledger.banned()
        spans = await self.client.route(session.span.start, session.span.end, cache_tokens=chain.batch * chain.max_length,
                                        wait=False, exclude=exclude)
        checker = RemoteChain(self.client, spans, chain.batch, chain.max_length, chain.adapter, verify=False,
                              exclude=exclude)
        await checker.open()
        return checker

    def _chain_precision(self, chain: RemoteChain) -> Precision:
        return worst([self.precision(s.span.peer_id, s.wire) for s in chain.sessions] or [Precision("float32", "nf4")])

    async def _drop_checker(self, session: SpanSession, broken: bool = False) -> None:
        checker, session.checker = session.checker, None
        if checker is None:
            return
        if broken:  # its servers may be gone or frozen: no goodbyes
            for s in checker.sessions:
                await s.reset()
            checker.sessions = []
        else:
            await checker.close()

