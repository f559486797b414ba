"""The hot path of inference sessions, on the libp2p thread: a hidden state crosses once each way.

A session is opened on the event loop (:class:`~swarm.p2p.sessions.Sessions`: checks, its
adapter, its KV cache); from its ``opened`` reply until it ends, it lives on the host's trio
thread, where py-libp2p reads and writes its streams. A step frame is read and decoded there,
queued for the compute thread (:class:`~swarm.p2p.scheduler.ComputeQueue`), and its output
written there, to the client or pushed to the next server: libp2p's thread → compute thread →
libp2p's thread, no detour through the event loop (which used to cost four more thread hand-offs
per hop). Steps pushed by the previous server of a chain (``push`` streams) are read on the same
thread and meet the client's own frames in the session's inbox, a trio memory channel.

What the protocols do (steps, repeats, rewinds, routes, trails, wire dtypes) is described in
:mod:`swarm.p2p.sessions`; every wait here has the same deadlines as before, and whatever ends a
session, the event loop frees its memory after :meth:`SessionLoop.serve` returns.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import trio

from swarm.engine.checkpoint import PREFILL_CHUNK, StepCancelled
from swarm.engine.steps import check_chunks, check_hidden, run_step
from swarm.p2p import hop_trace, protocols
from swarm.p2p.bridge import wait_future
from swarm.p2p.compression import SESSION_WIRES, pack_here, packed_nbytes, wire_of_form
from swarm.p2p.host import P2PError, P2PTimeoutError, StreamClosedError
from swarm.p2p.wire import MAX_TRAIL, MAX_VERIFY, SESSION_EXPIRED, Frame, WireError, read_frame_here, write_frame_here

log = logging.getLogger("swarm.server")

PUSH_TIMEOUT = 10.0
PUSH_RETRY = 30.0  # seconds before connecting again to a peer that could not be pushed to
CARRY_BYTES = 4 * 2**20  # outputs up to this size travel along a push instead of each going to the client
MAX_PUSH_LINKS = 256  # distinct next servers this server keeps push streams to


class SessionEnded(Exception):
    """A session ends for a reason its client should hear (``code``: see the wire's error codes)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class _PushLink:
    """A stream to the next server of chains, for pushed steps (one writer at a time; trio side)."""

    stream: object = None
    connecting: bool = False
    retry_at: float = 0.0  # after a failed connection, no new one before this (monotonic)
    lock: trio.Lock | None = None


class SessionLoop:
    """The trio side of a server's inference sessions (see the module's docstring). Everything
    here runs on the host's trio thread."""

    def __init__(self, sessions):
        self.sessions = sessions  # the event loop's side: the open sessions (``live``)
        self.server = sessions.server
        self.cfg = sessions.cfg
        self.push_links: dict[str, _PushLink] = {}

    # ---- a session ---------------------------------------------------------------------------

    async def serve(self, session, stream) -> None:
        """Run ``session``'s steps until it is closed; raises what ends it otherwise. The
        client's frames are read by a task of their own (the error that ends them comes last),
        so a wait for the inbox can time out without cutting a frame in half."""
        error = None
        session.serving = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, session, stream)
                try:
                    await self._serve(session, stream)
                except Exception as exc:  # raised below, outside the nursery (not as a group)
                    error = exc
                nursery.cancel_scope.cancel()
        finally:
            session.stop.set()
            empty_inbox(session)
            session.served.set()  # its loop is over: the event loop may free it
        if error is not None:
            raise error

    async def _pump(self, session, stream) -> None:
        cfg = self.cfg
        while True:
            try:
                frame = await read_frame_here(
                    stream, None, cfg.max_frame, frame_timeout=cfg.request_timeout, budget=self.server.frames
                )
            except Exception as exc:  # WireError, P2PError, or anything else: the session ends on it
                session.stop.set()
                await session.inbox.send(
                    ("client", exc if isinstance(exc, (WireError, P2PError)) else WireError(f"unreadable frame: {exc!r}"))
                )
                return
            if frame.kind == "close":
                session.stop.set()  # whatever it is computing is no longer wanted
            try:
                await session.inbox.send(("client", frame))
            except BaseException:
                frame.release()
                raise

    async def _serve(self, session, stream) -> None:
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
                raise SessionEnded(
                    f"{waited} for {now - (active or session.opened):.0f} s: session closed", SESSION_EXPIRED
                )
            item = None
            with trio.move_on_after(min(idle_left, lifetime_left)):
                item = await session.received.receive()
            if item is None:
                continue  # the checks above end the session
            source, frame = item
            if isinstance(frame, BaseException):
                raise frame
            try:
                if source == "client":
                    active = time.monotonic()
                if frame.kind == "close":
                    await write_frame_here(stream, Frame("closed"), timeout=cfg.request_timeout)
                    return
                if frame.kind != "step":
                    raise WireError(f"expected a step or close frame, got {frame.kind}")
                hop_trace.mark("read")
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

    async def _answer(self, session, stream, frame: Frame, source: str, output, fresh: bool) -> None:
        # outputs of earlier servers that reached here by push and the client has not seen, sent
        # on as they arrived (the client keeps what each server received, for failover)
        n = len(frame.tensors)
        owed = [await _as_received(frame, i) for i in range(n - len(step_parts(frame)[2]), n)]
        if source == "push":
            owed.append(await _as_received(frame, 0))
        carry = sum(packed_nbytes(t) for t in owed) + output.numel() * output.element_size() <= CARRY_BYTES
        if fresh and carry and await self._push_step(frame, output, owed):
            hop_trace.mark("written")
            return  # the outputs travel on; the chain's last server (or one that cannot push) replies
        # "to" tells the client which copy this answers: after a failover it sends its own copy
        # and must not take an answer to a push from the server it replaced
        fields = {"step_id": frame["step_id"], "to": source, "trail": len(owed)}
        output = await pack_here(output, session.wire)
        await write_frame_here(stream, Frame("output", fields, [output, *owed]), timeout=self.cfg.request_timeout)
        hop_trace.mark("written")

    async def _step(self, session, frame: Frame, source: str) -> tuple[torch.Tensor | None, bool]:
        """Run a step frame on ``session``; returns (output, whether it was computed now).

        A step seen already (same step id and position) is not run twice: the client's copy of it
        gets the same output if its input is the same, else (an upstream server was replaced and
        computed it anew) the cache rewinds and the step is recomputed; a pushed copy gets
        (None, False): it never overrides what the client sent."""
        hidden, hypo_ids, trail = step_parts(frame)
        if source == "client" and trail:
            raise ValueError("only pushed steps carry a trail of earlier outputs")
        position = frame["position"]
        if not isinstance(position, int):
            raise ValueError(f"a step's position must be an integer, got {position!r}")
        chunks = check_chunks(frame.fields.get("chunks"), hidden)
        check_hidden(session.blocks, hidden)
        self.server.check_context(position + hidden.shape[1], "the step's end position")
        per_position = _per_position(frame, hidden, hypo_ids, chunks)
        repeat = frame["step_id"] == session.last_step and position == session.last_position
        if repeat and source == "push":
            return None, False
        cut_to = None
        if not repeat and position != session.kv.length:
            if not 0 <= position < session.kv.length:
                raise ValueError(f"step starts at position {position} but this session has {session.kv.length} positions cached")
            if position <= session.last_position:  # a late copy of an older step (a push after a failover)
                raise ValueError(f"a step at position {position} after one at {session.last_position}: steps only move on")
            cut_to = position  # the positions from there on were drafted and not kept: forget them
        session.last_step = None  # until this step has run
        plain = not repeat and hypo_ids is None and len(chunks) == 1 and not session.adapter
        batch_one = hidden.shape[0] == 1 and 1 <= hidden.shape[1] <= PREFILL_CHUNK
        if plain and session.kv.batch == 1 and batch_one:  # may run batched with others
            future = self.server.submit_step(session, hidden, per_position, cut_to)
        else:
            if per_position:  # each position as its own step, one after another: exact by construction
                chunks = [1] * hidden.shape[1]
            future = self.server.submit(
                run_step, session.blocks, hidden, session.kv, hypo_ids, chunks,
                session.last_input if repeat else None, session.last_output, position if repeat else None,
                session.last_reordered, session.stop.is_set, session.adapter, session.spec, cut_to, session=session,
                peer=session.peer,
            )
        hop_trace.mark("queued")
        output, fresh = await wait_future(future)
        hop_trace.mark("resumed")
        session.last_step, session.last_position = frame["step_id"], position
        session.last_input, session.last_output = hidden, output
        session.last_reordered = hypo_ids is not None
        session.steps += fresh
        if fresh:
            self.server.served(hidden.shape[0] * hidden.shape[1])
        return output, fresh

    # ---- push --------------------------------------------------------------------------------

    async def handle_push(self, stream) -> None:
        """Steps pushed by the previous server of a chain, for sessions held here. Unknown sessions
        (closed meanwhile) and sessions whose inbox is full are skipped: their clients send the
        step themselves. The stream is reset when this ends (idle for the idle timeout, a bad
        frame), so the pusher's next write fails and it falls back to the client instead of
        pushing into the void."""
        server, cfg = self.server, self.cfg
        try:
            while True:
                frame = await read_frame_here(
                    stream, cfg.idle_timeout, cfg.max_frame, frame_timeout=cfg.request_timeout, budget=server.frames
                )
                try:
                    if frame.kind != "step" or not isinstance(frame.fields.get("session"), str):
                        raise WireError(f"expected a step frame naming a session, got {frame.kind}")
                    session = self.sessions.live.get(frame["session"])
                    if session is None or session.stop.is_set():
                        log.debug("a pushed step for unknown session %s: skipped", str(frame["session"])[:8])
                        continue
                    try:
                        session.inbox.send_nowait(("push", frame))
                        frame = None  # the session owns it now
                    except trio.WouldBlock:
                        log.info("session %s takes no more steps now: a pushed step dropped", session.id[:8])
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # the session is ending
                finally:
                    if frame is not None:
                        frame.release()
        except WireError as exc:
            log.info("bad frame on a push stream from %s: %s", stream.remote_peer_id[-8:], exc)
        except (P2PTimeoutError, StreamClosedError):
            pass
        finally:
            await stream.reset_here()

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
        links = self.push_links
        if peer not in links and len(links) >= MAX_PUSH_LINKS:
            for stale in [p for p, link in links.items() if link.stream is None and not link.connecting]:
                del links[stale]  # links that failed make room
            if len(links) >= MAX_PUSH_LINKS:
                return False
        link = links.setdefault(peer, _PushLink(lock=trio.Lock()))
        if link.stream is None:  # not connected yet (connecting now, or failed lately)
            if not link.connecting and time.monotonic() >= link.retry_at:
                link.connecting = self.server.host.start_here(self._connect_push, peer, link)
            return False
        fields = {
            "session": session, "step_id": frame["step_id"], "position": frame["position"],
            "route": route[1:MAX_TRAIL], "trail": len(owed),
        }
        if frame.fields.get("per_position"):
            fields["per_position"] = True
        hypo_ids = step_parts(frame)[1]
        output = await pack_here(output, wire)
        tensors = [output, *([] if hypo_ids is None else [hypo_ids]), *owed]  # hypo_ids travel along
        async with link.lock:  # one frame at a time on the shared stream
            stream = link.stream
            if stream is None:  # the write before this one failed
                return False
            try:
                await write_frame_here(stream, Frame("step", fields, tensors), timeout=PUSH_TIMEOUT)
                return True
            except BaseException as exc:  # failed, or cancelled part way: the stream is unusable
                if link.stream is stream:
                    link.stream = None
                with trio.CancelScope(shield=True):
                    await stream.reset_here()
                if not isinstance(exc, P2PError):
                    raise
                log.info("push to %s failed (%s); the client sends that step itself", peer[-8:], exc)
                return False

    async def _connect_push(self, peer: str, link: _PushLink) -> None:
        try:
            with trio.fail_after(PUSH_TIMEOUT):
                link.stream = await self.server.host.open_stream_here(peer, protocols.PUSH)
        except (P2PError, trio.TooSlowError) as exc:
            log.info("cannot push to %s (retrying in %g s): %s", peer[-8:], PUSH_RETRY, exc)
            link.retry_at = time.monotonic() + PUSH_RETRY
        finally:
            link.connecting = False


