"""A server's inference sessions: the ``inference`` and ``push`` protocols.

``inference``: one stream per session — ``open`` (range, batch, max_length; the KV cache is
allocated from the shared budget, or ``cache_full`` is answered at once; optionally the adapter
the session's steps run with, its named tensors after the frame's own fields, see
:func:`~swarm.p2p.wire.adapter_fields`), then ``step`` frames
(hidden states and the global position of their first token), then an explicit ``close``. A
stream that ends without ``close`` is a failure (a killed peer looks like a clean end of stream).
A step may carry a ``route`` (the next servers of the client's chain and their session ids): the
server then hands its output straight to the next one over ``push``, carrying along the outputs
of the servers before it in this run (the ``trail``), and does not reply. The server that ends
the run (the chain's last, or one that cannot push) replies to the client with its output and
the trail, so a token costs one message per server plus one back to the client, and no process
wakes up while the next one computes; the client still gets every output (its history for
failover) and sends a step itself wherever a run did not finish.

The open may name the session's wire dtype (``wire``, see :mod:`swarm.p2p.compression`): the
server sends its outputs that way, and pushes them with the wire dtype the route names for the
next session (that session's own). Whatever arrives is decoded by its own
table entry and computed in the server's dtype; outputs of earlier servers carried along (the
trail, and a pushed step's own input) are sent on exactly as they arrived, so the client records
what each server really received.

``push``: steps from the previous server of a chain, fed into the named session's inbox, where
they meet the client's own frames (a step seen twice is answered from the last step). A session
whose inbox is full drops pushed steps at once (the client sends them itself after its grace), so
one busy session never holds up the others sharing a push stream.

What a stranger can make a server hold is bounded (see :class:`SessionLimits`): sessions and cache
tokens per peer, bytes of frames in flight (``FrameBudget``), a deadline for every frame from its
first byte, the first step within ``open_timeout`` of the open, and adapter bytes: at most
``max_adapter_bytes`` per session, ``peer_session_adapter_memory`` for one peer's sessions together
and ``session_adapter_memory`` for all (``busy`` beyond those), each adapter checked against the blocks it
is for (``bad_request`` naming the first tensor that does not fit). A session whose stream ends, or
that is closed, stops its computation before the next block, and its memory is freed however it
ends. Tensor work (allocating, zeroing and freeing caches, rewinding) runs off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import torch

from swarm.cache.kv import CacheFullError
from swarm.engine.adapters import AdapterSpec, check_tensors
from swarm.engine.checkpoint import PREFILL_CHUNK, BlockRange, StepCancelled
from swarm.engine.steps import check_chunks, check_hidden, run_step
from swarm.p2p import protocols
from swarm.p2p.host import P2PError, P2PTimeoutError, StreamClosedError
from swarm.p2p.adapter_store import read_adapter_field, tensor_bytes
from swarm.p2p.compression import SESSION_WIRES, pack_off_loop, packed_nbytes, session_wire, wire_of_form
from swarm.p2p.limits import FrameBudget, FrameBudgetError, Grant
from swarm.p2p.tasks import Tasks
from swarm.p2p.wire import (
    BAD_REQUEST,
    BUSY,
    CACHE_FULL,
    MAX_TRAIL,
    SERVER_ERROR,
    SESSION_EXPIRED,
    UNKNOWN_ADAPTER,
    Frame,
    WireError,
    pump_frames,
    read_frame,
    write_frame,
)

log = logging.getLogger("swarm.server")

PUSH_TIMEOUT = 10.0
PUSH_RETRY = 30.0  # seconds before connecting again to a peer that could not be pushed to
INBOX_FRAMES = 8  # steps queued per session; beyond that its client stream waits (pushes are dropped)
CARRY_BYTES = 4 * 2**20  # outputs up to this size travel along a push instead of each going to the client
OPEN_FRAME_BYTES = 1 << 16  # an open frame's own fields (its adapter's tensors come on top)


class SessionEnded(Exception):
    """A session ends for a reason its client should hear (``code``: see the wire's error codes)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class _Session:
    """An open inference session: its blocks, KV cache, adapter (tensors, spec, and their bytes
    in the adapter budget), inbox of steps (from the client's stream and pushed by the previous
    server) and the last step run (to answer a repeat of it)."""

    id: str
    peer: str
    blocks: BlockRange
    kv: object
    adapter: dict[str, torch.Tensor] | None = None
    spec: AdapterSpec | None = None
    adapter_grant: Grant | None = None
    opened: float = field(default_factory=time.monotonic)
    inbox: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(INBOX_FRAMES))
    stop: threading.Event = field(default_factory=threading.Event)  # its work is no longer wanted
    computing: object = None  # the concurrent future of its step being computed, if any
    steps: int = 0
    last_step: str | None = None
    last_position: int = -1
    last_input: torch.Tensor | None = None
    last_output: torch.Tensor | None = None
    last_reordered: bool = False
    wire: str = "float32"  # how its outputs are sent (see swarm.p2p.compression)
    ends_at: float | None = None  # set when the server moved away from its blocks (see Sessions.drain)


