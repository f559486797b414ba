"""A server: holds blocks ``[start, end)`` of a model, announces them, runs clients' passes.

Protocols (see :mod:`swarm.p2p.protocols`):
- ``info``: model, blocks, limits, and this server's view of the swarm (so a joining peer has a
  table at once instead of waiting for the next announcements);
- ``probe``: a timed echo by which a joining server measures its link (see :mod:`swarm.p2p.bandwidth`);
- ``inference`` and ``push``: sessions with KV caches, stepped by their client and pushed along
  the chain by the servers before this one (see :mod:`swarm.p2p.sessions`);
- ``forward`` / ``backward``: stateless passes over a sub-range, optionally with a client's
  adapter (see :mod:`swarm.p2p.passes`).

Where its blocks go (an ``auto`` range, moves) is decided by :mod:`swarm.p2p.placement`, which
sees the server through :class:`~swarm.p2p.placement.Placed`. It runs in a process as `swarm
serve` does (:func:`~swarm.p2p.server_handle.serve_forever`) or beside other work
(:class:`~swarm.p2p.server_handle.Server`).

Every peer is a stranger: what one peer can make the server hold is bounded (streams per
protocol, sessions and cache tokens, bytes of frames in flight, a deadline per frame), and a bad
request gets an ``error`` frame whose code says whether the request was wrong (the client must
not retry it) or the server failed (the client fails over). Block computation runs off the event
loop (on the main thread under ``swarm serve``), one pass at a time, so the loop and libp2p's
thread keep answering while a long prefill runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
from collections import Counter
from concurrent.futures import Executor, ThreadPoolExecutor

import msgpack
import torch
from swarm import __version__
from swarm.cache.kv import KVCacheBudget
from swarm.engine.adapters import attach
from swarm.engine.checkpoint import PREFILL_CHUNK, BlockRange, Checkpoint, parse_dtype
from swarm.engine.devices import check_dtype, devices_label
from swarm.engine.fast import measure_pooling
from swarm.engine.quant import parse_quant, quantization, weight_bytes
from swarm.engine.throughput import Throughput
from swarm.p2p import nat, placement, protocols
from swarm.p2p.adapter_store import AdapterStore
from swarm.p2p.addresses import check_announce_addr, interface_ips, public_addrs
from swarm.p2p.bandwidth import handle_probe, measure_link
from swarm.p2p.host import Host, P2PError, P2PTimeoutError, StreamClosedError
from swarm.p2p.evidence import EVIDENCE_QUEUE, Recomputations, evidence_topic, judge
from swarm.p2p.identity import Identity
from swarm.p2p.limits import FrameBudget
from swarm.p2p.passes import handle_pass
from swarm.p2p.private import private_hint
from swarm.p2p.scheduler import BatchStep, ComputeQueue, Work
from swarm.p2p.serve_options import (
    check_num_blocks,
    parse_blocks,
)
from swarm.p2p.server_config import ServerConfig  # noqa: F401  (part of this module's API)
from swarm.p2p.sessions import Sessions
from swarm.p2p.table import PeerTable, ServerInfo, announce_topic, model_id, model_name, parse_announcement
from swarm.p2p.tasks import Tasks
from swarm.p2p.wire import BUSY, Frame, RemoteError, WireError, error_frame, read_frame, write_frame

log = logging.getLogger("swarm.server")


BATCH_POSITIONS = 2 * PREFILL_CHUNK  # positions of one batched pass, all its sessions' together (bounded activations)

# concurrent streams one peer may have open per protocol (inference: max_peer_sessions + 8)
PEER_STREAMS = {protocols.PROBE: 2, protocols.DIALBACK: 1, protocols.INFO: 8, protocols.PUSH: 8, protocols.FORWARD: 8, protocols.BACKWARD: 8}


class BlockServer:
    """One running server. Create with :meth:`start`, stop with :meth:`stop`."""

    def __init__(self, cfg: ServerConfig, host: Host, checkpoint: Checkpoint, model: str, executor: Executor | None = None):
        self.cfg, self.host, self.checkpoint, self.model = cfg, host, checkpoint, model
        self.model_name = model_name(cfg.model_dir)  # what people call it; ``model`` is what it is
        self.num_blocks = checkpoint.num_blocks
        self.addrs = list(host.addrs)  # what it announces (see start)
        self.table = PeerTable(model, self.num_blocks, cfg.announce_period, allowed=cfg.membership.allowed)
        self.budget = KVCacheBudget(cfg.cache_tokens)
        self.device_label = devices_label(cfg.devices())  # what it announces: cpu, or its GPUs' names
        self.blocks: BlockRange | None = None
        self.capacities: list[int] | None = None  # blocks each of several GPUs could hold at start (placement.load_range)
        self.start_block = self.end_block = 0
        self.state = "joining"
        self.reach = "unknown"  # what it announces: public, private, relayed or unknown (p2p/nat.py)
        self.direct_reach = "unknown"  # whether peers can dial it at its own addresses
        self.direct_addrs = list(self.addrs)  # its own addresses (``addrs``: through relays when nobody can dial those)
        self.relays: dict[str, str] = {}  # relay peer id -> its circuit address through it
        self.dialbacks = asyncio.Semaphore(nat.MAX_DIALBACKS)  # dial-backs it makes for others at once
        self.speed = Throughput(0.0, 0.0, 0.0, 0.0)  # what it announces (measured before it chooses)
        self.frames = FrameBudget(cfg.frame_memory, min(cfg.peer_frame_memory, cfg.frame_memory))
        self.peer_cache_tokens = max(1, int(cfg.peer_cache_share * cfg.cache_tokens))
        self.context = checkpoint.config.max_positions  # None: no fixed limit (ALiBi)
        self.inference = Sessions(self)
        self.adapters = AdapterStore(cfg.adapter_memory, cfg.peer_adapter_memory)
        self._streams: Counter = Counter()  # (peer, protocol) -> streams open now
        # block computation: one call at a time, off the event loop (see MainThreadExecutor)
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="swarm-compute")
        # what runs there next, and which sessions' steps run together (batched once blocks load)
        self.queue = ComputeQueue(self._executor, 1, BATCH_POSITIONS)
        # allocating, zeroing and freeing KV caches: off the event loop, not queued behind compute
        self._memory = ThreadPoolExecutor(1, thread_name_prefix="swarm-memory")
        self._tasks = Tasks(log)  # its background tasks: announcements, placement, the table's listener
        self._stopped = asyncio.Event()
        self._cache_changed = asyncio.Event()
        self._moved_from: tuple[int, int] | None = None  # the range held before the last move
        self.moves: list[dict] = []  # recent moves: {"time", "from", "to"}
        self.balance_checks = 0  # times the balance loop looked at the swarm
        self._served_tokens = 0  # tokens computed since the last announcement (the load announced)
        self._served_lock = threading.Lock()
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
            check_dtype(cfg.devices(), dtype)  # and --device: one line before anything starts
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
        host = await Host.start(
            listen_host=cfg.listen_host, port=cfg.port, identity=cfg.identity, swarm_key=cfg.membership.key,
            relay_slots=cfg.relay_slots,
        )
        server = cls(cfg, host, checkpoint, model, executor)
        try:
            if not cfg.membership.may_serve(host.peer_id):
                raise ValueError(f"--allow-peers: this server's peer id {host.peer_id} is not on the list "
                                 "(add it, or the other members will ignore this server)")
            server.addrs = [check_announce_addr(a, host.peer_id) for a in cfg.announce_addrs] or public_addrs(
                host.addrs, interface_ips()
            )
            server.direct_addrs = list(server.addrs)
            host.set_stream_handler(protocols.INFO, server._limited(protocols.INFO, server._handle_info))
            host.set_stream_handler(protocols.PROBE, server._limited(protocols.PROBE, functools.partial(handle_probe, server)))
            host.set_stream_handler(protocols.DIALBACK, server._limited(protocols.DIALBACK,
                                                                        functools.partial(nat.handle_dialback, server)))
            await server._join()
            if cfg.require_reachable:
                await server._check_reach()
            count = fixed[1] - fixed[0] if fixed else placement.auto_count(server)
            # the speed first: a range announced as joining counts with it, so servers starting
            # together (and the balance checks of the others) see what is being loaded
            server.speed = await placement.measure_speed(server, count, fixed[0] if fixed else 0)
            start, end = fixed if fixed else await placement.initial_range(server, count)
            server.start_block, server.end_block = start, end
            await server._announce(direct=True)  # joining: others see the range being loaded
            loop = asyncio.get_running_loop()
            server.blocks = await loop.run_in_executor(server._executor, placement.load_range, server, start, end)
            attach(server.blocks)  # adapters are lent to passes from outside (engine/adapters.py)
            server._set_batching()
            if server.queue.max_batch > 1:  # what each linear may pool in a batched pass, measured here
                pooling = await loop.run_in_executor(server._executor, measure_pooling, server.blocks, server.blocks.dtype)
                log.info("batched passes pool rows per linear call (rows: linears): %s", pooling)
            host.set_stream_handler(protocols.INFERENCE, server._limited(protocols.INFERENCE, server.inference.handle_inference))
            host.set_stream_handler(protocols.PUSH, server._limited(protocols.PUSH, server.inference.handle_push))
            for protocol, kind in ((protocols.FORWARD, "forward"), (protocols.BACKWARD, "backward")):
                host.set_stream_handler(protocol, server._limited(protocol, functools.partial(handle_pass, server, kind)))
            server.state = "online"
            await server._announce(direct=True)
            server._tasks.spawn(server._announce_loop(), "announce")
            server._tasks.spawn(nat.reachability_loop(server, first=not cfg.require_reachable), "reachability")
            if server.speed.bandwidth_source == "assumed" and server.speed.source != "given":
                server._tasks.spawn(placement.measure_bandwidth_later(server), "measure bandwidth")
            if fixed is None and cfg.balance_quality > 0:  # a range given by hand stays where it is
                server._tasks.spawn(placement.balance_loop(server), "balance")
        except BaseException:
            await server._release()
            raise
        if on_ready is not None:
            on_ready(server)
        return server

    async def _check_reach(self) -> None:
        """Whether peers can dial this server at its addresses (see :mod:`swarm.p2p.nat`); with
        ``require_reachable``, ConnectionError unless some peer reached one."""
        reach = await nat.check_reachability(self)
        self.reach = reach
        if self.cfg.require_reachable and reach != "public":
            why = ("no peer could dial it at " + ", ".join(self.direct_addrs) if reach == "private"
                   else "no other server answered a dial-back to confirm it")
            raise ConnectionError(f"--require-reachable: this server is not reachable ({why}); check --announce-addr, "
                                  "port forwarding and firewalls")

    async def _join(self) -> None:
        """Subscribe to the model's topic, dial the initial peers and take their tables."""
        subscription = await self.host.subscribe(announce_topic(self.model))
        self._tasks.spawn(self._listen(subscription), "listen")
        accusations = await self.host.subscribe(evidence_topic(self.model), limit=EVIDENCE_QUEUE)
        self._tasks.spawn(self._judge(accusations), "evidence")
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
            raise ConnectionError("could not join the swarm through any initial peer:\n  " + "\n  ".join(errors)
                                  + private_hint(self.cfg.membership))
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
        await self._release()

    async def _release(self) -> None:
        """Stop the background tasks, close the host, let the executors' threads go."""
        await self._tasks.close()
        await self.host.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._memory.shutdown(wait=False, cancel_futures=True)

    # ---- placement (decided by swarm.p2p.placement) ----------------------------------------

    # what placement sees of a server (swarm.p2p.placement.Placed), besides cfg, checkpoint,
    # model, speed, balance_checks and compute

    @property
    def peer_id(self) -> str:
        return self.host.peer_id

    @property
    def block_range(self) -> tuple[int, int]:
        return self.start_block, self.end_block

    @property
    def online(self) -> bool:
        return self.state == "online"

    def snapshot(self) -> dict[str, ServerInfo]:
        return self.table.snapshot()

    async def link_speed(self, peers: list[str], timeout: float) -> float | None:
        return await measure_link(self.host, peers, timeout)

    async def move(self, start: int) -> None:
        """Serve the same number of blocks from ``start`` on: announce the new range as joining,
        load it, announce it online; sessions on the old range may finish within
        ``drain_timeout``, then end with ``session_expired`` (their clients fail over, replaying
        their history, so their output stays exact). Requests for the old range from clients
        with an older view are answered ``busy`` (they go elsewhere). If loading fails, the
        server stays on its old range."""
        old_blocks, old_range = self.blocks, (self.start_block, self.end_block)
        end = start + old_range[1] - old_range[0]
        log.info("moving from blocks %d:%d to %d:%d", *old_range, start, end)
        try:
            self._moved_from = old_range
            self.state, self.start_block, self.end_block = "joining", start, end
            await self._announce_move()
            blocks = await self.compute(
                placement.load_range, self, start, end,
                kind="pass",  # the server's own work: after the steps of the range it still serves
            )
        except BaseException:
            self._moved_from = None
            self.state, self.start_block, self.end_block = "online", *old_range
            await self._announce_move()
            raise
        self.blocks = attach(blocks)
        self._set_batching()
        self.state = "online"
        self.moves = [*self.moves[-9:], {"time": time.time(), "from": list(old_range), "to": [start, end]}]
        await self._announce_move()
        await self.inference.drain(old_blocks, self.cfg.drain_timeout)

    async def _announce_move(self) -> None:
        """Announce a step of a move, best effort: a failed announcement must not leave a move half
        done (the periodic announcements repeat it)."""
        try:
            await self._announce(direct=True)
        except (P2PError, OSError) as exc:
            log.warning("could not announce blocks %d:%d (%s): %s", self.start_block, self.end_block, self.state, exc)

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
            capacity=self.speed.capacity,
            dtype=self.cfg.dtype,
            quant=quantization(self.blocks) if self.blocks is not None else self.cfg.quant,
            weight_bytes=weight_bytes(self.blocks) if self.blocks is not None else 0,
            cache_tokens_left=self.budget.tokens_left,
            version=__version__,
            public_name=self.cfg.public_name,
            device=self.device_label,
            period=self.cfg.announce_period,
            instance=self.host.instance,
            sessions=len(self.sessions),
            served=round(self._served_rate, 2),
            queued=self.queue.waiting(),
            batch=round(self.queue.occupancy, 2) if self.queue.passes else 0.0,
            max_batch=self.queue.max_batch,
            compute=self.speed.compute,
            network=self.speed.network,
            bandwidth=self.speed.bandwidth,
            bandwidth_source=self.speed.bandwidth_source,
            throughput_source=self.speed.source,
            moves=tuple((m["time"], *m["from"], *m["to"]) for m in self.moves),
            reach=self.reach,
            relay=self.cfg.relay_slots > 0 and self.reach in ("public", "unknown"),
            received=time.monotonic(),
        )

    def served(self, tokens: int) -> None:
        """Count ``tokens`` computed for a client (the load announced as ``served`` tokens/s).
        Thread-safe (sessions step on the libp2p thread)."""
        with self._served_lock:
            self._served_tokens += tokens

    async def _announce(self, direct: bool = False) -> None:
        """Publish our info on the model's topic; with ``direct``, also send it straight to every
        server we know (gossip is best-effort and a message published just before the host
        closes, or just after it joins the mesh, may never leave)."""
        now = time.monotonic()
        if now - self._served_since >= min(1.0, self.cfg.announce_period):
            with self._served_lock:
                served, self._served_tokens = self._served_tokens, 0
            self._served_rate = served / (now - self._served_since)
            self._served_since = now
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

    async def _judge(self, subscription) -> None:
        """Accusations of servers lying, judged one at a time (see :mod:`swarm.p2p.evidence`)."""
        judged = Recomputations()
        async for sender, data in subscription:
            try:
                outcome = await judge(self, sender, data, judged)
                loud = "banned" in outcome or ("ignored" in outcome and judged.loud(sender))
                log.log(logging.WARNING if loud else logging.INFO, "an accusation from %s %s", sender[-8:], outcome)
            except Exception as exc:  # our blocks moved meanwhile, a cancelled computation...
                log.info("an accusation from %s could not be judged: %s", sender[-8:], exc)

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

    def submit(self, fn, *args, session=None, peer: str = "", kind: str = "step") -> concurrent.futures.Future:
        """Queue ``fn(*args)`` for the compute thread (one call at a time) as ``peer``'s work of
        ``kind`` (``"step"``: inference, first; ``"pass"``: training and the server's own work; see
        :mod:`swarm.p2p.scheduler`); its future. With a ``session``, its ``computing`` is the call,
        so whoever frees the session can wait for the call to stop. Thread-safe."""
        future = self.queue.submit(Work(peer=peer, kind=kind, fn=fn, args=args))
        if session is not None:
            session.computing = future
        return future

    async def compute(self, fn, *args, session=None, peer: str = "", kind: str = "step"):
        """:meth:`submit`, awaited on the event loop."""
        return await asyncio.wrap_future(self.submit(fn, *args, session=session, peer=peer, kind=kind))

    def submit_step(
        self, session, hidden: torch.Tensor, per_position: bool = False, rewind_to: int | None = None
    ) -> concurrent.futures.Future:
        """Queue a plain step of ``session`` (batch 1, no adapter, at most a prefill chunk), which
        the compute thread may run together with other sessions' (see :mod:`swarm.p2p.scheduler`,
        :class:`~swarm.p2p.scheduler.BatchStep` for ``per_position`` and ``rewind_to``); its
        future gives (output, True) as :func:`~swarm.engine.steps.run_step` does. Thread-safe."""
        blocks = session.blocks
        step = BatchStep(blocks, hidden, session.kv, session.stop.is_set, per_position, rewind_to)
        work = Work(peer=session.peer, kind="step", positions=hidden.shape[1], batch_key=(id(blocks.blocks[0]), blocks.end),
                    batch=step)
        future = self.queue.submit(work)
        session.computing = future
        return future

    def _set_batching(self) -> None:
        """``--max-batch`` sessions per pass (exact whatever the kernels: attached blocks run each
        linear over only as many sessions' rows as it was measured invariant for, see
        swarm.engine.fast)."""
        self.queue.max_batch = self.cfg.batch_steps if self.blocks.batch_exact else 1

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
