"""An in-process server for tests that look inside it (its budgets, sessions, compute), and a raw
peer that speaks frames by hand."""

from __future__ import annotations

import struct
import threading
import time
from contextlib import asynccontextmanager

import asyncio

from swarm.p2p.host import Host
from swarm.p2p.server import BlockServer, ServerConfig


@asynccontextmanager
async def served(model, blocks: str = "0:4", **overrides):
    """A :class:`BlockServer` on this loop (announcing every second); yields (server, its multiaddr)."""
    cfg = ServerConfig(model_dir=model, blocks=blocks, new_swarm=True, announce_period=1.0, **overrides)
    server = await BlockServer.start(cfg)
    try:
        yield server, server.host.addrs[0]
    finally:
        await server.stop()


@asynccontextmanager
async def peer(maddr: str):
    """A fresh libp2p host (a new peer id) connected to ``maddr``; yields (host, the server's peer id)."""
    host = await Host.start()
    try:
        yield host, await host.connect(maddr, timeout=10)
    finally:
        await host.close()


async def eventually(condition, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition()`` until it is true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.02)


def prefix(length: int) -> bytes:
    """The u32 length that starts a frame of ``length`` body bytes."""
    return struct.pack(">I", length)


class BlockGate:
    """Forward pre-hooks on every block of a range: records each call's sequence length and, while
    closed, holds the compute thread in the first block called until :meth:`open` (or a timeout).
    Lets a test see where a pass stops without depending on how fast this machine is."""

    def __init__(self, blocks, closed: bool = False):
        self.seq_lengths: list[int] = []
        self.entered = threading.Event()
        self._open = threading.Event()
        if not closed:
            self._open.set()
        self._handles = [b.register_forward_pre_hook(self._hook) for b in blocks.blocks]

    def _hook(self, module, args):
        self.seq_lengths.append(args[0].shape[1])
        self.entered.set()
        self._open.wait(30)

    def open(self) -> None:
        self._open.set()

    def remove(self) -> None:
        self._open.set()
        for h in self._handles:
            h.remove()