@dataclass(eq=False)
class _PushLink:
    """A stream to the next server of chains, for pushed steps (one writer at a time)."""

    stream: object = None
    connecting: asyncio.Task | None = None
    retry_at: float = 0.0  # after a failed connection, no new one before this (monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Sessions:
    """The inference sessions of one :class:`~swarm.p2p.server.BlockServer` (which owns this and
    calls :meth:`close` when it stops)."""

    def __init__(self, server):
        self.server = server
        self.cfg = server.cfg
        self.live: dict[str, _Session] = {}
        self._push_links: dict[str, _PushLink] = {}
        self._opening: Counter = Counter()  # peer -> sessions being allocated now
        self._tasks = Tasks(log)  # connections to push links being opened
        # adapter bytes sessions hold, per peer and in total (the same bookkeeping as frames in flight)
        self.adapters = FrameBudget(
            self.cfg.session_adapter_memory, min(self.cfg.peer_session_adapter_memory, self.cfg.session_adapter_memory)
        )

    # ---- accounting ------------------------------------------------------------------------

    def held_by(self, peer: str) -> int:
        """Sessions ``peer`` has open here, or is opening."""
        return self._opening[peer] + sum(1 for s in self.live.values() if s.peer == peer)

    async def close(self) -> None:
        """Stop every session's work and connection attempts (the host closes after this)."""
        for session in self.live.values():
            session.stop.set()
        await self._tasks.close()

    async def drain(self, blocks: BlockRange, timeout: float) -> None:
        """Let the sessions running on ``blocks`` (a range this server no longer serves) finish
        within ``timeout`` seconds, then end the rest with ``session_expired`` (their clients
        fail over and replay)."""
        modules = {id(b) for b in blocks.blocks}
        deadline = time.monotonic() + timeout
        while True:
            left = [s for s in self.live.values() if id(s.blocks.blocks[0]) in modules]
            if not left:
                return
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        for session in left:
            session.ends_at = time.monotonic()  # noticed at its next wake-up, or now:
            with contextlib.suppress(asyncio.QueueFull):
                session.inbox.put_nowait(("client", SessionEnded(
                    f"this server moved to blocks {self.server.start_block}:{self.server.end_block}; "
                    "continue elsewhere", SESSION_EXPIRED)))

    # ---- inference -------------------------------------------------------------------------

    async def handle_inference(self, stream) -> None:
        server, cfg = self.server, self.cfg
        peer = stream.remote_peer_id
        session, reader, ended = None, None, "closed"
        adapter = spec = grant = None
        try:
            opening = await read_frame(
                stream, timeout=cfg.request_timeout, max_frame=OPEN_FRAME_BYTES + cfg.max_adapter_bytes,
                frame_timeout=cfg.request_timeout, budget=server.frames,
            )
            try:
                if opening.kind != "open":
                    raise WireError(f"an inference stream must start with an open frame, got {opening.kind}")
                blocks = server.check_range(opening["start"], opening["end"])
                batch, max_length = opening["batch"], opening["max_length"]
                if not (isinstance(batch, int) and 1 <= batch <= cfg.max_batch and isinstance(max_length, int)
                        and max_length >= 1):
                    raise ValueError(f"batch must be 1..{cfg.max_batch} and max_length a positive integer")
                server.check_context(max_length, "max_length")
                wire = session_wire(opening.fields.get("wire"))
                fork = _fork_field(opening.fields.get("fork"), batch, max_length)
                adapter, spec, grant = self._take_adapter(opening, blocks, peer)
            finally:
                opening.release()  # its adapter tensors, if any, are counted in self.adapters now
            if self.held_by(peer) >= cfg.max_peer_sessions:
                raise SessionEnded(
                    f"you hold {cfg.max_peer_sessions} sessions here, the most one peer may; close some first", BUSY
                )
            self._opening[peer] += 1
            try:
                kv = await server.in_memory_thread(
                    blocks.open_session, batch, max_length, server.budget, peer, server.peer_cache_tokens,
                    orphan=lambda kv: kv.close(),  # opened for a handler that was cancelled meanwhile
                )
            finally:
                self._opening[peer] -= 1
                if not self._opening[peer]:
                    del self._opening[peer]
            session = _Session(uuid.uuid4().hex, peer, blocks, kv, adapter, spec, grant, wire=wire)
            if fork is not None:  # refused: the session is freed below like any that ends
                await self._fork(session, *fork)
            self.live[session.id] = session
            server.sessions_changed()
            log.info(
                "session %s opened by %s: blocks %d:%d, batch %d, max_length %d, wire %s, adapter %s "
                "(%d cache tokens left)",
                session.id[:8], peer[-8:], blocks.start, blocks.end, batch, max_length, wire,
                f"of {len(adapter)} tensors, {grant.nbytes} bytes" if adapter else "none", server.budget.tokens_left,
            )
            await write_frame(stream, Frame("opened", {"session_id": session.id}), timeout=cfg.request_timeout)

            async def put(item) -> None:
                if isinstance(item, BaseException) or item.kind == "close":
                    session.stop.set()  # whatever it is computing is no longer wanted
                await session.inbox.put(("client", item))

            # the client's frames (and the error that ends them) meet pushed steps in the inbox
            reader = asyncio.create_task(
                pump_frames(stream, put, cfg.max_frame, frame_timeout=cfg.request_timeout, budget=server.frames)
            )
            await self._serve(session, stream)
        except CacheFullError as exc:
            ended = "refused"
            await server.reply_error(stream, exc, CACHE_FULL)
        except SessionEnded as exc:
            ended = exc.code
            await server.reply_error(stream, exc, exc.code)
        except WireError as exc:
            ended = exc.code
            await server.reply_error(stream, exc, exc.code)
        except (ValueError, TypeError) as exc:
            ended = BAD_REQUEST
            await server.reply_error(stream, exc, BAD_REQUEST)
        except (RuntimeError, MemoryError) as exc:  # our own failure (out of memory, a kernel): fail over
            ended = SERVER_ERROR
            log.exception("session %s failed", session.id[:8] if session else "?")
            await server.reply_error(stream, exc, SERVER_ERROR)
        except StreamClosedError:
            ended = "left without closing"
        except P2PTimeoutError as exc:
            ended = f"stalled ({exc})"
        finally:
            if reader is not None:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            if session is None and grant is not None:
                grant.release()  # refused after its adapter was taken (no room, too many sessions)
            if session is not None:
                await self._free(session)
                log.info(
                    "session %s of %s ended (%s) after %d steps and %.1f s",
                    session.id[:8], peer[-8:], ended, session.steps, time.monotonic() - session.opened,
                )

    async def _fork(self, session: _Session, parent_id: str, positions: int) -> None:
        """Start ``session`` as a copy of the first ``positions`` cached positions of another
        session of the same peer on the same blocks (another continuation of one prefix: the
        choices of one request share their prefill). Copied on the compute thread, in turn with
        the parent's steps. ``ValueError`` (a bad request; the client opens plainly and replays)
        when there is no such session or it cannot be copied."""
        parent = self.live.get(parent_id)
        if parent is None or parent.peer != session.peer or parent.stop.is_set():
            raise ValueError("fork: no open session of yours by that id here")
        if (parent.blocks.start, parent.blocks.end) != (session.blocks.start, session.blocks.end):
            raise ValueError(f"fork: that session holds blocks {parent.blocks.start}:{parent.blocks.end}")
        if parent.adapter or session.adapter or parent.kv.batch != 1:
            raise ValueError("fork: only sessions of batch 1 without adapters are copied")
        await self.server.compute(_copy_prefix, parent.kv, session.kv, positions, peer=session.peer)

    def _take_adapter(
        self, frame: Frame, blocks: BlockRange, peer: str
    ) -> tuple[dict[str, torch.Tensor] | None, AdapterSpec | None, Grant | None]:
        """The adapter an open frame carries for its session's steps: its tensors, spec and their
        bytes taken from the adapter budget; (None, None, None) without one. Raises ``WireError``
        for tensors without names, ``ValueError`` for an adapter these blocks cannot apply or over
        ``max_adapter_bytes`` (a bad request), :class:`SessionEnded` ``busy`` when the peer's
        (or everyone's) adapters here would exceed their bounds, ``unknown_adapter`` for an
        adapter named by its digest alone (sessions do not share kept adapters: send the tensors)."""
        cfg = self.cfg
        digest, spec, tensors = read_adapter_field(frame, 0)  # an open has no tensors of its own
        if digest is None:
            return None, None, None
        if tensors is None:
            raise SessionEnded("an inference session takes its adapter's tensors with its open: send them", UNKNOWN_ADAPTER)
        nbytes = tensor_bytes(tensors)
        if nbytes > cfg.max_adapter_bytes:
            raise ValueError(
                f"adapter tensors of {nbytes} bytes exceed the {cfg.max_adapter_bytes} bytes (max_adapter_bytes) "
                f"one session may carry here"
            )
        check_tensors(blocks, tensors)
        if not tensors:
            return None, None, None
        try:
            grant = self.adapters.take(peer, nbytes)
        except FrameBudgetError:
            raise SessionEnded(
                f"adapters of {nbytes} more bytes do not fit: your sessions hold {self.adapters.used(peer)} bytes "
                f"of adapters here (at most {self.adapters.per_peer}), all sessions {self.adapters.used()} "
                f"(at most {self.adapters.total}); close some sessions first", BUSY,
            ) from None
        return tensors, spec, grant

    async def _serve(self, session: _Session, stream) -> None:
        """Run the session's steps until it is closed; raises what ends it otherwise."""
        cfg = self.cfg
        active = None  # when the client last sent a frame or a step ran; None until the first step
        while True:
            now = time.monotonic()
            lifetime_left = session.opened + cfg.session_timeout - now
            if lifetime_left <= 0:
                raise SessionEnded(f"sessions last at most {cfg.session_timeout:g} s here; open a new one", SESSION_EXPIRED)
            if session.ends_at is not None and now >= session.ends_at:
                raise SessionEnded("this server moved to other blocks; continue elsewhere", SESSION_EXPIRED)
            if active is None:  # the room a session reserves returns quickly if it is never used
                idle_left = session.opened + min(cfg.open_timeout, cfg.idle_timeout) - now
            else:
                idle_left = active + cfg.idle_timeout - now
            if idle_left <= 0:
                waited = "no step since the session opened" if active is None else "no step"
                raise SessionEnded(f"{waited} for {now - (active or session.opened):.0f} s: session closed", SESSION_EXPIRED)
            try:
                source, frame = await asyncio.wait_for(session.inbox.get(), min(idle_left, lifetime_left))
            except asyncio.TimeoutError:
                continue  # the checks above end the session
            if isinstance(frame, BaseException):
                raise frame
            try:
                if source == "client":
                    active = time.monotonic()
                if frame.kind == "close":
                    await write_frame(stream, Frame("closed"), timeout=cfg.request_timeout)
                    return
                if frame.kind != "step":
                    raise WireError(f"expected a step or close frame, got {frame.kind}")
                try:
                    output, fresh = await self._step(session, frame, source)
                except StepCancelled:
                    continue  # closed or gone: the inbox holds what ends the session
                except (ValueError, TypeError, RuntimeError, WireError) as exc:
                    if source == "client":
                        raise
                    log.info("ignored a pushed step for session %s: %s", session.id[:8], exc)
                    continue
                if output is None:
                    continue  # a pushed copy of a step already run: the client's own copy decides
                active = time.monotonic()
                await self._answer(session, stream, frame, source, output, fresh)
            finally:
                frame.release()

    async def _answer(self, session: _Session, stream, frame: Frame, source: str, output, fresh: bool) -> None:
        # outputs of earlier servers that reached here by push and the client has not seen, sent
        # on as they arrived (the client keeps what each server received, for failover)
        n = len(frame.tensors)
        owed = [await _as_received(frame, i) for i in range(n - len(_step_parts(frame)[2]), n)]
        if source == "push":
            owed.append(await _as_received(frame, 0))
        carry = sum(packed_nbytes(t) for t in owed) + output.numel() * output.element_size() <= CARRY_BYTES
        if fresh and carry and await self._push_step(frame, output, owed):
            return  # the outputs travel on; the chain's last server (or one that cannot push) replies
        # "to" tells the client which copy this answers: after a failover it sends its own copy
        # and must not take an answer to a push from the server it replaced
        fields = {"step_id": frame["step_id"], "to": source, "trail": len(owed)}
        output = await pack_off_loop(output, session.wire)
        await write_frame(stream, Frame("output", fields, [output, *owed]), timeout=self.cfg.request_timeout)

    async def _step(self, session: _Session, frame: Frame, source: str) -> tuple[torch.Tensor | None, bool]:
        """Run a step frame on ``session``; returns (output, whether it was computed now).

        A step seen already (same step id and position) is not run twice: the client's copy of it
        gets the same output if its input is the same, else (an upstream server was replaced and
        computed it anew) the cache rewinds and the step is recomputed; a pushed copy gets
        (None, False): it never overrides what the client sent."""
        hidden, hypo_ids, trail = _step_parts(frame)
        if source == "client" and trail:
            raise ValueError("only pushed steps carry a trail of earlier outputs")
        position = frame["position"]
        if not isinstance(position, int):
            raise ValueError(f"a step's position must be an integer, got {position!r}")
        chunks = check_chunks(frame.fields.get("chunks"), hidden)
        check_hidden(session.blocks, hidden)
        self.server.check_context(position + hidden.shape[1], "the step's end position")
        repeat = frame["step_id"] == session.last_step and position == session.last_position
        if repeat and source == "push":
            return None, False
        if not repeat and position != session.kv.length:
            raise ValueError(f"step starts at position {position} but this session has {session.kv.length} positions cached")
        session.last_step = None  # until this step has run
        plain = not repeat and hypo_ids is None and len(chunks) == 1 and not session.adapter
        batch_one = hidden.shape[0] == 1 and 1 <= hidden.shape[1] <= PREFILL_CHUNK
        if plain and session.kv.batch == 1 and batch_one:  # may run batched with others
            output, fresh = await self.server.compute_step(session, hidden)
        else:
            output, fresh = await self.server.compute(
                run_step, session.blocks, hidden, session.kv, hypo_ids, chunks,
                session.last_input if repeat else None, session.last_output, position if repeat else None,
                session.last_reordered, session.stop.is_set, session.adapter, session.spec, session=session,
                peer=session.peer,
            )
        session.last_step, session.last_position = frame["step_id"], position
        session.last_input, session.last_output = hidden, output
        session.last_reordered = hypo_ids is not None
        session.steps += fresh
        if fresh:
            self.server.served(hidden.shape[0] * hidden.shape[1])
        return output, fresh

    async def _free(self, session: _Session) -> None:
        """Stop the session's work and give its memory back, off the event loop, however it ended."""
        session.stop.set()
        self.live.pop(session.id, None)
        try:
            if session.computing is not None and not session.computing.done():
                await asyncio.wait([asyncio.wrap_future(session.computing)])  # stops before its next block
            await self.server.in_memory_thread(session.kv.close)
        finally:
            session.kv.close()  # idempotent: here only if the wait above was cancelled
            session.last_input = session.last_output = None
            session.adapter = None
            if session.adapter_grant is not None:
                session.adapter_grant.release()
            while not session.inbox.empty():
                _, item = session.inbox.get_nowait()
                if isinstance(item, Frame):
                    item.release()
            self.server.sessions_changed()

    # ---- push ------------------------------------------------------------------------------

    async def handle_push(self, stream) -> None:
        """Steps pushed by the previous server of a chain, for sessions held here. Unknown sessions
        (closed meanwhile) and sessions whose inbox is full are skipped: their clients send the
        step themselves. The stream is reset when this ends (idle for the idle timeout, a bad
        frame), so the pusher's next write fails and it falls back to the client instead of
        pushing into the void."""
        server, cfg = self.server, self.cfg
        try:
            while True:
                frame = await read_frame(
                    stream, timeout=cfg.idle_timeout, max_frame=cfg.max_frame,
                    frame_timeout=cfg.request_timeout, budget=server.frames,
                )
                try:
                    if frame.kind != "step" or not isinstance(frame.fields.get("session"), str):
                        raise WireError(f"expected a step frame naming a session, got {frame.kind}")
                    session = self.live.get(frame["session"])
                    if session is None or session.stop.is_set():
                        log.debug("a pushed step for unknown session %s: skipped", str(frame["session"])[:8])
                        continue
                    try:
                        session.inbox.put_nowait(("push", frame))
                        frame = None  # the session owns it now
                    except asyncio.QueueFull:
                        log.info("session %s takes no more steps now: a pushed step dropped", session.id[:8])
                finally:
                    if frame is not None:
                        frame.release()
        except WireError as exc:
            log.info("bad frame on a push stream from %s: %s", stream.remote_peer_id[-8:], exc)
        except (P2PTimeoutError, StreamClosedError):
            pass
        finally:
            await stream.reset()

    async def _push_step(self, frame: Frame, output: torch.Tensor, owed: list) -> bool:
        """Send ``output`` straight to the next server of the step's route (so the chain needs no
        round trip through the client per server), with ``owed``: earlier outputs the client has
        not seen, which the server that finally replies hands it (as the frame carries them:
        tensors or :class:`~swarm.p2p.compression.Int8Blocks`). ``output`` goes with the wire
        dtype the route names for the next session. False if there is no next server
        or it cannot be reached now (the client then sends it). The first push to a peer only
        starts connecting."""
        route = frame.fields.get("route")
        if not route or not isinstance(route, list) or not isinstance(route[0], dict):
            return False
        nxt = route[0]
        peer, session, wire = nxt.get("peer"), nxt.get("session"), nxt.get("wire", "float32")
        if not (isinstance(peer, str) and isinstance(session, str)) or peer == self.server.host.peer_id:
            return False
        if wire not in SESSION_WIRES:
            return False
        if peer not in self.server.table:
            return False  # only to servers of this swarm, never wherever a route points
        if peer not in self._push_links and len(self._push_links) >= MAX_PUSH_LINKS:
            for stale in [p for p, link in self._push_links.items() if link.stream is None and link.connecting is None]:
                del self._push_links[stale]  # links that failed make room
            if len(self._push_links) >= MAX_PUSH_LINKS:
                return False
        link = self._push_links.setdefault(peer, _PushLink())
        if link.stream is None:  # not connected yet (connecting now, or failed lately)
            if link.connecting is None and time.monotonic() >= link.retry_at:
                link.connecting = self._tasks.spawn(self._connect_push(peer, link), f"push link to {peer[-8:]}")
            return False
        fields = {
            "session": session, "step_id": frame["step_id"], "position": frame["position"],
            "route": route[1:MAX_TRAIL], "trail": len(owed),
        }
        hypo_ids = _step_parts(frame)[1]
        output = await pack_off_loop(output, wire)
        tensors = [output, *([] if hypo_ids is None else [hypo_ids]), *owed]  # hypo_ids travel along
        try:
            async with link.lock:
                await write_frame(link.stream, Frame("step", fields, tensors), timeout=PUSH_TIMEOUT)
            return True
        except P2PError as exc:
            log.info("push to %s failed (%s); the client sends that step itself", peer[-8:], exc)
            stream, link.stream = link.stream, None
            if stream is not None:
                await stream.reset()
            return False

    async def _connect_push(self, peer: str, link: _PushLink) -> None:
        try:
            link.stream = await self.server.host.open_stream(peer, protocols.PUSH, timeout=PUSH_TIMEOUT)
        except P2PError as exc:
            log.info("cannot push to %s (retrying in %g s): %s", peer[-8:], PUSH_RETRY, exc)
            link.retry_at = time.monotonic() + PUSH_RETRY
        finally:
            link.connecting = None


