"""The link's bandwidth, measured with a short timed echo to a peer.

A server joining the swarm sends a ``probe`` frame of :data:`PROBE_BYTES` to a known server, which
echoes it back (``/swarm/probe``); a one-value probe first measures what every request costs
regardless of size (stream opening, round trip). Then

    bandwidth ≈ 2 × PROBE_BYTES × 8 / (time of the large echo − time of the small one)

in each direction's average (a link slower one way shows as the mean of both). The subtraction
takes at most half the large echo's time off (a peer slow to answer the small echo, on purpose or
busy, could otherwise make the figure anything), and no figure exceeds :data:`MAX_MBIT`. The best of a
few tries and of a few peers is kept: a busy peer or a slow path to it only makes one try slow,
while no path is faster than our own link. An echo costs the answering server exactly the bytes
its asker sent, so a stranger gains no amplification from it, and the probe's frame size is
bounded (:data:`PROBE_MAX_FRAME`) like every other frame.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import torch
from swarm.p2p import protocols
from swarm.p2p.host import P2PError, P2PTimeoutError, StreamClosedError
from swarm.p2p.limits import FrameBudgetError
from swarm.p2p.wire import BAD_FRAME, BUSY, Frame, RemoteError, WireError, read_frame, write_frame

log = logging.getLogger(__name__)

PROBE_BYTES = 1 << 20  # the large echo: long enough to dwarf per-request costs on fast links
PROBE_MAX_FRAME = PROBE_BYTES + 4096  # what a probe frame may be (header included)
TRIES = 2  # small + large pairs per peer
PEERS = 2  # peers tried
MAX_MBIT = 100_000.0  # no link measured here is faster (100 Gbit/s)


async def handle_probe(server, stream) -> None:
    """Echo one ``probe`` frame (its single tensor) back to the sender."""
    frame = None
    try:
        frame = await read_frame(
            stream, timeout=server.cfg.request_timeout, max_frame=PROBE_MAX_FRAME,
            frame_timeout=server.cfg.request_timeout, budget=server.frames,
        )
        if frame.kind != "probe":
            raise WireError(f"expected a probe frame, got {frame.kind}")
        await write_frame(stream, Frame("probe", {}, frame.tensors), timeout=server.cfg.request_timeout)
    except WireError as exc:
        await server.reply_error(stream, exc, exc.code)
    except FrameBudgetError as exc:
        await server.reply_error(stream, exc, BUSY)
    except (P2PTimeoutError, StreamClosedError):
        pass
    finally:
        if frame is not None:
            frame.release()


async def _echo_seconds(host, peer_id: str, values: int, timeout: float) -> float:
    sent = torch.zeros(values)
    t = time.perf_counter()
    reply = await protocols.request(host, peer_id, protocols.PROBE, Frame("probe", {}, [sent]), timeout,
                                    max_frame=PROBE_MAX_FRAME)
    elapsed = time.perf_counter() - t
    if reply.kind == "error":
        raise RemoteError(reply.fields.get("message", "probe refused"), reply.fields.get("code", BAD_FRAME))
    if reply.kind != "probe" or len(reply.tensors) != 1 or reply.tensors[0].numel() != values:
        raise WireError("the probe came back altered")
    return elapsed


async def measure_bandwidth(host, peer_id: str, timeout: float = 10.0, nbytes: int = PROBE_BYTES) -> float:
    """Mbit/s between us and ``peer_id`` by timed echoes (see the module's docstring). Raises the
    host's or the wire's errors when the peer does not answer properly."""
    values = nbytes // 4
    best = float("inf")
    for _ in range(TRIES):
        small = await _echo_seconds(host, peer_id, 1, timeout)
        large = await _echo_seconds(host, peer_id, values, timeout)
        best = min(best, max(large - small, large / 2))
    return min(MAX_MBIT, 2 * values * 4 * 8 / best / 1e6)


async def measure_link(host, peers: list[str], timeout: float = 10.0) -> float | None:
    """The best :func:`measure_bandwidth` over up to :data:`PEERS` of ``peers`` (random ones), or
    None when none of them answers; each peer gets ``timeout`` seconds for all its echoes (a frozen
    or slow peer delays a server's start by no more)."""
    best = None
    for peer_id in random.sample(peers, min(PEERS, len(peers))):
        try:
            mbit = await asyncio.wait_for(measure_bandwidth(host, peer_id, timeout), timeout)
        except (P2PError, WireError, RemoteError, TimeoutError) as exc:
            log.info("bandwidth probe to %s failed: %s", peer_id[-8:], exc)
            continue
        best = mbit if best is None else max(best, mbit)
    return best
