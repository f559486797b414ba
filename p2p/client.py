"""A client of the swarm: joins, keeps a table of servers, opens inference chains over them.

The client holds the embeddings and LM head itself (``swarm.engine.client.ClientModel``) and
streams hidden states through a chain of servers covering all blocks. The generation loop is the
engine's, unchanged: a :class:`SyncChain` presents the remote chain as an inference session, so
swarm output equals local output token for token.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import torch

from swarm.p2p import protocols
from swarm.p2p.host import Host, P2PError
from swarm.p2p.loop import BackgroundLoop
from swarm.p2p.routing import NoRouteError, Span, find_chain
from swarm.p2p.table import PeerTable, ServerInfo, announce_topic
from swarm.p2p.wire import Frame, RemoteError, WireError, expect, read_frame, write_frame

log = logging.getLogger("swarm.client")


class SwarmError(RuntimeError):
    """The swarm could not do what was asked (no peers, a server failed); the message says why."""


@dataclass
class ClientConfig:
    initial_peers: list[str] = field(default_factory=list)
    request_timeout: float = 20.0
    step_timeout: float = 60.0
    wait_timeout: float = 30.0  # how long to wait for servers covering every block
    announce_period: float = 5.0


async def fetch_info(host: Host, maddr: str, timeout: float) -> dict:
    """Dial ``maddr`` and ask for its info (model, blocks, limits, table)."""
    peer = await host.connect(maddr, timeout=timeout)
    reply = await protocols.request(host, peer, protocols.INFO, Frame("info"), timeout)
    return expect(reply, "info_reply")["info"]


class SwarmClient:
    """Membership of one model's swarm from the client side. Create with :meth:`start`."""

    def __init__(self, host: Host, model: str, num_blocks: int, cfg: ClientConfig):
        self.host, self.model, self.num_blocks, self.cfg = host, model, num_blocks, cfg
        self.table = PeerTable(model, num_blocks, cfg.announce_period)
        self.rtts: dict[str, float] = {}
        self._tasks: list[asyncio.Task] = []

    @classmethod
    async def start(cls, model: str, num_blocks: int, cfg: ClientConfig) -> SwarmClient:
        if not cfg.initial_peers:
            raise SwarmError(
                "no swarm to join: pass --initial-peers with a multiaddr printed by `swarm serve` (or set "
                "SWARM_INITIAL_PEERS); to start a swarm, run `swarm serve --new-swarm --blocks auto`"
            )
        host = await Host.start(listen_host="127.0.0.1", port=0)
        client = cls(host, model, num_blocks, cfg)
        try:
            subscription = await host.subscribe(announce_topic(model))
            client._tasks.append(asyncio.create_task(client._listen(subscription)))
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
            raise SwarmError("could not reach the swarm through any initial peer:\n  " + "\n  ".join(errors))

    def _learn(self, infos: list[dict]) -> None:
        self.table.merge(infos)
        for info in self.table.snapshot().values():
            self.host.add_addrs(info.peer_id, list(info.addrs))

    async def _listen(self, subscription) -> None:
        async for sender, data in subscription:
            try:
                info = ServerInfo.from_wire(msgpack.unpackb(data, raw=False))
            except (ValueError, msgpack.UnpackException, TypeError):
                continue
            if info.peer_id == sender and self.table.update(info):
                self.host.add_addrs(info.peer_id, list(info.addrs))

    async def ping_all(self, timeout: float = 2.0) -> dict[str, float]:
        """Round-trip times to every known server (unreachable ones are left out)."""

        async def one(peer_id: str):
            try:
                self.rtts[peer_id] = await self.host.ping(peer_id, timeout=timeout)
            except P2PError:
                self.rtts.pop(peer_id, None)

        await asyncio.gather(*(one(p) for p in self.table.snapshot()))
        return dict(self.rtts)

    async def route(self, cache_tokens: int = 0) -> list[Span]:
        """A chain covering every block, waiting up to ``wait_timeout`` for missing blocks to be
        served. Raises :class:`NoRouteError` naming the missing ranges."""
        deadline = time.monotonic() + self.cfg.wait_timeout
        while True:
            try:
                servers = self.table.snapshot()
                await self.ping_all()
                return find_chain(servers, self.num_blocks, rtts=self.rtts, cache_tokens_needed=cache_tokens)
            except NoRouteError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    async def open_chain(self, batch: int, max_length: int) -> RemoteChain:
        chain = RemoteChain(self, await self.route(batch * max_length), batch, max_length)
        await chain.open()
        return chain

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.host.close()