MAX_PUSH_LINKS = 256  # distinct next servers this server keeps push streams to


def _fork_field(value, batch: int, max_length: int) -> tuple[str, int] | None:
    """An open's ``fork`` (``{"session": id, "positions": n}``) checked; None without one."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("session"), str) or not isinstance(value.get("positions"), int):
        raise ValueError("fork must be {session: the id of a session of yours here, positions: a count}")
    positions = value["positions"]
    if batch != 1 or not 1 <= positions <= max_length:
        raise ValueError(f"fork: positions must be 1..max_length ({max_length}) in a session of batch 1")
    return value["session"], positions


def _copy_prefix(source, target, positions: int) -> None:
    """``target``'s cache becomes ``source``'s first ``positions`` positions (compute thread)."""
    if positions > source.length or not source.keys:
        raise ValueError(f"fork: that session has {source.length} positions cached, not {positions}")
    for src, dst in ((source.keys, target.keys), (source.values, target.values)):
        for a, b in zip(src, dst):
            b[:, :, :positions].copy_(a[:, :, :positions])
    target.length = positions


async def _as_received(frame: Frame, i: int):
    """Tensor ``i`` of a received ``frame``, to send on exactly as it arrived (see
    :func:`~swarm.p2p.compression.wire_of_form`)."""
    form = frame.forms[i] if i < len(frame.forms) else ""
    return await pack_off_loop(frame.tensors[i], wire_of_form(form))


def _step_parts(frame: Frame) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """A step frame's tensors: ``[hidden, hypo_ids?, *trail]`` where ``trail`` (``fields["trail"]``
    of them, pushed steps only) are the outputs of the servers before this one that the client
    has not received yet, each shaped like ``hidden``."""
    n = frame.fields.get("trail", 0)
    if not isinstance(n, int) or not 0 <= n <= MAX_TRAIL or len(frame.tensors) - n not in (1, 2):
        raise ValueError(f"a step frame carries hidden states, optional hypo_ids and a trail of 0..{MAX_TRAIL} tensors")
    hidden = frame.tensors[0]
    hypo_ids = frame.tensors[1] if len(frame.tensors) - n == 2 else None
    trail = frame.tensors[len(frame.tensors) - n :] if n else []
    if any(t.shape != hidden.shape or not t.is_floating_point() for t in trail):  # dtypes may differ by server
        raise ValueError("a step's trail tensors must be hidden states shaped like its own")
    return hidden, hypo_ids, trail
