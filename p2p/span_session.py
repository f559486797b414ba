"""One server's session in an inference chain, as the client holds it (its stream, the frames
read from it, the inputs sent and the outputs returned), and the errors chains raise."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from swarm.cache.history import SpanHistory
from swarm.p2p.host import P2PTimeoutError
from swarm.p2p.routing import Span
from swarm.p2p.wire import Frame, pump_frames

if TYPE_CHECKING:
    from swarm.p2p.chain import RemoteChain

REPLY_QUEUE = 8  # frames read ahead from one server's session stream
FRAME_TIMEOUT = 30.0  # s from a reply frame's first byte to its last (plus a second per MiB)


class SwarmError(RuntimeError):
    """The swarm could not do what was asked (no peers, a server failed); the message says why."""


class SpanFailure(Exception):
    """A server of the chain failed: an error reply, an end of stream without a close frame, a
    reset connection, or no reply within the step timeout."""

    def __init__(self, peer_id: str, cause: Exception):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.peer_id, self.cause = peer_id, cause


@dataclass(eq=False)
class SpanSession:
    """An open session on one server: its stream, the frames read from it (by a reader task, so
    a wait for them can time out without cutting a frame in half) and the inputs sent to it."""

    span: Span
    stream: object
    session_id: str = ""
    wire: str = "float32"  # how its inputs and outputs travel (see swarm.p2p.compression)
    history: SpanHistory = field(default_factory=SpanHistory)
    frames: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(REPLY_QUEUE))
    reader: asyncio.Task | None = None
    arrived: asyncio.Event | None = None  # set on every frame (or read error); shared by a chain
    error: Exception | None = None  # an error reply taken out of turn: every later read raises it
    # verification (p2p/checking.py): what the server returned, reordered as the history is; the
    # positions before ``verified_to`` passed a check; steps since; the rows' reorder since then
    outputs: SpanHistory = field(default_factory=SpanHistory)
    verified_to: int = 0
    unchecked_steps: int = 0
    perm: torch.Tensor | None = None
    checker: RemoteChain | None = None  # the chain that checks this one's outputs (other servers)
    unverifiable_until: float = 0.0  # no other server held its blocks at the last try: not before this
    checking: object = None  # the check of it under way, if any

    def record(self, hidden: torch.Tensor, output: torch.Tensor | None, hypo_ids, per_position: bool) -> None:
        """Keep a step's input (and, when verifying, its output)."""
        self.history.record(hidden, hypo_ids, per_position)
        if output is not None:
            self.outputs.record(output, hypo_ids, per_position)
            self.unchecked_steps += 1
            if hypo_ids is not None:
                self.perm = hypo_ids if self.perm is None else self.perm[hypo_ids]

    def start_reading(self) -> None:
        async def put(item) -> None:
            await self.frames.put(item)  # a server that floods us only stalls its own stream
            if self.arrived is not None:
                self.arrived.set()

        self.reader = asyncio.create_task(pump_frames(self.stream, put, frame_timeout=FRAME_TIMEOUT))

    async def next_frame(self, timeout: float) -> Frame:
        """The next frame from the server; its read error if the stream failed; P2PTimeoutError
        if none comes within ``timeout`` (nothing is lost: a later call still gets it)."""
        if self.error is not None:
            raise self.error
        try:
            item = await asyncio.wait_for(self.frames.get(), timeout)
        except asyncio.TimeoutError:
            raise P2PTimeoutError(f"no reply from the server within {timeout:g} s") from None
        if isinstance(item, BaseException):
            self.frames.put_nowait(item)  # the stream is done: every later read fails the same way
            raise item
        return item

    async def reset(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        await self.stream.reset()

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        await self.stream.close()


def _short(peer_id: str) -> str:
    return "server …" + peer_id[-6:]
