"""Inference chains: sessions on a chain of servers covering every block, stepped together, with
failover (a failed server's span is reopened elsewhere and its cache rebuilt from the client's
history) and pushes (each server hands its output straight to the next one).

A chain may carry an adapter (:class:`ChainAdapter`): each span's session is opened with that
span's adapter tensors after the ``open`` frame's own fields (see
:func:`~swarm.p2p.wire.adapter_fields`), and a replacement span opened on failover gets them
again, so the replayed history gives the same outputs as before. The servers apply them to every
step of the session, pushed steps included.

Each span's session has a wire dtype (``ClientConfig.wire_dtype`` resolved for its server, see
:mod:`swarm.p2p.compression`), named in its open: the client sends the span's inputs that way
and the server its outputs. The history kept for a span is what its server decoded, so a replay
rebuilds the very cache it had.

:class:`SwarmClient` (in :mod:`swarm.p2p.client`) opens chains;
:class:`~swarm.p2p.sync_chain.SyncChain` presents one to the engine's generation loop as an
inference session.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from swarm.cache.history import SpanHistory
from swarm.engine.adapters import AdapterSpec, adapter_digest, span_tensors
from swarm.p2p import protocols
from swarm.p2p.compression import received
from swarm.p2p.host import P2PError
from swarm.p2p.routing import NoRouteError, Span
from swarm.p2p.span_session import SpanFailure, SpanSession, SwarmError, _short
from swarm.p2p.wire import (
    MAX_TRAIL,
    MAX_VERIFY,
    Frame,
    RemoteError,
    WireError,
    adapter_fields,
    expect,
    read_frame,
    write_frame,
)

log = logging.getLogger("swarm.client")

# (part of this module's API)
__all__ = ["ChainAdapter", "RemoteChain", "SpanFailure", "SpanSession", "SwarmError"]


@dataclass(frozen=True)
class ChainAdapter:
    """An adapter applied by the servers of a chain: ``tensors`` keyed by global block (LoRA and
    deep prompts, see :mod:`swarm.engine.adapters`) and how to apply them (``spec``). A span's
    session gets the tensors of its blocks only; a span with none gets no adapter."""

    tensors: Mapping[str, torch.Tensor]
    spec: AdapterSpec = field(default_factory=AdapterSpec)

    def open_fields(self, start: int, end: int) -> tuple[dict, list[torch.Tensor]]:
        """The ``open`` frame's adapter field and tensors for blocks ``[start, end)``."""
        part = span_tensors(self.tensors, start, end)
        if not part:
            return {}, []
        names = sorted(part)
        tensors = [part[n].detach().contiguous() for n in names]
        return adapter_fields(adapter_digest(part), self.spec.to_wire(), names), tensors


PUSH_GRACE = 2.0  # s: a pushed step unanswered this long (or 4× the previous step's time) is sent directly
FIRST_PUSH_GRACE = 10.0  # s: the same for a chain's first step (nothing to compare with yet)
MAX_LOST_PUSHES = 3  # push runs in a row that went wrong before a chain stops asking for pushes
REPLAY_FRAME_BYTES = 64 * 2**20  # a replay larger than this is sent as several frames


def _refused(peer_id: str, exc: Exception) -> Exception:
    """A failure to route around (SpanFailure), or the server refusing our request (SwarmError)."""
    if isinstance(exc, RemoteError) and exc.refused:
        return SwarmError(f"server …{peer_id[-6:]} refused the request: {exc}")
    return SpanFailure(peer_id, exc)


class _PushLost(Exception):
    """A push run went wrong past the server the client sent the step to (a later server failed,
    or no reply came in time: ``overdue``); the client then sends the step to each server itself."""

    def __init__(self, message: str, overdue: bool = False):
        super().__init__(message)
        self.overdue = overdue


