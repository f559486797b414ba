"""A server: holds blocks ``[start, end)`` of a model, announces them, runs clients' passes.

Protocols (see :mod:`swarm.p2p.protocols`):
- ``info``: model, blocks, limits, and this server's view of the swarm (so a joining peer has a
  table at once instead of waiting for the next announcements);
- ``inference``: one stream per session — ``open`` (range, batch, max_length; the KV cache is
  allocated from the shared budget, or ``cache_full`` is answered at once), then ``step`` frames
  (hidden states and the global position of their first token), then an explicit ``close``. A
  stream that ends without ``close`` is a failure (a killed peer looks like a clean end of stream).
  A step may carry a ``route`` (the next servers of the client's chain and their session ids):
  the server then hands its output straight to the next one over ``push``, carrying along the
  outputs of the servers before it in this run (the ``trail``), and does not reply. The server
  that ends the run (the chain's last, or one that cannot push) replies to the client with its
  output and the trail, so a token costs one message per server plus one back to the client,
  and no process wakes up while the next one computes; the client still gets every output (its
  history for failover) and sends a step itself wherever a run did not finish;
- ``push``: steps from the previous server of a chain, fed into the named session's inbox, where
  they meet the client's own frames (a step seen twice is answered from the last step);
- ``forward`` / ``backward``: stateless passes over a sub-range (backward returns the gradient
  with respect to the input hidden states; weights are frozen).

Block computation runs off the event loop (on the main thread under ``swarm serve``) so the loop
and libp2p's thread keep answering while a long prefill runs. A bad frame gets an ``error`` reply and ends its own stream only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import torch

from swarm import __version__
from swarm.cache.kv import CacheFullError, KVCacheBudget
from swarm.engine.checkpoint import BlockRange, Checkpoint, parse_dtype
from swarm.p2p import protocols
from swarm.p2p.host import Host, P2PError, P2PTimeoutError, StreamClosedError
from swarm.p2p.identity import Identity, claim_default_identity
from swarm.p2p.routing import choose_blocks
from swarm.p2p.table import PeerTable, ServerInfo, announce_topic, model_id, parse_announcement
from swarm.p2p.wire import (
    DEFAULT_MAX_FRAME,
    MAX_TRAIL,
    Frame,
    RemoteError,
    WireError,
    error_frame,
    pump_frames,
    read_frame,
    write_frame,
)

log = logging.getLogger("swarm.server")


@dataclass
class ServerConfig:
    model_dir: Path
    blocks: str = "auto"  # "START:END" or "auto"
    num_blocks: int | None = None  # with auto; default: a third of the model, at least 1
    dtype: str = "float32"
    cache_tokens: int = 32768
    listen_host: str = "127.0.0.1"
    port: int = 0
    identity: Path | Identity | None = None  # a key file, one claimed already, or None: a fresh key
    initial_peers: list[str] = field(default_factory=list)
    new_swarm: bool = False
    public_name: str = ""
    announce_period: float = 5.0
    step_timeout: float = 300.0  # an open session idle this long is closed and its cache freed
    session_timeout: float = 1800.0  # no session lives longer than this (its cache is freed)
    request_timeout: float = 30.0
    max_batch: int = 64
    max_frame: int = DEFAULT_MAX_FRAME


def parse_blocks(spec: str, num_blocks: int) -> tuple[int, int] | None:
    """``"START:END"`` → (start, end); ``"auto"`` → None. Raises ``ValueError`` naming --blocks."""
    if spec == "auto":
        return None
    try:
        start, end = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"--blocks must be START:END (e.g. 0:10) or auto, got {spec!r}") from None
    if not 0 <= start < end <= num_blocks:
        raise ValueError(f"--blocks {spec}: this model has blocks 0:{num_blocks}")
    return start, end


PUSH_TIMEOUT = 10.0
PUSH_RETRY = 30.0  # seconds before connecting again to a peer that could not be pushed to
INBOX_FRAMES = 8  # steps queued per session; beyond that its client stream (or pusher) waits
CARRY_BYTES = 4 * 2**20  # outputs up to this size travel along a push instead of each going to the client


@dataclass(eq=False)
class _Session:
    """An open inference session: its blocks, KV cache, inbox of steps (from the client's stream
    and pushed by the previous server) and the last step run (to answer a repeat of it)."""

    id: str
    blocks: BlockRange
    kv: object
    inbox: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(INBOX_FRAMES))
    last_step: str | None = None
    last_position: int = -1
    last_input: torch.Tensor | None = None
    last_output: torch.Tensor | None = None
    last_reordered: bool = False


@dataclass(eq=False)
class _PushLink:
    """A stream to the next server of chains, for pushed steps (one writer at a time)."""

    stream: object = None
    connecting: asyncio.Task | None = None
    retry_at: float = 0.0  # after a failed connection, no new one before this (monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class BlockServer:
    """One running server. Create with :meth:`start`, stop with :meth:`stop`."""

    def __init__(self, cfg: ServerConfig, host: Host, checkpoint: Checkpoint, model: str, executor: Executor | None = None):
        self.cfg, self.host, self.checkpoint, self.model = cfg, host, checkpoint, model
        self.num_blocks = checkpoint.num_blocks
        self.table = PeerTable(model, self.num_blocks, cfg.announce_period)
        self.budget = KVCacheBudget(cfg.cache_tokens)
        self.blocks: BlockRange | None = None
        self.start_block = self.end_block = 0
        self.state = "joining"
        self.throughput = 0.0
        self.sessions: dict[str, float] = {}  # session id -> opened at (monotonic)
        self._live: dict[str, _Session] = {}
        self._push_links: dict[str, _PushLink] = {}
        # block computation: one call at a time, off the event loop (see MainThreadExecutor)
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="swarm-compute")
        self._tasks: list[asyncio.Task] = []
        self._stopped = asyncio.Event()
        self._cache_changed = asyncio.Event()

    # ---- lifecycle -------------------------------------------------------------------------

    @classmethod
    async def start(cls, cfg: ServerConfig, on_ready=None, executor: Executor | None = None) -> BlockServer:
        checkpoint = Checkpoint(cfg.model_dir)
        dtype = parse_dtype(cfg.dtype)
        fixed = parse_blocks(cfg.blocks, checkpoint.num_blocks)
        if not cfg.initial_peers and not cfg.new_swarm:
            raise ValueError("give --initial-peers (a multiaddr printed by another server) or --new-swarm to start one")
        model = model_id(checkpoint)
        host = await Host.start(listen_host=cfg.listen_host, port=cfg.port, identity=cfg.identity)
        server = cls(cfg, host, checkpoint, model, executor)
        try:
            host.set_stream_handler(protocols.INFO, server._handle_info)
            await server._join()
            start, end = fixed if fixed else server._auto_range()
            server.start_block, server.end_block = start, end
            await server._announce()  # joining: others see the range being loaded
            loop = asyncio.get_running_loop()
            server.blocks = await loop.run_in_executor(
                server._executor, checkpoint.load_blocks, start, end, dtype
            )
            from swarm.engine.throughput import cached_block_throughput

            server.throughput = await loop.run_in_executor(
                server._executor, cached_block_throughput, model, server.blocks
            )
            host.set_stream_handler(protocols.INFERENCE, server._handle_inference)
            host.set_stream_handler(protocols.PUSH, server._handle_push)
            host.set_stream_handler(protocols.FORWARD, server._handle_forward)
            host.set_stream_handler(protocols.BACKWARD, server._handle_backward)
            server.state = "online"
            await server._announce(direct=True)
            server._tasks.append(asyncio.create_task(server._announce_loop()))
        except BaseException:
            await host.close()
            raise
        if on_ready is not None:
            on_ready(server)
        return server

    async def _join(self) -> None:
        """Subscribe to the model's topic, dial the initial peers and take their tables."""
        subscription = await self.host.subscribe(announce_topic(self.model))
        self._tasks.append(asyncio.create_task(self._listen(subscription)))
        errors = []
        for maddr in self.cfg.initial_peers:
            try:
                peer = await self.host.connect(maddr, timeout=self.cfg.request_timeout)
                reply = await protocols.request(self.host, peer, protocols.INFO, Frame("info"), self.cfg.request_timeout)
                info = reply["info"]
                if info.get("model") != self.model:
                    raise ValueError(f"{maddr} serves model {info.get('model')}, not {self.model}")
                self.table.merge([info, *(info.get("table") or [])])
                for known in self.table.snapshot().values():
                    self.host.add_addrs(known.peer_id, list(known.addrs))
            except (P2PError, WireError, RemoteError, ValueError, KeyError, TypeError, AttributeError) as exc:
                errors.append(f"{maddr}: {exc}")
        if self.cfg.initial_peers and len(errors) == len(self.cfg.initial_peers):
            raise ConnectionError("could not join the swarm through any initial peer:\n  " + "\n  ".join(errors))
        for err in errors:
            log.warning("initial peer skipped: %s", err)

    def _auto_range(self) -> tuple[int, int]:
        if self.cfg.num_blocks is not None and self.cfg.num_blocks < 1:
            raise ValueError(f"--num-blocks must be at least 1, got {self.cfg.num_blocks}")
        count = self.cfg.num_blocks or max(1, self.num_blocks // 3)
        others = {p: s for p, s in self.table.snapshot().items() if p != self.host.peer_id}
        start = choose_blocks(others, self.num_blocks, count)
        return start, min(start + count, self.num_blocks)

    async def stop(self) -> None:
        """Announce offline, stop background tasks, close the host."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.state = "offline"
        try:
            await asyncio.wait_for(self._announce(direct=True), timeout=3)
        except (P2PError, TimeoutError, OSError) as exc:
            log.warning("could not announce going offline: %s", exc)
        connecting = [link.connecting for link in self._push_links.values() if link.connecting is not None]
        for task in self._tasks + connecting:
            task.cancel()
        await asyncio.gather(*self._tasks, *connecting, return_exceptions=True)
        await self.host.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- announcements ---------------------------------------------------------------------

    def info(self) -> ServerInfo:
        return ServerInfo(
            peer_id=self.host.peer_id,
            addrs=tuple(self.host.addrs),
            model=self.model,
            start=self.start_block,
            end=self.end_block,
            state=self.state,
            throughput=self.throughput,
            dtype=self.cfg.dtype,
            cache_tokens_left=self.budget.tokens_left,
            version=__version__,
            public_name=self.cfg.public_name,
            period=self.cfg.announce_period,
            instance=self.host.instance,
            received=time.monotonic(),
        )

    async def _announce(self, direct: bool = False) -> None:
        """Publish our info on the model's topic; with ``direct``, also send it straight to every
        server we know (gossip is best-effort and a message published just before the host
        closes, or just after it joins the mesh, may never leave)."""
        info = self.info()
        self.table.update(info)
        await self.host.publish(announce_topic(self.model), msgpack.packb(info.to_wire()))
        if direct:
            peers = [p for p in self.table.snapshot() if p != self.host.peer_id]
            await asyncio.gather(*(self._push(p, info) for p in peers))

    async def _push(self, peer_id: str, info: ServerInfo) -> None:
        try:
            frame = Frame("announce", {"info": info.to_wire()})
            await protocols.request(self.host, peer_id, protocols.INFO, frame, timeout=2.0)
        except (P2PError, WireError) as exc:
            log.info("could not tell %s directly: %s", peer_id[-8:], exc)

    async def _announce_loop(self) -> None:
        """Re-announce every period, and sooner (at most once a second) when sessions open or
        close, so clients see the cache room that is really left."""
        next_periodic = time.monotonic() + self.cfg.announce_period
        while True:
            try:
                await asyncio.wait_for(self._cache_changed.wait(), max(0.0, next_periodic - time.monotonic()))
            except TimeoutError:
                pass
            self._cache_changed.clear()
            try:
                await self._announce()
            except P2PError as exc:
                log.warning("announcement failed: %s", exc)
            now = time.monotonic()
            if now >= next_periodic:
                next_periodic = now + self.cfg.announce_period
            await asyncio.sleep(min(1.0, self.cfg.announce_period))

    async def _listen(self, subscription) -> None:
        async for sender, data in subscription:
            try:
                self._apply_announcement(data, sender)
            except ValueError as exc:
                log.warning("ignoring an announcement from %s: %s", sender[-8:], exc)

    def _apply_announcement(self, data, sender: str) -> None:
        """Take a server's announcement into the table (``ValueError`` if it is not acceptable)."""
        info = parse_announcement(data, sender)
        if info.peer_id != self.host.peer_id and self.table.update(info):
            self.host.add_addrs(info.peer_id, list(info.addrs))

    # ---- protocols -------------------------------------------------------------------------

    def _limits(self) -> dict:
        return {
            "max_batch": self.cfg.max_batch,
            "max_frame": self.cfg.max_frame,
            "cache_tokens": self.cfg.cache_tokens,
            "step_timeout": self.cfg.step_timeout,
            "session_timeout": self.cfg.session_timeout,
        }

    async def _handle_info(self, stream) -> None:
        try:
            request = await read_frame(stream, timeout=self.cfg.request_timeout, max_frame=1 << 16)
            if request.kind == "announce":
                self._apply_announcement(request["info"], stream.remote_peer_id)
            elif request.kind != "info":
                raise WireError(f"expected an info or announce frame, got {request.kind}")
        except (WireError, ValueError) as exc:
            await self._reply_error(stream, exc, "bad_frame")
            return
        info = {
            **self.info().to_wire(),
            "num_blocks": self.num_blocks,
            "limits": self._limits(),
            "table": [s.to_wire() for s in self.table.snapshot().values()],
        }
        await write_frame(stream, Frame("info_reply", {"info": info}), timeout=self.cfg.request_timeout)

    def _check_range(self, start, end) -> BlockRange:
        if not (isinstance(start, int) and isinstance(end, int)) or not self.start_block <= start < end <= self.end_block:
            raise ValueError(
                f"blocks {start}:{end} are not served here (this server holds {self.start_block}:{self.end_block})"
            )
        return self.blocks.sub(start, end)

    async def _compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _reply_error(self, stream, exc: Exception, code: str) -> None:
        log.warning("%s from %s: %s", code, stream.remote_peer_id[:12] if stream.remote_peer_id else "?", exc)
        try:
            await write_frame(stream, error_frame(str(exc), code), timeout=5)
        except (P2PError, OSError):
            pass

    async def _handle_inference(self, stream) -> None:
        session = None
        reader = None
        try:
            opening = await read_frame(stream, timeout=self.cfg.request_timeout, max_frame=1 << 16)
            if opening.kind != "open":
                raise WireError(f"an inference stream must start with an open frame, got {opening.kind}")
            blocks = self._check_range(opening["start"], opening["end"])
            batch, max_length = opening["batch"], opening["max_length"]
            if not (isinstance(batch, int) and 1 <= batch <= self.cfg.max_batch and isinstance(max_length, int)):
                raise ValueError(f"batch must be 1..{self.cfg.max_batch} and max_length an integer")
            session = _Session(uuid.uuid4().hex, blocks, blocks.open_session(batch, max_length, budget=self.budget))
            self.sessions[session.id] = time.monotonic()
            self._live[session.id] = session
            self._cache_changed.set()
            await write_frame(stream, Frame("opened", {"session_id": session.id}), timeout=self.cfg.request_timeout)
            # the client's frames (and the error that ends them) meet pushed steps in the inbox
            reader = asyncio.create_task(
                pump_frames(stream, lambda item: session.inbox.put(("client", item)), self.cfg.max_frame)
            )
            active = time.monotonic()  # the client's last frame or the last step run (not pushes refused)
            while True:
                now = time.monotonic()
                lifetime_left = self.sessions[session.id] + self.cfg.session_timeout - now
                if lifetime_left <= 0:
                    raise ValueError(f"session timeout: sessions last at most {self.cfg.session_timeout:g} s here")
                idle_left = active + self.cfg.step_timeout - now
                if idle_left <= 0:
                    raise P2PTimeoutError("idle")
                try:
                    source, frame = await asyncio.wait_for(session.inbox.get(), min(idle_left, lifetime_left))
                except asyncio.TimeoutError:
                    continue  # the checks above end the session
                if isinstance(frame, BaseException):
                    raise frame
                if source == "client":
                    active = time.monotonic()
                if frame.kind == "close":
                    await write_frame(stream, Frame("closed"), timeout=self.cfg.request_timeout)
                    return
                if frame.kind != "step":
                    raise WireError(f"expected a step or close frame, got {frame.kind}")
                try:
                    output, fresh = await self._step(session, frame, source)
                except (ValueError, TypeError, RuntimeError, WireError) as exc:
                    if source == "client":
                        raise
                    log.warning("ignored a pushed step for session %s: %s", session.id[:8], exc)
                    continue
                if output is None:
                    continue  # a pushed copy of a step already run: the client's own copy decides
                active = time.monotonic()
                # outputs of earlier servers that reached here by push and the client has not seen
                owed = _step_parts(frame)[2] + ([frame.tensors[0]] if source == "push" else [])
                carry = sum(t.numel() * t.element_size() for t in [*owed, output]) <= CARRY_BYTES
                if fresh and carry and await self._push_step(frame, output, owed):
                    continue  # the outputs travel on; the chain's last server (or one that cannot push) replies
                # "to" tells the client which copy this answers: after a failover it sends its own
                # copy and must not take an answer to a push from the server it replaced
                fields = {"step_id": frame["step_id"], "to": source, "trail": len(owed)}
                await write_frame(stream, Frame("output", fields, [output, *owed]), timeout=self.cfg.request_timeout)
        except CacheFullError as exc:
            await self._reply_error(stream, exc, "cache_full")
        except WireError as exc:
            await self._reply_error(stream, exc, "bad_frame")
        except (ValueError, TypeError, RuntimeError) as exc:
            await self._reply_error(stream, exc, "bad_request")
        except P2PTimeoutError:
            log.info("inference session from %s idle for %ss: closed", stream.remote_peer_id[:12], self.cfg.step_timeout)
        except StreamClosedError:
            log.info("client %s left an inference session without closing it", stream.remote_peer_id[:12])
        finally:
            if reader is not None:
                reader.cancel()
            if session is not None:
                session.kv.close()
                self.sessions.pop(session.id, None)
                self._live.pop(session.id, None)
                self._cache_changed.set()

    async def _step(self, session: _Session, frame: Frame, source: str) -> tuple[torch.Tensor | None, bool]:
        """Run a step frame on ``session``; returns (output, whether it was computed now).

        A step seen already (same step id and position) is not run twice: the client's copy of it
        gets the same output if its input is the same, else (an upstream server was replaced and
        computed it anew) the cache rewinds and the step is recomputed; a pushed copy gets
        (None, False): it never overrides what the client sent."""
        hidden, hypo_ids, trail = _step_parts(frame)
        if source == "client" and trail:
            raise ValueError("only pushed steps carry a trail of earlier outputs")
        kv = session.kv
        position = frame["position"]
        repeat = frame["step_id"] == session.last_step and position == session.last_position
        if repeat and (source == "push" or torch.equal(hidden, session.last_input)):
            return (None if source == "push" else session.last_output), False
        if position != (session.last_position if repeat else kv.length):
            raise ValueError(f"step starts at position {position} but this session has {kv.length} positions cached")
        chunks = _check_chunks(frame.fields.get("chunks"), hidden)
        _check_hidden(session.blocks, hidden)
        if repeat:
            if session.last_reordered:
                raise ValueError("this step was already run with other inputs and reordered the cache; reopen the session")
            kv.rewind(session.last_position)
        session.last_step = None  # until this step has run
        output = await self._compute(_run_steps, session.blocks, hidden, kv, hypo_ids, chunks)
        session.last_step, session.last_position = frame["step_id"], position
        session.last_input, session.last_output = hidden, output
        session.last_reordered = hypo_ids is not None
        return output, True

    async def _handle_push(self, stream) -> None:
        """Steps pushed by the previous server of a chain, for sessions held here. Unknown sessions
        (closed meanwhile) are skipped: their clients learn it from their own streams. The stream
        is reset when this ends (idle for a session's lifetime, a bad frame), so the pusher's next
        write fails and it falls back to the client instead of pushing into the void."""
        try:
            while True:
                frame = await read_frame(stream, timeout=self.cfg.session_timeout, max_frame=self.cfg.max_frame)
                if frame.kind != "step" or not isinstance(frame.fields.get("session"), str):
                    raise WireError(f"expected a step frame naming a session, got {frame.kind}")
                session = self._live.get(frame["session"])
                if session is None:
                    log.debug("a pushed step for unknown session %s: skipped", str(frame["session"])[:8])
                    continue
                try:
                    await asyncio.wait_for(session.inbox.put(("push", frame)), PUSH_TIMEOUT)
                except asyncio.TimeoutError:
                    log.warning("session %s takes no more steps: a pushed step dropped", session.id[:8])
        except WireError as exc:
            log.warning("bad frame on a push stream from %s: %s", stream.remote_peer_id[:12], exc)
        except (P2PTimeoutError, StreamClosedError):
            pass
        finally:
            await stream.reset()

    async def _push_step(self, frame: Frame, output: torch.Tensor, owed: list[torch.Tensor]) -> bool:
        """Send ``output`` straight to the next server of the step's route (so the chain needs no
        round trip through the client per server), with ``owed``: earlier outputs the client has
        not seen, which the server that finally replies hands it. False if there is no next server
        or it cannot be reached now (the client then sends it). The first push to a peer only
        starts connecting."""
        route = frame.fields.get("route")
        if not route or not isinstance(route, list) or not isinstance(route[0], dict):
            return False
        nxt = route[0]
        peer, session = nxt.get("peer"), nxt.get("session")
        if not (isinstance(peer, str) and isinstance(session, str)):
            return False
        link = self._push_links.setdefault(peer, _PushLink())
        if link.stream is None:  # not connected yet (connecting now, or failed lately)
            if link.connecting is None and time.monotonic() >= link.retry_at:
                link.connecting = asyncio.create_task(self._connect_push(peer, link))
            return False
        fields = {
            "session": session, "step_id": frame["step_id"], "position": frame["position"], "route": route[1:],
            "trail": len(owed),
        }
        hypo_ids = _step_parts(frame)[1]
        tensors = [output, *([] if hypo_ids is None else [hypo_ids]), *owed]  # hypo_ids travel along
        try:
            async with link.lock:
                await write_frame(link.stream, Frame("step", fields, tensors), timeout=PUSH_TIMEOUT)
            return True
        except P2PError as exc:
            log.info("push to %s failed (%s); the client sends that step itself", peer[:12], exc)
            stream, link.stream = link.stream, None
            if stream is not None:
                await stream.reset()
            return False

    async def _connect_push(self, peer: str, link: _PushLink) -> None:
        try:
            link.stream = await self.host.open_stream(peer, protocols.PUSH, timeout=PUSH_TIMEOUT)
        except P2PError as exc:
            log.info("cannot push to %s (retrying in %g s): %s", peer[:12], PUSH_RETRY, exc)
            link.retry_at = time.monotonic() + PUSH_RETRY
        finally:
            link.connecting = None

    async def _stateless(self, stream, kind: str, fn) -> None:
        try:
            frame = await read_frame(stream, timeout=self.cfg.request_timeout, max_frame=self.cfg.max_frame)
            if frame.kind != kind:
                raise WireError(f"expected a {kind} frame, got {frame.kind}")
            blocks = self._check_range(frame["start"], frame["end"])
            hidden = frame.tensors[0]
            tokens = hidden.shape[0] * hidden.shape[1] if hidden.dim() == 3 else 0
            if hidden.dim() == 3 and (hidden.shape[0] > self.cfg.max_batch or tokens > self.cfg.cache_tokens):
                raise ValueError(
                    f"a {kind} pass takes at most batch {self.cfg.max_batch} and {self.cfg.cache_tokens} tokens "
                    f"here, got {list(hidden.shape[:2])}; split it"
                )
            result = await self._compute(fn, blocks, *frame.tensors)
            await write_frame(stream, Frame("result", {}, [result]), timeout=self.cfg.request_timeout)
        except WireError as exc:
            await self._reply_error(stream, exc, "bad_frame")
        except (ValueError, TypeError, RuntimeError) as exc:
            await self._reply_error(stream, exc, "bad_request")
        except (P2PTimeoutError, StreamClosedError) as exc:
            log.info("%s request from %s ended early: %s", kind, stream.remote_peer_id[:12], exc)

    async def _handle_forward(self, stream) -> None:
        await self._stateless(stream, "forward", _run_forward)

    async def _handle_backward(self, stream) -> None:
        await self._stateless(stream, "backward", _run_backward)


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


def _check_hidden(blocks: BlockRange, hidden: torch.Tensor) -> None:
    if not hidden.is_floating_point() or hidden.dim() != 3:
        raise ValueError(
            f"hidden states must be floating point [batch, seq, {blocks.config.hidden_size}], "
            f"got {hidden.dtype} {list(hidden.shape)}"
        )


def _check_chunks(chunks, hidden: torch.Tensor) -> list[int]:
    """A step may carry ``chunks``: the lengths of the steps it replays (a replacement server
    rebuilding a failed one's cache runs the client's history step by step, exactly as it was
    first computed). Without it the step is one chunk."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden states must be [batch, seq, hidden], got shape {list(hidden.shape)}")
    if chunks is None:
        return [hidden.shape[1]]
    if not (isinstance(chunks, list) and chunks and all(isinstance(c, int) and c > 0 for c in chunks)):
        raise ValueError("chunks must be a non-empty list of positive step lengths")
    if hidden.dim() != 3 or sum(chunks) != hidden.shape[1]:
        raise ValueError(f"chunks add up to {sum(chunks)} positions but the step carries {list(hidden.shape)}")
    return chunks


def _run_steps(blocks: BlockRange, hidden, kv, hypo_ids, chunks: list[int]):
    """Run a step (or a replay split into ``chunks``); returns the outputs of every position."""
    _check_hidden(blocks, hidden)
    if hypo_ids is not None:
        batch = hidden.shape[0]
        if hypo_ids.dtype != torch.int64 or hypo_ids.shape != (batch,):
            raise ValueError(f"hypo_ids must be int64 of shape [{batch}], got {hypo_ids.dtype} {list(hypo_ids.shape)}")
        if len(hypo_ids) and not (0 <= int(hypo_ids.min()) and int(hypo_ids.max()) < batch):
            raise ValueError(f"hypo_ids must index rows 0..{batch - 1}")
    outputs, start = [], 0
    with torch.no_grad():
        for i, length in enumerate(chunks):
            outputs.append(blocks(hidden[:, start : start + length], kv, hypo_ids if i == 0 else None))
            start += length
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


def _run_forward(blocks: BlockRange, hidden):
    _check_hidden(blocks, hidden)
    with torch.no_grad():
        return blocks(hidden)


def _run_backward(blocks: BlockRange, hidden, grad_output):
    _check_hidden(blocks, hidden)
    if grad_output.shape != hidden.shape:
        raise ValueError(f"grad_output shape {list(grad_output.shape)} differs from hidden {list(hidden.shape)}")
    with torch.enable_grad():
        inputs = hidden.to(blocks.dtype).detach().requires_grad_(True)
        blocks(inputs).backward(grad_output.to(blocks.dtype))
    return inputs.grad


def default_identity(home: Path) -> Identity:
    """``$SWARM_HOME/identity.key``, or ``identity-2.key``, ... when another process holds it,
    claimed for this process (see :mod:`swarm.p2p.identity`): several servers on one machine get
    distinct peer ids, each stable across restarts."""
    return claim_default_identity(home)


def serve_forever(cfg: ServerConfig, on_ready=None) -> None:
    """Run a server until SIGINT/SIGTERM, then announce offline and exit cleanly.

    The event loop runs on a background thread and block computation on this (the main) thread,
    where PyTorch's kernels are fastest (see :class:`~swarm.p2p.loop.MainThreadExecutor`)."""
    import signal

    from swarm.p2p.loop import BackgroundLoop, MainThreadExecutor

    compute = MainThreadExecutor()
    background = BackgroundLoop()
    try:
        starting = asyncio.run_coroutine_threadsafe(BlockServer.start(cfg, on_ready, compute), background.loop)
        starting.add_done_callback(lambda _: compute.wake())
        compute.run_until(starting.done)
        server = starting.result()
        stopped = threading.Event()

        def request_stop(*_):
            future = asyncio.run_coroutine_threadsafe(server.stop(), background.loop)
            future.add_done_callback(lambda _: (stopped.set(), compute.wake()))

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, request_stop)
        compute.run_until(stopped.is_set)
    finally:
        background.close()
