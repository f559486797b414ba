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
from dataclasses import dataclass
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


def announced(client, peer_id: str, wire: str) -> Precision:
    """The precision ``peer_id`` announces (its outputs in ``wire``): what a check's tolerance
    allows it. Unknown now: the most lenient guess."""
    info = client.table.snapshot().get(peer_id)
    if info is None:
        return Precision("float32", "nf4", wire)
    return Precision(info.dtype, info.quant, wire)


def convict(client, peer_id: str, reason: str) -> None:
    """``peer_id`` lied: a failed check and a ban in the client's ledger (persisted), logged."""
    log.warning("%s lied: %s; banned", _short(peer_id), reason)
    client.ledger.count(peer_id, False)
    client.ledger.ban(peer_id, reason)


@dataclass(eq=False)
class _Check:
    """One check of a span's positions ``[start, end)``: what was sent and returned, taken when it
    began (the chain goes on meanwhile: the histories it reads are never changed in place)."""

    session: SpanSession
    start: int
    end: int
    inputs: torch.Tensor  # the span's inputs for positions [0, end)
    expected: torch.Tensor  # what its server returned for [start, end)
    perm: torch.Tensor | None  # the rows' reorder since start (beam search)
    cut: int  # the chain was rewound to here since it began: the positions from here on were forgotten
    task: asyncio.Task | None = None  # a check in the background