class RemoteChain:
    """Inference sessions on a chain of servers, stepped together, surviving server failures.

    Every step sends the hidden states through the spans in order; ``position`` is the global
    position of the step's first token, checked by every server against its cache. The inputs
    sent to each span are kept (:class:`~swarm.cache.history.SpanHistory`); when a span's server
    fails, the client bans it, finds the best chain for exactly that span's blocks, replays the
    history there step by step (one frame) and continues; the other servers keep their caches.
    With an ``adapter``, every session (replacements too, however the blocks are split) opens
    with its span's adapter tensors, so the replay computes what the failed server computed.

    With ``push`` (the default), a step goes to the first server only, with the route onwards;
    each server passes its output to the next itself, carrying the outputs before it, and the
    server ending the run replies with all of them (one step id for the whole chain). Where a
    server could not push (the first step to a peer, a failure), it replies and the client sends
    the next server the step itself; where a run went wrong further on, the client sends the
    step to each server itself (repeats are answered from memory).
    """

    def __init__(self, client, spans: list[Span], batch: int, max_length: int, adapter: ChainAdapter | None = None,
                 verify: bool = True, exclude=frozenset()):
        self.client, self.batch, self.max_length = client, batch, max_length  # client: a SwarmClient
        self.adapter = adapter  # kept for the life of the chain: replacement spans get it too
        self.exclude = frozenset(exclude)  # servers never used by this chain (a checker's: the checked one)
        # a checker (verify=False) does not fail over: a failed check is dropped and a new checker
        # opened at the next one, so a dead checker never holds up the chain it checks
        self.recover = verify
        self.verifier = None  # checks its servers' outputs (p2p/checking.py), per the client's policy
        if verify and getattr(client, "verify", None) is not None and client.verify.enabled:
            from swarm.p2p.checking import ChainVerifier

            self.verifier = ChainVerifier(self)
        self._route = spans
        self.sessions: list[SpanSession] = []
        self.position = 0
        self._broken = False
        self._arrived = asyncio.Event()  # a frame came from one of the sessions
        self._last_step_time: float | None = None
        self._lost_pushes = 0  # push runs in a row that went wrong
        self.wire_bytes = 0  # bytes of step frames sent and output frames taken (headers included)

    @property
    def spans(self) -> list[Span]:
        return [s.span for s in self.sessions] or self._route

    async def open(self) -> None:
        try:
            for span in self._route:
                try:
                    self.sessions.append(await self._open_span(span))
                except SpanFailure as failure:
                    self.client.ban(failure.peer_id)
                    if not self.recover:
                        raise SwarmError(f"{_short(failure.peer_id)} failed: {failure}") from failure
                    sessions, _ = await self._take_over(span.start, span.end, None, None, failure)
                    self.sessions.extend(sessions)
        except BaseException:
            await self.close()
            raise

    async def fork(self, positions: int) -> RemoteChain:
        """A new chain over the same servers whose sessions begin as copies of this chain's first
        ``positions`` positions (another continuation of the same prefix: the choices of one
        request share their prefill), with those positions' histories (``ValueError`` for a chain
        with an adapter, or closed). A server that cannot copy (gone, refused) is replaced as in
        a failover: a session opened on the best server and the history replayed there, so the
        copy is exact either way. This chain may step meanwhile: the positions before its
        current step never change."""
        if not 0 < positions <= self.position:
            raise ValueError(f"cannot fork at position {positions}: this chain has {self.position} positions")
        if self.adapter is not None:
            raise ValueError("chains with an adapter are not forked (servers copy sessions without adapters only)")
        if not self.sessions:
            raise ValueError("this chain is closed")
        child = RemoteChain(self.client, self.spans, self.batch, self.max_length, self.adapter)
        child.position = positions
        try:
            for parent in list(self.sessions):
                history = parent.history.prefix(positions)
                failure = None
                try:
                    session = await child._open_span(parent.span, {"session": parent.session_id, "positions": positions})
                    session.history = history
                    if child.verifier is not None and parent.outputs.length >= positions:
                        session.outputs = parent.outputs.prefix(positions)
                        session.verified_to = min(parent.verified_to, positions)
                        session.unchecked_steps = parent.unchecked_steps
                    child.sessions.append(session)
                except SpanFailure as exc:
                    failure = exc
                except SwarmError as exc:  # the copy refused (its session ended meanwhile): not a failed server
                    failure = SpanFailure(parent.span.peer_id, exc)
                if failure is not None:
                    sessions, _ = await child._take_over(parent.span.start, parent.span.end, history.inputs,
                                                         history.step_lengths, failure)
                    child.sessions.extend(sessions)
        except BaseException:
            await child.close()
            raise
        return child

    async def _open_span(self, span: Span, fork: dict | None = None) -> SpanSession:
        timeout = self.client.cfg.request_timeout
        stream = None
        try:
            stream = await self.client.host.open_stream(span.peer_id, protocols.INFERENCE, timeout=timeout)
            wire = self.client.wire_for(span.peer_id)
            fields = {"start": span.start, "end": span.end, "batch": self.batch, "max_length": self.max_length}
            if fork is not None:
                fields["fork"] = fork
            if wire != "float32":  # the default: a server from before wire dtypes takes the open too
                fields["wire"] = wire
            tensors = []
            if self.adapter is not None:
                extra, tensors = self.adapter.open_fields(span.start, span.end)
                fields.update(extra)
            await write_frame(stream, Frame("open", fields, tensors), timeout=timeout)
            opened = expect(await read_frame(stream, timeout=timeout), "opened")
            session = SpanSession(span, stream, str(opened.fields.get("session_id", "")), wire, arrived=self._arrived)
            session.start_reading()
            return session
        except (P2PError, WireError, RemoteError) as exc:
            if stream is not None:
                await stream.reset()
            raise _refused(span.peer_id, exc) from exc

    async def _send(self, session: SpanSession, hidden, hypo_ids, position: int, chunks=None) -> torch.Tensor:
        step_id = uuid.uuid4().hex[:16]
        await self._write_step(session, received(hidden, session.wire)[0], hypo_ids, position, step_id, chunks=chunks)
        return await self._read_output(session, step_id, hidden.shape)

    async def _write_step(
        self, session: SpanSession, packed, hypo_ids, position: int, step_id: str, chunks=None, route=None,
        per_position: bool = False,
    ) -> None:
        """Send a step: ``packed``, the hidden states as the session's wire dtype sends them."""
        tensors = [packed] if hypo_ids is None else [packed, hypo_ids.to(torch.int64)]
        fields = {"step_id": step_id, "position": position}
        if chunks is not None:
            fields["chunks"] = chunks
        if route:
            fields["route"] = route
        if per_position:
            fields["per_position"] = True
        try:
            self.wire_bytes += await write_frame(
                session.stream, Frame("step", fields, tensors), timeout=self.client.cfg.step_timeout
            )
        except (P2PError, WireError) as exc:
            raise _refused(session.span.peer_id, exc) from exc

    async def _read_output(self, session: SpanSession, step_id: str, shape) -> torch.Tensor:
        """The output of step ``step_id``, sent by the client itself to ``session``'s server.
        Answers to other steps are skipped (late duplicates), and so are answers to a pushed copy:
        after a failover the client sends its own copy and must not take the answer to a push
        from the server it replaced. Waits the step timeout in all."""
        deadline = time.monotonic() + self.client.cfg.step_timeout
        try:
            while True:
                frame = expect(await session.next_frame(max(0.0, deadline - time.monotonic())), "output")
                if frame.fields.get("step_id") == step_id and frame.fields.get("to") in ("client", None):
                    break
            if not frame.tensors:
                raise WireError("an output frame without hidden states")
        except (P2PError, WireError, RemoteError) as exc:
            raise _refused(session.span.peer_id, exc) from exc
        self.wire_bytes += frame.wire_size
        out = frame.tensors[0]
        if out.shape != shape:
            raise SpanFailure(session.span.peer_id, WireError(f"output shape {list(out.shape)} != input {list(shape)}"))
        return out

    async def _read_pushed(self, i: int, step_id: str, shape, timeout: float) -> tuple[int, list[torch.Tensor]]:
        """The reply to step ``step_id`` sent to ``sessions[i]`` with the route onwards: from the
        server that ended the push run (the chain's last, or one that could not push), ``j``.
        Returns ``j`` and the outputs of servers ``i..j`` (the trail of the run, then its own).

        Raises :class:`SpanFailure` if ``sessions[i]`` fails, :class:`_PushLost` if a server
        after it fails (its input is unknown here) or no reply comes within ``timeout``: the
        caller then sends the step to each server itself, which answers repeats from memory."""
        deadline = time.monotonic() + timeout
        while True:
            self._arrived.clear()
            for j in range(i, len(self.sessions)):
                session = self.sessions[j]
                while not session.frames.empty():
                    item = session.frames.get_nowait()
                    try:
                        if isinstance(item, BaseException):
                            session.frames.put_nowait(item)  # the stream is done: later reads fail the same way
                            raise item
                        try:
                            frame = expect(item, "output")
                        except RemoteError as exc:
                            session.error = exc  # kept for the direct pass, which reports it
                            raise
                        # the start was sent this copy by the client, the others got it by push; a
                        # reply to another step, or to a run that failed over, is a late duplicate
                        trail = frame.fields.get("trail", 0)
                        to = "client" if j == i else "push"
                        if frame.fields.get("step_id") != step_id or frame.fields.get("to") != to or trail != j - i:
                            continue
                        if len(frame.tensors) != trail + 1 or any(t.shape != shape for t in frame.tensors):
                            raise WireError(f"a reply carries {len(frame.tensors)} tensors of shapes "
                                            f"{[list(t.shape) for t in frame.tensors]} for {trail + 1} of {list(shape)}")
                    except (P2PError, WireError, RemoteError) as exc:
                        if j == i:
                            raise _refused(session.span.peer_id, exc) from exc
                        raise _PushLost(f"{_short(session.span.peer_id)} failed during a pushed step: {exc}") from exc
                    self.wire_bytes += frame.wire_size
                    return j, [*frame.tensors[1:], frame.tensors[0]]
            left = deadline - time.monotonic()
            if left <= 0:
                raise _PushLost(f"no reply to a pushed step within {timeout:.2f} s", overdue=True)
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                pass

    def _route_after(self, i: int) -> list[dict] | None:
        """The servers after span ``i``, for the push of a step along the chain."""
        if not self.client.cfg.push or self._lost_pushes >= MAX_LOST_PUSHES:
            return None
        route = []
        for s in self.sessions[i + 1 : i + 1 + MAX_TRAIL]:  # a run carries at most MAX_TRAIL outputs
            if not s.session_id:  # a server that did not say its session id cannot be pushed to
                break
            route.append({"peer": s.span.peer_id, "session": s.session_id, "wire": s.wire})
        return route or None

    async def _replay(self, session: SpanSession, inputs: torch.Tensor, chunks: list[int]) -> torch.Tensor:
        """Run ``inputs`` (split into the original ``chunks``) on a fresh session, in as few frames
        as fit :data:`REPLAY_FRAME_BYTES`; returns the outputs of every position. Sent with the
        session's wire dtype, inputs recorded from a session of the same wire dtype arrive
        unchanged (quantizing is idempotent and blocks never straddle positions)."""
        per_position = inputs[:, :1].numel() * inputs.element_size()
        outputs, group, start = [], [], 0
        for i, length in enumerate(chunks):
            group.append(length)
            last = i == len(chunks) - 1
            if last or (sum(group) + chunks[i + 1]) * per_position > REPLAY_FRAME_BYTES:
                n = sum(group)
                outputs.append(await self._send(session, inputs[:, start : start + n], None, start, group))
                start, group = start + n, []
        return torch.cat(outputs, dim=1)

    def rewind(self, position: int) -> None:
        """Forget the positions from ``position`` on (drafted tokens that were not kept): the
        histories are cut now, each server's cache at the next step (which starts there)."""
        if self._broken:
            raise SwarmError("this inference chain failed earlier; open a new one")
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot rewind a chain at position {self.position} to {position}")
        for session in self.sessions:
            session.history.truncate(position)
            if self.verifier is not None:
                session.outputs.truncate(position)
                session.verified_to = min(session.verified_to, position)
                if session.checker is not None and session.checking is None and session.checker.position > position:
                    session.checker.rewind(position)
        if self.verifier is not None:
            self.verifier.rewound(position)
        self.position = position

    async def replace_banned(self) -> None:
        """Move the spans of servers banned since they opened (caught lying: see
        :mod:`swarm.p2p.checking`) to other servers, their caches rebuilt from the history."""
        banned = self.client.ledger.banned()
        i = 0
        while i < len(self.sessions):
            session = self.sessions[i]
            if session.span.peer_id not in banned:
                i += 1
                continue
            await session.reset()
            if self.verifier is not None:
                await self.verifier.forget(session)
            history = session.history
            failure = SpanFailure(session.span.peer_id, SwarmError("caught lying"))
            replacement, _ = await self._take_over(session.span.start, session.span.end, history.inputs,
                                                   list(history.step_lengths), failure)
            self.sessions[i : i + 1] = replacement
            i += len(replacement)

    async def step(
        self, hidden: torch.Tensor, hypo_ids: torch.Tensor | None = None, per_position: bool = False
    ) -> torch.Tensor:
        """``hidden: [batch, seq, hidden]`` through every span; returns the last span's output.
        ``per_position``: each position computed as its own decode step would be (a speculative
        verification; recorded in the histories as steps of one position, so a replay is too).

        A step that raises (or is cancelled) leaves the spans before the failure one step ahead of
        the others, so the chain refuses further steps."""
        if self._broken:
            raise SwarmError("this inference chain failed earlier; open a new one")
        if per_position and (hypo_ids is not None or hidden.shape[1] > MAX_VERIFY):
            raise ValueError(f"a per-position step takes at most {MAX_VERIFY} positions and reorders no rows")
        self._broken = True
        began = time.monotonic()
        dtype, x, i = hidden.dtype, hidden, 0
        step_id = uuid.uuid4().hex[:16]
        direct = False  # after a push run went wrong: the client sends this step to each server itself
        failed_over = False  # this step's time says nothing about the next one's
        grace = FIRST_PUSH_GRACE if self._last_step_time is None else max(PUSH_GRACE, 4 * self._last_step_time)
        grace = min(grace * max(1, hidden.shape[1]), self.client.cfg.step_timeout)  # per token; a long step may take long
        while i < len(self.sessions):
            session = self.sessions[i]
            packed, sent = received(x, session.wire)  # sent: exactly what the server decodes
            try:
                route = None if direct else self._route_after(i)
                await self._write_step(session, packed, hypo_ids, self.position, step_id, route=route,
                                       per_position=per_position)
                if route is None:
                    j, outputs = i, [await self._read_output(session, step_id, x.shape)]
                else:
                    try:
                        j, outputs = await self._read_pushed(i, step_id, x.shape, grace)
                    except _PushLost as lost:
                        failed_over = True
                        self._lost_pushes += lost.overdue  # a server that failed is not a lost push
                        if self._lost_pushes >= MAX_LOST_PUSHES:
                            log.warning("%s, %d times in a row: this chain stops asking servers to push", lost, self._lost_pushes)
                        else:
                            log.info("%s; sending the step to each server directly", lost)
                        direct = True
                        continue
            except SpanFailure as failure:
                failed_over = True
                self.client.ban(failure.peer_id)
                await session.reset()
                if not self.recover:
                    raise SwarmError(f"{_short(failure.peer_id)} failed: {failure}") from failure
                inputs, chunks = session.history.replay(sent, hypo_ids, per_position)
                replacement, out = await self._take_over(session.span.start, session.span.end, inputs, chunks, failure)
                self.sessions[i : i + 1] = replacement
                if self.verifier is not None:  # what it returned unchecked, against the replay
                    self.verifier.compare_replay(session, inputs, out, hypo_ids, replacement)
                    await self.verifier.left(session)
                i += len(replacement)
                x = out[:, -hidden.shape[1] :]
                continue
            x = sent
            for done, out in zip(self.sessions[i : j + 1], outputs):
                self.client.unban(done.span.peer_id)
                # the others' inputs came by push: as the trail holds them
                done.record(x, out if self.verifier is not None else None, hypo_ids, per_position)
                x = out
            i = j + 1
        self.position += hidden.shape[1]
        if not failed_over:  # the time of a token of a step that went as it should
            self._last_step_time = (time.monotonic() - began) / max(1, hidden.shape[1])
            if self._lost_pushes < MAX_LOST_PUSHES:
                self._lost_pushes = 0
        self._broken = False
        if self.verifier is not None:
            await self.verifier.after_step()  # Rewound: a liar's outputs are forgotten, the chain ready
        return x.to(dtype)

    async def settle(self) -> None:
        """Check what is not yet checked, the checks in the background finished first (see
        :meth:`~swarm.p2p.checking.ChainVerifier.settle`); raises Rewound as :meth:`step`."""
        if self.verifier is not None:
            await self.verifier.settle()

    async def _take_over(self, start: int, end: int, inputs, chunks, failure: SpanFailure):
        """Open sessions covering blocks ``[start, end)`` on the best servers not banned and, when
        there is history, rebuild their caches from it (``inputs`` split into ``chunks``). Retries
        with growing delays until ``wait_timeout``; then raises :class:`SwarmError` naming the
        blocks. Returns the new sessions and the last one's outputs for every replayed position."""
        began = time.monotonic()
        deadline = began + self.client.cfg.wait_timeout
        delay, last = 0.0, failure
        while True:
            opened: list[SpanSession] = []
            try:
                spans = await self.client.route(start, end, cache_tokens=self.batch * self.max_length, wait=False,
                                                exclude=self.exclude)
                x = inputs
                for span in spans:
                    session = await self._open_span(span)
                    opened.append(session)
                    if x is not None:
                        out = await self._replay(session, x, chunks)
                        session.history = SpanHistory.from_replay(received(x, session.wire)[1], chunks)
                        if self.verifier is not None:  # a new server: what it replayed is checked too
                            session.outputs = SpanHistory.from_replay(out, chunks)
                            session.unchecked_steps = len(chunks)
                        x = out
                log.warning(
                    "recovered blocks %d:%d: %s failed (%s); %s took over%s in %.2f s",
                    start, end, _short(failure.peer_id), failure,
                    ", ".join(f"{_short(s.peer_id)} ({s.start}:{s.end})" for s in spans),
                    f" after replaying {inputs.shape[1]} positions" if inputs is not None else "",
                    time.monotonic() - began,
                )
                return opened, x
            except NoRouteError as exc:
                last = exc
            except SpanFailure as exc:
                self.client.ban(exc.peer_id)
                last = exc
            except BaseException:  # refused, cancelled: free what we opened, then give up
                for session in opened:
                    await session.reset()
                raise
            for session in opened:
                await session.reset()
            left = deadline - time.monotonic()
            if left <= 0:
                raise SwarmError(
                    f"blocks {start}:{end} lost {_short(failure.peer_id)} and no other server "
                    f"could take them over within {self.client.cfg.wait_timeout:g} s (last error: {last}); "
                    f"serve them with `swarm serve --blocks {start}:{end} --initial-peers ...`"
                )
            await asyncio.sleep(min(delay, left))
            delay = min(max(2 * delay, 0.25), 4.0)

    async def close(self) -> None:
        """Send every server an explicit close (so it frees the cache at once)."""
        if self.verifier is not None:
            await self.verifier.close()
        for session in self.sessions:
            if session.checker is not None:
                await session.checker.close()
                session.checker = None
            try:
                await write_frame(session.stream, Frame("close"), timeout=2)
                deadline = time.monotonic() + 2
                while (await session.next_frame(max(0.0, deadline - time.monotonic()))).kind != "closed":
                    pass  # late answers to earlier steps come first
            except (P2PError, WireError):
                pass
            finally:
                await session.close()
        self.sessions = []


    async def abort(self) -> None:
        """Reset every session (after a step cut half-way: the streams may hold half a frame;
        the servers end the sessions as failed ones, freeing their caches at once)."""
        if self.verifier is not None:
            await self.verifier.close()
        for session in self.sessions:
            if session.checker is not None:
                await session.checker.abort()
                session.checker = None
            await session.reset()
        self.sessions = []
