"""A server: holds blocks ``[start, end)`` of a model, announces them, runs clients' passes.

Protocols (see :mod:`swarm.p2p.protocols`):
- ``info``: model, blocks, limits, and this server's view of the swarm (so a joining peer has a
  table at once instead of waiting for the next announcements);
- ``probe``: a timed echo by which a joining server measures its link (see :mod:`swarm.p2p.bandwidth`);
- ``inference`` and ``push``: sessions with KV caches, stepped by their client and pushed along
  the chain by the servers before this one (see :mod:`swarm.p2p.sessions`);
- ``forward`` / ``backward``: stateless passes over a sub-range, optionally with a client's
  adapter (LoRA, deep prompts; kept by digest in an :class:`~swarm.p2p.adapter_store.AdapterStore`);
  backward recomputes the forward and returns the gradient with respect to the input hidden
  states and to the adapter's tensors (the blocks' weights are frozen). A request may name a
  wire dtype (``wire``, see :mod:`swarm.p2p.compression`) for the output or input gradient. The client must keep its
  side of the stream open until the reply: an end of stream or a reset means nobody waits for
  the result any more, and the computation stops before its next block.

Every peer is a stranger: what one peer can make the server hold is bounded (streams per
protocol, sessions and cache tokens, bytes of frames in flight, a deadline per frame), and a bad
request gets an ``error`` frame whose code says whether the request was wrong (the client must
not retry it) or the server failed (the client fails over). Block computation runs off the event
loop (on the main thread under ``swarm serve``), one pass at a time, so the loop and libp2p's
thread keep answering while a long prefill runs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import Counter
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import torch
from swarm import __version__
from swarm.cache.kv import KVCacheBudget
from swarm.engine.adapters import attach, run_backward, run_forward
from swarm.engine.checkpoint import BlockRange, Checkpoint, StepCancelled, parse_dtype
from swarm.engine.quant import parse_quant, quantization, weight_bytes
from swarm.engine.throughput import Throughput
from swarm.p2p import placement, protocols
from swarm.p2p.adapter_store import AdapterStore
from swarm.p2p.addresses import check_announce_addr, interface_ips, public_addrs
from swarm.p2p.bandwidth import handle_probe
from swarm.p2p.compression import pack_off_loop, session_wire
from swarm.p2p.host import Host, P2PError, P2PTimeoutError, StreamClosedError
from swarm.p2p.identity import Identity, claim_default_identity
from swarm.p2p.limits import FrameBudget, FrameBudgetError
from swarm.p2p.serve_options import (
    PEER_ADAPTER_MIB,
    PEER_SESSION_ADAPTER_MIB,
    SESSION_ADAPTER_MIB,
    ServeOptions,
    check_num_blocks,
    parse_blocks,
)
from swarm.p2p.sessions import Sessions, check_hidden
from swarm.p2p.table import PeerTable, ServerInfo, announce_topic, model_id, model_name, parse_announcement
from swarm.p2p.wire import (
    BAD_REQUEST,
    BUSY,
    DEFAULT_MAX_FRAME,
    SERVER_ERROR,
    Frame,
    RemoteError,
    WireError,
    error_frame,
    read_frame,
    write_frame,
)

log = logging.getLogger("swarm.server")


_DEFAULT = ServeOptions  # the defaults of the options a user gives (see swarm.p2p.serve_options)


@dataclass
class ServerConfig:
    """What one :class:`BlockServer` runs with: the user's options resolved (the model's directory,
    the identity claimed, limits in bytes; built by :meth:`ServeOptions.server_config
    <swarm.p2p.serve_options.ServeOptions.server_config>`, which checks them), and limits no flag
    sets. Tests build one directly to set a limit small."""

    model_dir: Path
    blocks: str = _DEFAULT.blocks  # "START:END" or "auto"
    num_blocks: int | None = None  # with auto; default: as many as fit in memory (see engine.memory)
    memory: float | None = None  # GB the server may use (blocks + KV budget); default: what is available
    choice_delay: float = _DEFAULT.choice_delay  # with auto: wait a random 0–this many seconds before choosing blocks
    bandwidth: float | None = None  # Mbit/s of the link; default: measured against a peer, else assumed
    dtype: str = _DEFAULT.dtype
    quant: str = _DEFAULT.quant  # none, int8 or nf4: the blocks' linears (engine/quant.py)
    cache_tokens: int = _DEFAULT.cache_tokens
    listen_host: str = _DEFAULT.host
    port: int = _DEFAULT.port
    announce_addrs: list[str] = field(default_factory=list)  # announced instead of the listen addresses (--announce-addr)
    identity: Path | Identity | None = None  # a key file, one claimed already, or None: a fresh key
    initial_peers: list[str] = field(default_factory=list)
    new_swarm: bool = False
    public_name: str = ""
    announce_period: float = _DEFAULT.announce_period
    idle_timeout: float = _DEFAULT.idle_timeout  # an open session idle this long is closed and its cache freed
    threads: int | None = None  # CPU threads for block computation (torch.set_num_threads, for the process)
    session_timeout: float = 1800.0  # no session lives longer than this (its cache is freed)
    request_timeout: float = _DEFAULT.request_timeout  # also each frame's deadline from its first byte (plus a second per MiB)
    open_timeout: float = _DEFAULT.open_timeout  # a session with no step this long after its open is closed (the client's step timeout: a chain opens all its sessions before its first step)
    max_batch: int = 64
    max_frame: int = DEFAULT_MAX_FRAME
    frame_memory: int = _DEFAULT.frame_memory << 20  # bytes of frames in flight from all peers together
    peer_frame_memory: int = DEFAULT_MAX_FRAME + (64 << 20)  # ... and from one peer (at most frame_memory)
    max_peer_sessions: int = _DEFAULT.max_peer_sessions  # open inference sessions one peer may hold
    peer_cache_share: float = _DEFAULT.peer_cache_share  # the part of --cache-tokens one peer may hold
    max_stateless_tokens: int = 8192  # batch × length of one forward or backward pass
    throughput: str | float = _DEFAULT.throughput  # auto, eval or a number (see engine.throughput.parse_throughput)
    balance_period: float = _DEFAULT.balance_period  # with --blocks auto: check every random 0–2× this whether to move
    balance_quality: float = _DEFAULT.balance_quality  # move when the swarm's bottleneck grows more than 1/this (0: never move)
    drain_timeout: float = _DEFAULT.drain_timeout  # after a move, sessions on the old range may finish this long, then fail over
    adapter_memory: int = _DEFAULT.adapter_memory << 20  # bytes of clients' training adapters kept (by digest), from all peers
    peer_adapter_memory: int = PEER_ADAPTER_MIB << 20  # ... and for one peer (also the most one request may carry)
    max_adapter_bytes: int = SESSION_ADAPTER_MIB << 20  # adapter tensors one inference session may carry (with its open)
    peer_session_adapter_memory: int = PEER_SESSION_ADAPTER_MIB << 20  # ... that one peer's sessions may hold here together
    session_adapter_memory: int = _DEFAULT.session_adapter_memory << 20  # ... that all sessions may hold together


# concurrent streams one peer may have open per protocol (inference: max_peer_sessions + 8)
PEER_STREAMS = {protocols.PROBE: 2, protocols.INFO: 8, protocols.PUSH: 8, protocols.FORWARD: 8, protocols.BACKWARD: 8}


class BlockServer:
    """One running server. Create with :meth:`start`, stop with :meth:`stop`."""

    def __init__(self, cfg: ServerConfig, host: Host, checkpoint: Checkpoint, model: str, executor: Executor | None = None):
        self.cfg, self.host, self.checkpoint, self.model = cfg, host, checkpoint, model
        self.model_name = model_name(cfg.model_dir)  # what people call it; ``model`` is what it is
        self.num_blocks = checkpoint.num_blocks
        self.addrs = list(host.addrs)  # what it announces (see start)
        self.table = PeerTable(model, self.num_blocks, cfg.announce_period)
        self.budget = KVCacheBudget(cfg.cache_tokens)
        self.blocks: BlockRange | None = None
        self.start_block = self.end_block = 0
        self.state = "joining"
        self.speed = Throughput(0.0, 0.0, 0.0, 0.0)  # what it announces (measured before it chooses)
        self.frames = FrameBudget(cfg.frame_memory, min(cfg.peer_frame_memory, cfg.frame_memory))
        self.peer_cache_tokens = max(1, int(cfg.peer_cache_share * cfg.cache_tokens))
        self.context = checkpoint.config.max_positions  # None: no fixed limit (ALiBi)
        self.inference = Sessions(self)
        self.adapters = AdapterStore(cfg.adapter_memory, cfg.peer_adapter_memory)
        self._streams: Counter = Counter()  # (peer, protocol) -> streams open now
        # block computation: one call at a time, off the event loop (see MainThreadExecutor)
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="swarm-compute")
        # allocating, zeroing and freeing KV caches: off the event loop, not queued behind compute
        self._memory = ThreadPoolExecutor(1, thread_name_prefix="swarm-memory")
        self._tasks: list[asyncio.Task] = []
        self._stopped = asyncio.Event()
        self._cache_changed = asyncio.Event()
        self._moved_from: tuple[int, int] | None = None  # the range held before the last move
        self.moves: list[dict] = []  # recent moves: {"time", "from", "to"}
        self.balance_checks = 0  # times the balance loop looked at the swarm
        self._served_tokens = 0  # tokens computed since the last announcement (the load announced)
        self._served_since = time.monotonic()
        self._served_rate = 0.0

    @property
    def sessions(self) -> dict:
        """Open inference sessions by id."""
        return self.inference.live

    # ---- lifecycle -------------------------------------------------------------------------

    @classmethod
    async def start(cls, cfg: ServerConfig, on_ready=None, executor: Executor | None = None) -> BlockServer:
        """Join the swarm, choose and load the blocks, announce them; ``on_ready(server)`` once
        online. An :class:`Identity` in ``cfg`` is released when this fails. Raises ``ValueError``
        naming the flag for a range this model cannot have, ``CheckpointError`` (a ValueError),
        ``P2PError``, ``ConnectionError`` (no initial peer answered), ``OSError``."""
        try:
            checkpoint = Checkpoint(cfg.model_dir)
            dtype = parse_dtype(cfg.dtype)
            parse_quant(cfg.quant)
            fixed = parse_blocks(cfg.blocks, checkpoint.num_blocks)
            if fixed is None:
                check_num_blocks(cfg.num_blocks, checkpoint.num_blocks)
            if not cfg.initial_peers and not cfg.new_swarm:
                raise ValueError("give --initial-peers (a multiaddr printed by another server) or --new-swarm to start one")
            if cfg.threads is not None:
                torch.set_num_threads(cfg.threads)  # the process's: PyTorch has one intra-op pool
        except BaseException:
            if isinstance(cfg.identity, Identity):
                cfg.identity.release()
            raise
        model = model_id(checkpoint)
        host = await Host.start(listen_host=cfg.listen_host, port=cfg.port, identity=cfg.identity)
        server = cls(cfg, host, checkpoint, model, executor)
        try:
            server.addrs = [check_announce_addr(a, host.peer_id) for a in cfg.announce_addrs] or public_addrs(
                host.addrs, interface_ips()
            )
            host.set_stream_handler(protocols.INFO, server._limited(protocols.INFO, server._handle_info))
            host.set_stream_handler(protocols.PROBE, server._limited(protocols.PROBE, functools.partial(handle_probe, server)))
            await server._join()
            count = fixed[1] - fixed[0] if fixed else placement.auto_count(server)
            # the speed first: a range announced as joining counts with it, so servers starting
            # together (and the balance checks of the others) see what is being loaded
            server.speed = await placement.measure_speed(server, count, fixed[0] if fixed else 0)
            start, end = fixed if fixed else await placement.initial_range(server, count)
            server.start_block, server.end_block = start, end
            await server._announce(direct=True)  # joining: others see the range being loaded
            loop = asyncio.get_running_loop()
            server.blocks = await loop.run_in_executor(
                server._executor, functools.partial(checkpoint.load_blocks, start, end, dtype, quant=cfg.quant)
            )
            attach(server.blocks)  # adapters are lent to passes from outside (engine/adapters.py)
            host.set_stream_handler(protocols.INFERENCE, server._limited(protocols.INFERENCE, server.inference.handle_inference))
            host.set_stream_handler(protocols.PUSH, server._limited(protocols.PUSH, server.inference.handle_push))
            host.set_stream_handler(protocols.FORWARD, server._limited(protocols.FORWARD, server._handle_forward))
            host.set_stream_handler(protocols.BACKWARD, server._limited(protocols.BACKWARD, server._handle_backward))
            server.state = "online"
            await server._announce(direct=True)
            server._tasks.append(asyncio.create_task(server._announce_loop()))
            if server.speed.bandwidth_source == "assumed" and server.speed.source != "given":
                server._tasks.append(asyncio.create_task(placement.measure_bandwidth_later(server)))
            if fixed is None and cfg.balance_quality > 0:  # a range given by hand stays where it is
                server._tasks.append(asyncio.create_task(placement.balance_loop(server)))
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
        await self.inference.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.host.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._memory.shutdown(wait=False, cancel_futures=True)

    # ---- load balancing (see swarm.p2p.placement) ------------------------------------------

    async def move(self, start: int) -> None:
        """Serve the same number of blocks from ``start`` on (see :func:`swarm.p2p.placement.move`)."""
        await placement.move(self, start)

    # ---- announcements ---------------------------------------------------------------------

    def info(self) -> ServerInfo:
        return ServerInfo(
            peer_id=self.host.peer_id,
            addrs=tuple(self.addrs),
            model=self.model,
            model_name=self.model_name,
            start=self.start_block,
            end=self.end_block,
            state=self.state,
            throughput=self.speed.throughput,
            dtype=self.cfg.dtype,
            quant=quantization(self.blocks) if self.blocks is not None else self.cfg.quant,
            weight_bytes=weight_bytes(self.blocks) if self.blocks is not None else 0,
            cache_tokens_left=self.budget.tokens_left,
            version=__version__,
            public_name=self.cfg.public_name,
            period=self.cfg.announce_period,
            instance=self.host.instance,
            sessions=len(self.sessions),
            served=round(self._served_rate, 2),
            compute=self.speed.compute,
            network=self.speed.network,
            bandwidth=self.speed.bandwidth,
            bandwidth_source=self.speed.bandwidth_source,
            throughput_source=self.speed.source,
            moves=tuple((m["time"], *m["from"], *m["to"]) for m in self.moves),
            received=time.monotonic(),
        )

    def served(self, tokens: int) -> None:
        """Count ``tokens`` computed for a client (the load announced as ``served`` tokens/s)."""
        self._served_tokens += tokens

    async def _announce(self, direct: bool = False) -> None:
        """Publish our info on the model's topic; with ``direct``, also send it straight to every
        server we know (gossip is best-effort and a message published just before the host
        closes, or just after it joins the mesh, may never leave)."""
        now = time.monotonic()
        if now - self._served_since >= min(1.0, self.cfg.announce_period):
            self._served_rate = self._served_tokens / (now - self._served_since)
            self._served_tokens, self._served_since = 0, now
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
                log.debug("ignoring an announcement from %s: %s", sender[-8:], exc)
            except Exception:  # whatever a stranger sends, this listener must keep listening
                log.exception("an announcement from %s could not be applied", sender[-8:])

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
            "peer_cache_tokens": self.peer_cache_tokens,
            "max_peer_sessions": self.cfg.max_peer_sessions,
            "max_stateless_tokens": self.cfg.max_stateless_tokens,
            "peer_adapter_memory": self.adapters.peer_bytes,
            "max_adapter_bytes": self.cfg.max_adapter_bytes,
            "context": self.context,
            "idle_timeout": self.cfg.idle_timeout,
            "open_timeout": self.cfg.open_timeout,
            "session_timeout": self.cfg.session_timeout,
        }

    def _limited(self, protocol: str, handler):
        """``handler`` for at most :data:`PEER_STREAMS` concurrent streams of ``protocol`` per peer;
        streams beyond that get a ``busy`` error at once."""
        # inference: the sessions a peer may hold, and a few more being opened or refused
        limit = self.cfg.max_peer_sessions + 8 if protocol == protocols.INFERENCE else PEER_STREAMS[protocol]

        @functools.wraps(handler)
        async def limited(stream) -> None:
            key = (stream.remote_peer_id, protocol)
            if self._streams[key] >= limit:
                await self.reply_error(stream, WireError(f"at most {limit} {protocol} streams per peer at once"), BUSY)
                return
            self._streams[key] += 1
            try:
                await handler(stream)
            finally:
                self._streams[key] -= 1
                if not self._streams[key]:
                    del self._streams[key]

        return limited

    async def _handle_info(self, stream) -> None:
        try:
            request = await read_frame(
                stream, timeout=self.cfg.request_timeout, max_frame=1 << 16,
                frame_timeout=self.cfg.request_timeout, budget=self.frames,
            )
            request.release()
            if request.kind == "announce":
                self._apply_announcement(request["info"], stream.remote_peer_id)
            elif request.kind != "info":
                raise WireError(f"expected an info or announce frame, got {request.kind}")
        except (WireError, ValueError) as exc:
            await self.reply_error(stream, exc, getattr(exc, "code", "bad_frame"))
            return
        except (P2PTimeoutError, StreamClosedError):
            return
        info = {
            **self.info().to_wire(),
            "num_blocks": self.num_blocks,
            "hidden_size": self.checkpoint.config.hidden_size,
            "limits": self._limits(),
            "table": [s.to_wire() for s in self.table.snapshot().values()],
        }
        await write_frame(stream, Frame("info_reply", {"info": info}), timeout=self.cfg.request_timeout)

    def check_range(self, start, end) -> BlockRange:
        moved = self._moved_from
        if (self.state == "joining" or (moved and isinstance(start, int) and isinstance(end, int)
                                        and moved[0] <= start < end <= moved[1]
                                        and not self.start_block <= start < end <= self.end_block)):
            # a client with an older view of the swarm: not its fault, it goes elsewhere
            raise WireError(
                f"this server moved from blocks {moved[0]}:{moved[1]} to {self.start_block}:{self.end_block}"
                if moved else "this server is loading its blocks", BUSY,
            )
        if not (isinstance(start, int) and isinstance(end, int)) or not self.start_block <= start < end <= self.end_block:
            raise ValueError(
                f"blocks {start}:{end} are not served here (this server holds {self.start_block}:{self.end_block})"
            )
        return self.blocks.sub(start, end)

    def check_context(self, positions: int, what: str) -> None:
        """``ValueError`` when ``positions`` exceed the model's context (max_position_embeddings)."""
        if self.context is not None and positions > self.context:
            raise ValueError(
                f"{what} {positions} exceeds this model's context of {self.context} positions; shorten the prompt"
            )

    async def compute(self, fn, *args, session=None):
        """``fn(*args)`` on the compute thread (one call at a time). With a ``session``, its
        ``computing`` is the call, so whoever frees the session can wait for the call to stop."""
        future = self._executor.submit(fn, *args)
        if session is not None:
            session.computing = future
        return await asyncio.wrap_future(future)

    async def in_memory_thread(self, fn, *args, orphan=None):
        """``fn(*args)`` on the thread that allocates and frees KV caches (off the event loop).
        Should the caller be cancelled, ``orphan(result)`` releases what ``fn`` returns anyway."""
        future = self._memory.submit(fn, *args)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if orphan is not None:
                future.add_done_callback(lambda f: f.cancelled() or f.exception() or orphan(f.result()))
            raise

    def sessions_changed(self) -> None:
        """The cache room left changed: re-announce it soon."""
        self._cache_changed.set()

    async def reply_error(self, stream, exc: Exception, code: str) -> None:
        # info, not warning: a stranger's bad requests must not flood the operator's terminal (-v shows them)
        log.info("%s from %s: %s", code, stream.remote_peer_id[-8:] if stream.remote_peer_id else "?", exc)
        try:
            await write_frame(stream, error_frame(str(exc), code), timeout=5)
        except (P2PError, OSError):
            pass

    async def _stateless(self, stream, kind: str) -> None:
        """A ``forward`` (hidden [, adapter...]) or ``backward`` (hidden, grad_output [, adapter...])
        request, answered with a ``result``: the output, or the gradient with respect to hidden
        followed by the adapter tensors' gradients (named by its ``names`` field)."""
        frame, watcher, stop = None, None, threading.Event()
        peer = stream.remote_peer_id
        try:
            frame = await read_frame(
                stream, timeout=self.cfg.request_timeout, max_frame=self.cfg.max_frame,
                frame_timeout=self.cfg.request_timeout, budget=self.frames,
            )
            if frame.kind != kind:
                raise WireError(f"expected a {kind} frame, got {frame.kind}")
            blocks = self.check_range(frame["start"], frame["end"])
            wire = session_wire(frame.fields.get("wire"))
            hidden = frame.tensors[0]
            check_hidden(blocks, hidden)
            tokens = hidden.shape[0] * hidden.shape[1]
            if not 1 <= hidden.shape[0] <= self.cfg.max_batch or tokens > self.cfg.max_stateless_tokens:
                raise ValueError(
                    f"a {kind} pass takes batch 1 to {self.cfg.max_batch} and {self.cfg.max_stateless_tokens} "
                    f"tokens here, got {list(hidden.shape[:2])}; split it"
                )
            self.check_context(hidden.shape[1], f"a {kind} pass of length")
            base = 1 if kind == "forward" else 2
            if kind == "backward" and not frame.tensors[1].is_floating_point():
                raise ValueError(f"grad_output must be floating point, got {frame.tensors[1].dtype}")
            tensors, spec = await self.adapters.resolve(peer, frame, base, blocks)
            if kind == "backward" and tensors and frame.grant is not None:
                # the reply carries the adapter's float32 gradients, which the request (naming the
                # adapter by digest) need not: count them with the frame until the reply is written
                frame.grant.grow(sum(4 * t.numel() for t in tensors.values()))
            # the client keeps its side open until the reply: an end or a reset means nobody waits
            watcher = asyncio.create_task(_watch_for_end(stream, stop))
            if kind == "forward":
                output = await self.compute(run_forward, blocks, hidden, tensors, spec, stop.is_set)
                reply = Frame("result", {}, [await pack_off_loop(output, wire)])
            else:
                grad_input, grads = await self.compute(
                    run_backward, blocks, hidden, frame.tensors[1], tensors, spec, stop.is_set
                )
                grad_input = await pack_off_loop(grad_input, wire)
                reply = Frame("result", {"names": list(grads)}, [grad_input, *grads.values()])
            self.served(hidden.shape[0] * hidden.shape[1])  # computed: hidden was [batch, seq, hidden]
            await write_frame(stream, reply, timeout=self.cfg.request_timeout)
        except StepCancelled:
            log.info("%s request from %s abandoned by its client: stopped", kind, peer[-8:])
        except WireError as exc:
            await self.reply_error(stream, exc, exc.code)
        except FrameBudgetError as exc:
            await self.reply_error(stream, exc, BUSY)
        except (ValueError, TypeError) as exc:
            await self.reply_error(stream, exc, BAD_REQUEST)
        except (RuntimeError, MemoryError) as exc:  # our own failure: the client goes elsewhere
            log.exception("%s request from %s failed", kind, peer[-8:])
            await self.reply_error(stream, exc, SERVER_ERROR)
        except (P2PTimeoutError, StreamClosedError) as exc:
            log.info("%s request from %s ended early: %s", kind, peer[-8:], exc)
        finally:
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            if frame is not None:
                frame.release()

    async def _handle_forward(self, stream) -> None:
        await self._stateless(stream, "forward")

    async def _handle_backward(self, stream) -> None:
        await self._stateless(stream, "backward")


async def _watch_for_end(stream, stop: threading.Event) -> None:
    """Set ``stop`` when the peer sends anything more, ends its side or resets the stream."""
    try:
        await stream.read(1)
    except P2PError:
        pass
    stop.set()


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
    stop_requested = threading.Event()

    def request_stop(*_):
        stop_requested.set()
        compute.wake()

    # SIGTERM from before the start, whose ready line a supervisor may answer with a signal at
    # once: then the server stops as soon as it has started. Ctrl-C during the start interrupts it.
    signal.signal(signal.SIGTERM, request_stop)
    try:
        starting = asyncio.run_coroutine_threadsafe(BlockServer.start(cfg, on_ready, compute), background.loop)
        starting.add_done_callback(lambda _: compute.wake())
        compute.run_until(starting.done)
        server = starting.result()
        signal.signal(signal.SIGINT, request_stop)
        compute.run_until(stop_requested.is_set)
        stopping = asyncio.run_coroutine_threadsafe(server.stop(), background.loop)
        stopping.add_done_callback(lambda _: compute.wake())
        compute.run_until(stopping.done)
    finally:
        background.close()