def end_session(session, error: SessionEnded) -> None:
    """On the trio thread: hand ``error`` to ``session``'s serve loop, which ends it (a full inbox
    wakes the loop anyway, which then sees ``session.ends_at``)."""
    try:
        session.inbox.send_nowait(("client", error))
    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def empty_inbox(session) -> None:
    """The inbox's frames given back to the frame budget and the inbox closed (pushes after this
    are dropped by their handler). Synchronous: nothing can arrive in between."""
    while True:
        try:
            _, item = session.received.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            break
        if isinstance(item, Frame):
            item.release()
    session.received.close()


async def _as_received(frame: Frame, i: int):
    """Tensor ``i`` of a received ``frame``, to send on exactly as it arrived (see
    :func:`~swarm.p2p.compression.wire_of_form`)."""
    form = frame.forms[i] if i < len(frame.forms) else ""
    return await pack_here(frame.tensors[i], wire_of_form(form))


def _per_position(frame: Frame, hidden: torch.Tensor, hypo_ids, chunks: list[int]) -> bool:
    """A step's ``per_position`` flag (a speculative verification: every position computed as its
    own decode step would be), checked."""
    value = frame.fields.get("per_position", False)
    if not isinstance(value, bool):
        raise ValueError(f"per_position must be true or false, got {value!r}")
    if value and (hypo_ids is not None or len(chunks) > 1 or hidden.shape[1] > MAX_VERIFY):
        raise ValueError(f"a per_position step carries at most {MAX_VERIFY} positions, without hypo_ids or chunks")
    return value


def step_parts(frame: Frame) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
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
