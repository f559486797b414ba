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

Threads: a session is opened and freed here, on the event loop; in between, its steps (and every
pushed step) are read, queued for the compute thread and answered or pushed on by
:class:`~swarm.p2p.session_loop.SessionLoop` on the libp2p thread, so a hidden state crosses
threads once each way per hop.

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
import trio

from swarm.cache.kv import CacheFullError
from swarm.engine.adapters import AdapterSpec, check_tensors
from swarm.engine.checkpoint import BlockRange
from swarm.p2p.adapter_store import read_adapter_field, tensor_bytes
from swarm.p2p.compression import session_wire
from swarm.p2p.host import P2PError, P2PTimeoutError, StreamClosedError
from swarm.p2p.limits import FrameBudget, FrameBudgetError, Grant
from swarm.p2p.session_loop import SessionEnded, SessionLoop, empty_inbox, end_session
from swarm.p2p.wire import (
    BAD_REQUEST,
    BUSY,
    CACHE_FULL,
    SERVER_ERROR,
    SESSION_EXPIRED,
    UNKNOWN_ADAPTER,
    Frame,
    WireError,
    read_frame,
    write_frame,
)

log = logging.getLogger("swarm.server")

INBOX_FRAMES = 8  # steps queued per session; beyond that its client stream waits (pushes are dropped)
SERVE_END_WAIT = 10.0  # seconds a session's memory waits for its cancelled loop to end before it is freed
OPEN_FRAME_BYTES = 1 << 16  # an open frame's own fields (its adapter's tensors come on top)


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
    inbox: trio.MemorySendChannel = field(init=False)  # (source, frame or error); trio side
    received: trio.MemoryReceiveChannel = field(init=False)
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
    serving: bool = False  # its loop on the libp2p thread started ...
    served: threading.Event = field(default_factory=threading.Event)  # ... and ended

    def __post_init__(self):
        self.inbox, self.received = trio.open_memory_channel(INBOX_FRAMES)


class Sessions:
    """The inference sessions of one :class:`~swarm.p2p.server.BlockServer` (which owns this and
    calls :meth:`close` when it stops)."""

    def __init__(self, server):
        self.server = server
        self.cfg = server.cfg
        self.live: dict[str, _Session] = {}
        self.loop = SessionLoop(self)  # the sessions' steps, on the libp2p thread
        self._opening: Counter = Counter()  # peer -> sessions being allocated now
        # adapter bytes sessions hold, per peer and in total (the same bookkeeping as frames in flight)
        self.adapters = FrameBudget(
            self.cfg.session_adapter_memory, min(self.cfg.peer_session_adapter_memory, self.cfg.session_adapter_memory)
        )

    # ---- accounting ------------------------------------------------------------------------

    def held_by(self, peer: str) -> int:
        """Sessions ``peer`` has open here, or is opening."""
        return self._opening[peer] + sum(1 for s in self.live.values() if s.peer == peer)

    async def close(self) -> None:
        """Stop every session's work (the host closes after this, and with it the sessions'
        loops and the push links' connection attempts, which run on its thread)."""
        for session in self.live.values():
            session.stop.set()

    async def drain(self, blocks: BlockRange, timeout: float) -> None:
        """Let the sessions running on ``blocks`` (a range this server no longer serves) finish
        within ``timeout`` seconds, then end the rest with ``session_expired`` (their clients
        fail over and replay)."""
        deadline = time.monotonic() + timeout
        while True:  # opened on that range (the new one may share its blocks: see placement.load_range)
            left = [s for s in self.live.values() if s.blocks.root is blocks]
            if not left:
                return
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        for session in left:
            session.ends_at = time.monotonic()  # noticed at its next wake-up, or now:
            error = SessionEnded(
                f"this server moved to blocks {self.server.start_block}:{self.server.end_block}; continue elsewhere",
                SESSION_EXPIRED,
            )
            with contextlib.suppress(P2PError):  # the host is closing: the session ends anyway
                self.server.host.run_here_soon(end_session, session, error)

    # ---- inference -------------------------------------------------------------------------

    async def handle_inference(self, stream) -> None:
        server, cfg = self.server, self.cfg
        peer = stream.remote_peer_id
        session, ended = None, "closed"
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
            await server.host.on_libp2p_thread(self.loop.serve, session, stream, what=f"session {session.id[:8]}")
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

    async def _free(self, session: _Session) -> None:
        """Stop the session's work and give its memory back, off the event loop, however it ended."""
        session.stop.set()
        self.live.pop(session.id, None)
        try:
            if session.serving and not session.served.is_set():  # its loop was cancelled: let it end first
                if not await asyncio.to_thread(session.served.wait, SERVE_END_WAIT):
                    log.warning("session %s: its loop did not end within %g s", session.id[:8], SERVE_END_WAIT)
            elif not session.serving:  # pushed frames may wait in an inbox nobody read
                with contextlib.suppress(P2PError):
                    self.server.host.run_here_soon(empty_inbox, session)
            if session.computing is not None and not session.computing.done():
                await asyncio.wait([asyncio.wrap_future(session.computing)])  # stops before its next block
            await self.server.in_memory_thread(session.kv.close)
        finally:
            session.kv.close()  # idempotent: here only if the wait above was cancelled
            session.last_input = session.last_output = None
            session.adapter = None
            if session.adapter_grant is not None:
                session.adapter_grant.release()
            self.server.sessions_changed()

    # ---- push ------------------------------------------------------------------------------

    async def handle_push(self, stream) -> None:
        """Steps pushed by the previous server of a chain: read on the libp2p thread (see
        :meth:`~swarm.p2p.session_loop.SessionLoop.handle_push`). Only servers push: with
        ``--allow-peers``, a peer not on the list is refused."""
        if not self.server.cfg.membership.may_serve(stream.remote_peer_id):
            await self.server.reply_error(stream, WireError("--allow-peers: this peer may not serve in this swarm"), BAD_REQUEST)
            return
        await self.server.host.on_libp2p_thread(self.loop.handle_push, stream, what="push stream")


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