class ChainVerifier:
    """The checks of one :class:`~swarm.p2p.chain.RemoteChain` (see the module's docstring)."""

    def __init__(self, chain: RemoteChain, rng: random.Random | None = None):
        self.chain, self.client = chain, chain.client
        self.policy = chain.client.verify
        self.rng = rng or random.Random()
        self.checks = 0  # checks run by this chain
        self.caught: list[str] = []  # servers caught lying, in order
        self.closest = 0.0  # the largest disagreement seen, as a share of its tolerance (honest: < 1)
        self.running: list[_Check] = []  # checks in the background, owned (awaited or cancelled) here
        self.suspect: int | None = None  # a failed server's replay disagreed from here: rewind after the step

    def precision(self, peer_id: str, wire: str) -> Precision:
        return announced(self.client, peer_id, wire)

    async def after_step(self) -> None:
        """Start the checks due after a step: awaited where they block (``strict``, or a server
        not yet trusted), else in the background; raises
        :class:`~swarm.engine.generation.Rewound` when a check (finished now or in the background
        since the last step) caught a server of the chain lying."""
        chain = self.chain
        self._finished()
        blocking = []
        now = time.monotonic()
        for session in chain.sessions:
            if session.checking is not None or session.unverifiable_until > now:
                continue
            pending = chain.position - session.verified_to
            passed = self.client.ledger.passed(session.span.peer_id)
            if self.policy.due(passed, session.unchecked_steps if pending else 0, self.policy.draw(self.rng)):
                check = self._begin(session)
                if self.policy.blocking(passed):
                    blocking.append(check)
                else:
                    check.task = asyncio.create_task(self._run(check))
                    self.running.append(check)
        if blocking:
            await asyncio.gather(*(self._run(c) for c in blocking))
        await self._recover()

    async def settle(self) -> None:
        """Finish the checks in the background and check every position not yet checked (where
        another server or, in ``strict`` mode, this machine can): what a generation does before
        it returns. Raises :class:`~swarm.engine.generation.Rewound` as :meth:`after_step`."""
        if self.running:  # bounded: a checker gone silent costs the generation no more than a step's wait
            cfg = self.client.cfg
            _, late = await asyncio.wait([c.task for c in self.running], timeout=cfg.step_timeout + cfg.request_timeout)
            for check in [c for c in self.running if c.task in late]:
                check.task.cancel()
                await asyncio.wait([check.task])
                self.running.remove(check)
                await self._drop_checker(check.session, broken=True)  # cut mid-step
                log.warning("a check of %s on blocks %d:%d did not finish in time: dropped (checked later, or not at all "
                            "if the generation ends)", _short(check.session.span.peer_id), check.session.span.start,
                            check.session.span.end)
        self._finished()
        if self.suspect is None:
            chain, now = self.chain, time.monotonic()
            checks = [self._begin(s) for s in chain.sessions
                      if s.verified_to < chain.position and s.unverifiable_until <= now and s.checking is None]
            await asyncio.gather(*(self._run(c) for c in checks))
        await self._recover()

    def compare_replay(self, failed: SpanSession, inputs: torch.Tensor, out: torch.Tensor, hypo_ids,
                       replacement: list[SpanSession]) -> None:
        """A server failed and ``replacement`` replayed its history (``inputs``, reordered by
        ``hypo_ids`` as the step's): the outputs it returned that were not checked yet are compared
        with the replay's ``out``. Where they disagree one of the two lied (a liar that crashed
        after lying, or a lying replacement); the chain rewinds there after this step, so the
        tokens from there come from the replacement, a new server whose first check blocks."""
        old = failed.outputs.inputs
        if old is None:
            return
        if hypo_ids is not None:
            old = old.index_select(0, hypo_ids)
        start, end = failed.verified_to, min(old.shape[1], out.shape[1])
        if start >= end:
            return
        errors = disagreement(inputs[:, start:end], old[:, start:end], out[:, start:end])
        theirs = worst([self.precision(s.span.peer_id, s.wire) for s in replacement] or [Precision("float32", "nf4")])
        limit = tolerance(self.precision(failed.span.peer_id, failed.wire), theirs)
        bad = first_disagreeing(errors, limit)
        if bad is not None:
            log.warning("%s failed, and its outputs for blocks %d:%d from position %d differ from its replacement's "
                        "(error %.3g > %.3g): those tokens are computed again", _short(failed.span.peer_id),
                        failed.span.start, failed.span.end, start + bad, float(errors[bad]), limit)
            self.suspect = _least(self.suspect, start + bad)

    def rewound(self, position: int) -> None:
        """The chain forgot the positions from ``position`` on (checks under way keep what they
        took; their results count up to there)."""
        for check in self.running:
            check.cut = min(check.cut, position)

    async def forget(self, session: SpanSession) -> None:
        """``session`` leaves the chain (its server was replaced): its check stops, its checker closes."""
        for check in [c for c in self.running if c.session is session]:
            check.task.cancel()
            await asyncio.wait([check.task])
            self.running.remove(check)
        await self._drop_checker(session, broken=True)

    async def left(self, session: SpanSession) -> None:
        """``session``'s server failed and was replaced: its check under way, if any, goes on (and
        closes the checker when done), else its checker closes now."""
        if session.checking is None:
            await self._drop_checker(session, broken=True)

    async def close(self) -> None:
        """Stop the checks in the background (the chain closes)."""
        running, self.running = self.running, []
        for check in running:
            check.task.cancel()
        if running:
            await asyncio.wait([c.task for c in running])
        for check in running:
            await self._drop_checker(check.session, broken=True)

    def _finished(self) -> None:
        """Collect the background checks that finished (what they found is in ``suspect``);
        raises the :class:`Dispute` one ended with."""
        for check in [c for c in self.running if c.task.done()]:
            self.running.remove(check)
            if not check.task.cancelled():
                check.task.result()

    def _begin(self, session: SpanSession) -> _Check:
        end = self.chain.position
        check = _Check(session, session.verified_to, end, session.history.inputs[:, :end],
                       session.outputs.inputs[:, session.verified_to : end], session.perm, end)
        session.perm, session.unchecked_steps, session.checking = None, 0, check
        return check

    async def _run(self, check: _Check) -> None:
        """Run ``check`` to its verdict (a liar caught is banned and the position to rewind to put
        in ``suspect``, whatever happens after). A check that could not be done is logged and done
        again later; a :class:`Dispute` is raised."""
        session = check.session
        try:
            result = await self._compare(check)
            if result is not None:
                await self._settle(check, *result)
        except Dispute:
            await self._drop_checker(session, broken=True)
            raise
        except Exception as exc:
            await self._drop_checker(session, broken=True)  # a new checker next time
            log.warning("could not check %s on blocks %d:%d now: %s", _short(session.span.peer_id),
                        session.span.start, session.span.end, exc)
        finally:
            session.checking = None
            if session not in self.chain.sessions:  # replaced meanwhile: its checker is of no more use
                await self._drop_checker(session, broken=True)

    def _passed(self, check: _Check) -> None:
        """``check``'s positions passed (those the chain still holds)."""
        session = check.session
        session.verified_to = max(session.verified_to, min(check.end, check.cut))
        checker = session.checker
        if checker is not None and checker.position > session.verified_to:
            checker.rewind(session.verified_to)  # the positions after it were forgotten meanwhile

    async def _compare(self, check: _Check):
        """Compare ``check``'s positions with its checker's. None if they agree (the session is
        then verified to the check's end); else (first bad position, the checker's outputs, the
        errors) for :meth:`_settle`."""
        session, start, end, inputs = check.session, check.start, check.end, check.inputs
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
            got = await checker.step(inputs[:, start:end], check.perm)
        self.checks += 1
        errors = disagreement(inputs[:, start:end], check.expected, got)
        theirs = Precision() if local else self._chain_precision(checker)
        limit = tolerance(self.precision(session.span.peer_id, session.wire), theirs)
        bad = first_disagreeing(errors, limit)
        self.closest = max(self.closest, float(errors.max()) / limit) if errors.numel() else self.closest
        ledger = self.client.ledger
        if bad is None:
            self._passed(check)
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
                         f"this machine computed them)", check, start + bad)
            return start + bad, None, errors
        return start + bad, got, errors

    def _unverifiable(self, session: SpanSession) -> None:
        key = (session.span.peer_id, session.span.start, session.span.end)
        warned = self.client.unverifiable_warned
        if session.unverifiable_until == 0.0 and key not in warned:  # once per server and range in a client's life
            warned.add(key)
            log.warning("cannot check %s on blocks %d:%d: no other server serves them; its steps go "
                        "unchecked until one does (or use --verify strict: this machine then checks)",
                        _short(session.span.peer_id), session.span.start, session.span.end)
        session.unverifiable_until = time.monotonic() + UNVERIFIABLE_RETRY

    async def _local(self, session: SpanSession, inputs: torch.Tensor) -> torch.Tensor:
        """The span's blocks run on ``inputs`` by this machine (:attr:`SwarmClient.arbiter`)."""
        return await asyncio.to_thread(self.client.arbiter, session.span.start, session.span.end, inputs,
                                       self.chain.adapter)

    async def _settle(self, check: _Check, bad: int, got: torch.Tensor, errors: torch.Tensor) -> None:
        """A disagreement at position ``bad``: the third opinion, the liar's ban (and, if the
        checked server lied, the position to rewind to in ``suspect``)."""
        if got is None:  # caught by this machine's own computation (banned already)
            return
        session, start, end, inputs, expected = check.session, check.start, check.end, check.inputs, check.expected
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
            self._caught(peer, reason, check, bad)
            for p in checker_peers:
                ledger.count(p, True)
            await self._drop_checker(session)
            return
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
            self._passed(check)
            return
        await self._drop_checker(session)
        raise Dispute(
            f"servers {_short(session.span.peer_id)} and {', '.join(_short(p) for p in checker_peers)} disagree on "
            f"blocks {session.span.start}:{session.span.end} from position {bad}, and "
            + ("no third server or local copy of those blocks can tell which is right"
               if third is None else f"{who_third} agrees with neither")
            + "; the output cannot be trusted (retry later, or run --local)"
        )

    def _caught(self, peer: str, reason: str, check: _Check | None = None, bad: int = 0) -> None:
        """``peer`` lied: banned here; with the ``check`` that caught it (at position ``bad``),
        evidence others can check is gathered and published (see :mod:`swarm.p2p.evidence`)."""
        convict(self.client, peer, reason)
        self.caught.append(peer)
        if check is not None:  # the checked server: the positions from ``bad`` are computed again
            self.suspect = _least(self.suspect, min(bad, check.cut))
            if hasattr(self.client, "accuse"):
                span = check.session.span
                self.client.accuse(peer, span.start, span.end, check.inputs[:1, : bad + 1], reason)

    async def _recover(self) -> None:
        """If checks found lies (``suspect``): rewind the chain there and move the liars' spans
        to other servers (while that replays, checks still running may find more: those too);
        then raises Rewound, unless the wrong positions were forgotten already."""
        chain, first = self.chain, None
        while self.suspect is not None:
            position, self.suspect = self.suspect, None
            if position < chain.position:
                chain.rewind(position)
                first = position if first is None else min(first, position)
            await chain.replace_banned()
            self._finished()
        if first is not None:
            raise Rewound(first, self.caught[-1] if self.caught else "")

    async def _open(self, session: SpanSession, exclude: set[str]) -> RemoteChain:
        from swarm.p2p.chain import RemoteChain

        chain = self.chain
        # never a server caught lying, nor one that failed lately (a check is not worth its timeouts)
        exclude = exclude | self.client.ledger.banned() | self.client.banned()
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



def _least(position: int | None, *others: int | None) -> int | None:
    """The least of the positions given (None: none)."""
    found = [p for p in (position, *others) if p is not None]
    return min(found) if found else None