class RemoteChain:
    """Inference sessions on a chain of servers, stepped together.

    Every step sends the hidden states through the spans in order; ``position`` is the global
    position of the step's first token, checked by every server against its cache.
    """

    def __init__(self, client: SwarmClient, spans: list[Span], batch: int, max_length: int):
        self.client, self.spans, self.batch, self.max_length = client, spans, batch, max_length
        self.streams: list = []
        self.position = 0

    async def open(self) -> None:
        timeout = self.client.cfg.request_timeout
        try:
            for span in self.spans:
                stream = await self.client.host.open_stream(span.peer_id, protocols.INFERENCE, timeout=timeout)
                self.streams.append(stream)
                opening = Frame("open", {"start": span.start, "end": span.end, "batch": self.batch, "max_length": self.max_length})
                await write_frame(stream, opening, timeout=timeout)
                expect(await read_frame(stream, timeout=timeout), "opened")
        except (P2PError, WireError, RemoteError) as exc:
            await self.close()
            raise SwarmError(f"could not open an inference session on {_describe(span)}: {exc}") from exc

    async def step(self, hidden: torch.Tensor, hypo_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden: [batch, seq, hidden]`` through every span; returns the last span's output."""
        step_id = uuid.uuid4().hex[:16]
        dtype = hidden.dtype
        for span, stream in zip(self.spans, self.streams):
            tensors = [hidden] if hypo_ids is None else [hidden, hypo_ids.to(torch.int64)]
            frame = Frame("step", {"step_id": step_id, "position": self.position}, tensors)
            try:
                await write_frame(stream, frame, timeout=self.client.cfg.step_timeout)
                hidden = expect(await read_frame(stream, timeout=self.client.cfg.step_timeout), "output").tensors[0]
            except (P2PError, WireError, RemoteError) as exc:
                raise SwarmError(f"{_describe(span)} failed: {exc}") from exc
        self.position += hidden.shape[1]
        return hidden.to(dtype)

    async def close(self) -> None:
        """Send every server an explicit close (so it frees the cache at once)."""
        for stream in self.streams:
            try:
                await write_frame(stream, Frame("close"), timeout=2)
                await read_frame(stream, timeout=2)
            except (P2PError, WireError):
                pass
            finally:
                try:
                    await stream.close()
                except P2PError:
                    pass
        self.streams = []


def _describe(span: Span) -> str:
    return f"server {span.peer_id[-8:]} (blocks {span.start}:{span.end})"


class SyncChain:
    """A :class:`RemoteChain` as the engine's synchronous inference session."""

    def __init__(self, background: BackgroundLoop, chain: RemoteChain, timeout: float):
        self.background, self.chain, self.timeout = background, chain, timeout

    def step(self, hidden: torch.Tensor, hypo_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.background.call(self.chain.step(hidden, hypo_ids), timeout=self.timeout)

    def close(self) -> None:
        self.background.call(self.chain.close(), timeout=self.timeout)


def generate_swarm(
    client_model,
    model: str,
    prompt_ids: list[int],
    gen_cfg,
    cfg: ClientConfig,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """The engine's generation loop over a chain of servers (see :func:`swarm.engine.generation.generate`)."""
    from swarm.engine.generation import generate

    background = BackgroundLoop()
    client = None
    try:
        setup_timeout = cfg.request_timeout * (len(cfg.initial_peers) + 1) + cfg.wait_timeout
        client = background.call(SwarmClient.start(model, client_model.checkpoint.num_blocks, cfg), timeout=setup_timeout)

        def open_session(batch: int, max_length: int) -> SyncChain:
            chain = background.call(client.open_chain(batch, max_length), timeout=setup_timeout)
            # the chain's own per-span timeouts fire first; this one only guards against a bug
            return SyncChain(background, chain, cfg.step_timeout * (len(chain.spans) + 1) + 10)

        return generate(client_model.head, open_session, prompt_ids, gen_cfg, on_token)
    finally:
        if client is not None:
            background.call(client.close(), timeout=15)
        background.close()
