"""A client of the swarm: joins, keeps a table of servers, opens inference chains over them.

The client holds the embeddings and LM head itself (``swarm.engine.client.ClientModel``) and
streams hidden states through a chain of servers covering all blocks (a
:class:`~swarm.p2p.chain.RemoteChain`). The generation loop is the engine's, unchanged: a
:class:`~swarm.p2p.sync_chain.SyncChain` presents the remote chain as an inference session, so swarm
output equals local output token for token, with or without an adapter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from swarm.p2p import protocols
from swarm.p2p.chain import (  # noqa: F401  (RemoteChain, SpanFailure, SwarmError: part of this module's API)
    ChainAdapter,
    RemoteChain,
    SpanFailure,
    SwarmError,
)
from swarm.p2p.sync_chain import SyncChain
from swarm.p2p.circuits import dial_allowance
from swarm.p2p.compression import check_choice, resolve
from swarm.p2p.host import Host, P2PError
from swarm.p2p.loop import BackgroundLoop
from swarm.p2p.private import Membership, private_hint
from swarm.p2p.routing import NoRouteError, Span, find_chain
from swarm.p2p.tasks import Tasks
from swarm.p2p.table import PeerTable, announce_topic, parse_announcement
from swarm.p2p.ledger import Ledger
from swarm.p2p.verify import VerifyPolicy
from swarm.p2p.wire import Frame, RemoteError, WireError, expect

log = logging.getLogger("swarm.client")

INFO_FRAME = 16 * 2**20  # the largest info reply taken (a table of thousands of servers fits)
ACCUSE_TIMEOUT = 60.0  # s: gathering and publishing evidence against a liar, at most
ACCUSE_GRACE = 10.0  # s a closing client still gives evidence under way


@dataclass
class ClientConfig:
    initial_peers: list[str] = field(default_factory=list)
    request_timeout: float = 20.0
    step_timeout: float = 60.0
    wait_timeout: float = 30.0  # how long to wait for servers covering every block
    ban_seconds: float = 15.0  # a failed server is avoided this long (doubling on repeated failures)
    unreachable_seconds: float = 3.0  # a server whose ping failed is left out of routes this long, then pinged again
    ping_timeout: float = 1.0  # a server not answering a ping this fast is unreachable (for unreachable_seconds)
    push: bool = True  # servers hand each step's output straight to the next server of the chain
    full_precision: bool = False  # route only through servers whose weights are not quantized
    wire_dtype: str = "auto"  # hidden states on the wire: auto, float32, bfloat16 or int8 (swarm.p2p.compression)
    announce_period: float = 5.0
    membership: Membership = field(default_factory=Membership)  # a private swarm's key and allowed servers
    verify: VerifyPolicy = field(default_factory=VerifyPolicy)  # spot checks of servers' outputs (p2p/checking.py)
    ledger: Path | None = None  # where checks and bans are kept (None: in memory only)
    # blocks [start, end) run here on inputs [batch, seq, hidden] (stateless, float32) with a chain's
    # adapter: the third opinion when two servers disagree and no other serves those blocks
    arbiter: Callable[[int, int, torch.Tensor, ChainAdapter | None], torch.Tensor] | None = None


async def fetch_info(host: Host, maddr: str, timeout: float) -> dict:
    """Dial ``maddr`` and ask for its info (model, blocks, limits, table)."""
    peer = await host.connect(maddr, timeout=timeout)
    reply = await protocols.request(host, peer, protocols.INFO, Frame("info"), timeout, max_frame=INFO_FRAME)
    return expect(reply, "info_reply")["info"]


class SwarmClient:
    """Membership of one model's swarm from the client side. Create with :meth:`start`."""

    def __init__(self, host: Host, model: str, num_blocks: int, cfg: ClientConfig):
        check_choice(cfg.wire_dtype)
        self.host, self.model, self.num_blocks, self.cfg = host, model, num_blocks, cfg
        self.table = PeerTable(model, num_blocks, cfg.announce_period, allowed=cfg.membership.allowed)
        self.rtts: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._banned_until: dict[str, float] = {}
        self._unreachable_until: dict[str, float] = {}
        self._tasks = Tasks(log)  # the announcements' listener
        self.verify = cfg.verify
        self.ledger = Ledger(cfg.ledger)  # servers caught lying are never routed through
        self.arbiter = cfg.arbiter
        self.unverifiable_warned: set[tuple[str, int, int]] = set()  # (server, start, end) said to be uncheckable once
        self._accusations: set[asyncio.Task] = set()  # evidence being gathered (p2p/evidence.py)

    @classmethod
    async def start(cls, model: str, num_blocks: int, cfg: ClientConfig) -> SwarmClient:
        if not cfg.initial_peers:
            raise SwarmError(
                "no swarm to join: pass --initial-peers with a multiaddr printed by `swarm serve` (or set "
                "SWARM_INITIAL_PEERS); to start a swarm, run `swarm serve --new-swarm --blocks auto`"
            )
        # on every interface (a port no one is told of): a relayed server's connection can then be
        # made direct by hole punching, which dials from the listening port (p2p/circuits.py)
        host = await Host.start(listen_host="0.0.0.0", port=0, swarm_key=cfg.membership.key)
        client = cls(host, model, num_blocks, cfg)
        try:
            subscription = await host.subscribe(announce_topic(model))
            client._tasks.spawn(client._listen(subscription), "listen")
            await client.sync()
        except BaseException:
            await client.close()
            raise
        return client

    async def sync(self) -> None:
        """Take the current table from every initial peer (so a new client can route at once)."""
        errors = []
        for maddr in self.cfg.initial_peers:
            try:
                info = await fetch_info(self.host, maddr, self.cfg.request_timeout)
            except (P2PError, WireError, RemoteError) as exc:
                errors.append(f"{maddr}: {exc}")
                continue
            if info.get("model") != self.model:
                errors.append(f"{maddr} serves model {info.get('model')}, not {self.model} (use the same --model)")
                continue
            self._learn([info, *info.get("table", [])])
        if len(errors) == len(self.cfg.initial_peers):
            raise SwarmError("could not reach the swarm through any initial peer:\n  " + "\n  ".join(errors)
                             + private_hint(self.cfg.membership))

    def _learn(self, infos: list[dict]) -> None:
        self.table.merge(infos)
        for info in self.table.snapshot().values():
            self.host.add_addrs(info.peer_id, list(info.addrs))

    async def _listen(self, subscription) -> None:
        async for sender, data in subscription:
            try:
                info = parse_announcement(data, sender)
                if self.table.update(info):
                    self.host.add_addrs(info.peer_id, list(info.addrs))
            except Exception as exc:  # whatever a stranger sends, this listener must keep listening
                log.debug("ignoring an announcement from %s: %s", sender[-8:], exc)

    async def ping_new(self, servers, timeout: float | None = None) -> None:
        """Measure round-trip times to servers not measured yet (banned ones are skipped). A server
        that does not answer is unreachable for ``unreachable_seconds`` (see :meth:`route`), then
        pinged again."""

        snapshot = self.table.snapshot()

        async def one(peer_id: str):
            extra = dial_allowance(snapshot[peer_id].addrs if peer_id in snapshot else ())
            try:
                self.rtts[peer_id] = await self.host.ping(peer_id, timeout=(timeout or self.cfg.ping_timeout) + extra)
                self._unreachable_until.pop(peer_id, None)
            except P2PError as exc:
                log.info("server %s does not answer a ping: %s", peer_id[-8:], exc)
                self._unreachable_until[peer_id] = time.monotonic() + self.cfg.unreachable_seconds

        skip = self.banned() | self.unreachable()
        await asyncio.gather(*(one(p) for p in servers if p not in self.rtts and p not in skip))

    def wire_for(self, peer_id: str) -> str:
        """The wire dtype of a session or pass on ``peer_id``: ``cfg.wire_dtype``, with ``auto``
        resolved to the compute dtype the server announces (see :func:`~swarm.p2p.compression.resolve`)."""
        info = self.table.snapshot().get(peer_id)
        return resolve(self.cfg.wire_dtype, info.dtype if info is not None else "float32")

    def unreachable(self) -> set[str]:
        """Servers whose last ping failed lately: left out of routes (also when that opens a gap,
        unlike banned ones: a server that cannot be reached cannot serve)."""
        now = time.monotonic()
        return {p for p, until in self._unreachable_until.items() if until > now}

    def ban(self, peer_id: str) -> None:
        """Avoid ``peer_id`` for ``ban_seconds × 2^(k−1)`` after its k-th consecutive failure
        (routing still uses it when it is the only server of some block). Once the ban ends it is
        pinged again before routes count on it."""
        count = self._failures.get(peer_id, 0) + 1
        self._failures[peer_id] = count
        self._banned_until[peer_id] = time.monotonic() + self.cfg.ban_seconds * 2 ** (count - 1)
        self.rtts.pop(peer_id, None)

    def unban(self, peer_id: str) -> None:
        self._failures.pop(peer_id, None)
        self._banned_until.pop(peer_id, None)

    def banned(self) -> set[str]:
        now = time.monotonic()
        return {p for p, until in self._banned_until.items() if until > now}

    async def route(self, start: int = 0, end: int | None = None, cache_tokens: int = 0, wait: bool = True,
                    exclude=frozenset()) -> list[Span]:
        """The best chain for blocks ``[start, end)`` over servers that answer pings, never
        through ``exclude`` or a server caught lying; with ``wait``, waits up to ``wait_timeout``
        for missing blocks to be served. Raises :class:`NoRouteError` naming the missing ranges."""
        deadline = time.monotonic() + self.cfg.wait_timeout
        while True:
            try:
                left_out = set(exclude) | self.ledger.banned()
                servers = {p: s for p, s in self.table.snapshot().items() if p not in left_out}
                await self.ping_new(servers)
                unreachable = self.unreachable()
                servers = {p: s for p, s in servers.items() if p not in unreachable}
                return find_chain(
                    servers, self.num_blocks, start=start, end=end, rtts=self.rtts,
                    banned=self.banned(), cache_tokens_needed=cache_tokens, full_precision=self.cfg.full_precision,
                )
            except NoRouteError:
                if not wait or time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    async def open_chain(self, batch: int, max_length: int, adapter: ChainAdapter | None = None) -> RemoteChain:
        """Sessions for ``batch × max_length`` tokens on the best chain, each with its span's part
        of ``adapter``. Raises :class:`SwarmError` when a server refuses (a bad adapter, say)."""
        chain = RemoteChain(self, await self.route(cache_tokens=batch * max_length), batch, max_length, adapter)
        await chain.open()
        return chain

    def accuse(self, peer: str, start: int, end: int, inputs, reason: str) -> None:
        """Gather and publish evidence that ``peer`` lied on blocks ``[start, end)`` (on ``inputs``
        ``[1, n, hidden]``), in the background (see :func:`swarm.p2p.evidence.accuse`)."""
        from swarm.p2p.evidence import accuse

        async def run() -> None:
            try:
                done = await asyncio.wait_for(accuse(self, peer, start, end, inputs, reason), ACCUSE_TIMEOUT)
                log.info("evidence against %s: %s", peer[-8:], done)
            except Exception as exc:  # best effort: the ban here stands either way
                log.info("could not gather evidence against %s: %s", peer[-8:], exc)

        task = asyncio.create_task(run())
        self._accusations.add(task)
        task.add_done_callback(self._accusations.discard)

    async def close(self) -> None:
        self.ledger.save()
        if self._accusations:  # a little time to publish what was caught, then no more
            await asyncio.wait(set(self._accusations), timeout=ACCUSE_GRACE)
            for task in set(self._accusations):
                task.cancel()
            await asyncio.gather(*self._accusations, return_exceptions=True)
        await self._tasks.close()
        await self.host.close()


def chain_timeouts(cfg: ClientConfig, spans: int) -> tuple[float, float]:
    """(opening a chain, one step through a chain of ``spans`` servers): the longest each may take.
    The chain's own per-span timeouts and recovery deadlines fire first; these only guard against a
    bug."""
    setup = cfg.request_timeout * (len(cfg.initial_peers) + 1) + cfg.wait_timeout
    return setup, (cfg.step_timeout + cfg.wait_timeout) * (spans + 1) + 10


def swarm_sessions(
    background: BackgroundLoop,
    client: SwarmClient,
    adapter=None,
    on_chain: Callable[[RemoteChain], None] | None = None,
) -> Callable[[int, int], SyncChain]:
    """``open_session`` for :func:`~swarm.engine.generation.generate` over ``client`` (living on
    ``background``): each session is a chain of servers, with ``adapter``'s LoRA and deep-prompt
    tensors sent to them (its shallow prompt is the caller's prefix). ``on_chain`` is given each
    chain as it opens."""
    remote = ChainAdapter(adapter.tensors, adapter.spec) if adapter is not None and adapter.tensors else None

    def open_session(batch: int, max_length: int) -> SyncChain:
        setup, _ = chain_timeouts(client.cfg, 0)
        chain = background.call(client.open_chain(batch, max_length, remote), timeout=setup)
        if on_chain is not None:
            on_chain(chain)
        return SyncChain(background, chain, chain_timeouts(client.cfg, len(chain.spans))[1])

    return open_session


def start_client(background: BackgroundLoop, model: str, num_blocks: int, cfg: ClientConfig) -> SwarmClient:
    """Join the swarm of ``model`` on ``background``'s loop. Raises :class:`SwarmError` when no
    initial peer answers for this model, ``TimeoutError``."""
    return background.call(SwarmClient.start(model, num_blocks, cfg), timeout=chain_timeouts(cfg, 0)[0])

