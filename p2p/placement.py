"""Where a server's blocks go and how fast it says it is: the first choice of an ``auto`` range,
the throughput it announces, the balance loop and moves. The decisions themselves are pure
functions of a table snapshot (:mod:`swarm.p2p.balance`); this module runs them for one
:class:`~swarm.p2p.server.BlockServer` and carries them out.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from typing import TYPE_CHECKING

from swarm.engine.adapters import attach
from swarm.engine.checkpoint import parse_dtype
from swarm.engine.families import CheckpointError
from swarm.engine.memory import default_num_blocks
from swarm.engine.throughput import (
    ASSUMED_BANDWIDTH_MBIT,
    Throughput,
    cached_block_throughput,
    measure_block_throughput,
    server_throughput,
)
from swarm.p2p.balance import should_move
from swarm.p2p.bandwidth import measure_link
from swarm.p2p.host import P2PError
from swarm.p2p.routing import choose_blocks

if TYPE_CHECKING:
    from swarm.p2p.server import BlockServer

log = logging.getLogger("swarm.server")

PROBE_TIMEOUT = 5.0  # seconds one peer gets for its bandwidth echoes


def auto_count(server: BlockServer) -> int:
    """How many blocks an ``auto`` server holds: ``--num-blocks``, else as many as fit in
    ``--memory`` (or the memory available now), at most the model's (``--num-blocks`` beyond
    it was refused at the start: :func:`~swarm.p2p.serve_options.check_num_blocks`)."""
    cfg = server.cfg
    count = cfg.num_blocks or default_num_blocks(server.checkpoint, parse_dtype(cfg.dtype), cfg.memory, cfg.cache_tokens, cfg.quant)
    return min(count, server.num_blocks)


async def initial_range(server: BlockServer, count: int) -> tuple[int, int]:
    """An ``auto`` range of ``count`` blocks at the paper's best start, chosen after a random
    0–``choice_delay`` s wait so that servers started together see each other's choices (each
    announces its range, with its speed, as joining at once)."""
    if server.cfg.choice_delay > 0:
        await asyncio.sleep(random.uniform(0, server.cfg.choice_delay))
    others = {p: s for p, s in server.table.snapshot().items() if p != server.host.peer_id}
    start = choose_blocks(others, server.num_blocks, count)
    return start, start + count


def _peers(server: BlockServer) -> list[str]:
    return [p for p, s in server.table.snapshot().items() if p != server.host.peer_id and s.state == "online"]


def wire_bits(cfg) -> int:
    """Bits per value of a hidden state this server receives by default (``--wire-dtype auto``
    sends each server its own dtype: 16 for bfloat16, 32 for float32)."""
    return parse_dtype(cfg.dtype).itemsize * 8


def _measure_one_block(checkpoint, index: int, dtype, quant: str) -> float:
    return measure_block_throughput(checkpoint.load_blocks(index, index + 1, dtype, quant=quant))


async def measure_speed(server: BlockServer, count: int, index: int = 0) -> Throughput:
    """What a server of ``count`` blocks announces: ``--throughput NUMBER`` as it is, else
    min(compute, network) with compute from the cached (``auto``) or a new (``eval``) measurement
    of one block (block ``index``, loaded alone for it when not cached) and network from
    ``--bandwidth``, a timed echo to known servers, or the assumed default. Runs before the
    server chooses and loads its range, so that its range is announced with its speed."""
    cfg = server.cfg
    block_rate, source = None, "given"
    if isinstance(cfg.throughput, str):
        loop = asyncio.get_running_loop()
        dtype = parse_dtype(cfg.dtype)
        block_rate, fresh = await loop.run_in_executor(
            server._executor, cached_block_throughput, server.model, dtype,
            functools.partial(_measure_one_block, server.checkpoint, index, dtype, cfg.quant), cfg.throughput == "eval",
            cfg.quant,
        )
        source = "measured" if fresh else "cached"
    if cfg.bandwidth is not None:
        mbit, mbit_source = cfg.bandwidth, "given"
    else:
        measured = await measure_link(server.host, _peers(server), PROBE_TIMEOUT)
        mbit, mbit_source = (round(measured, 1), "measured") if measured else (ASSUMED_BANDWIDTH_MBIT, "assumed")
    return server_throughput(
        block_rate, count, mbit, server.checkpoint.config.hidden_size,
        given=None if isinstance(cfg.throughput, str) else float(cfg.throughput),
        source=source, bandwidth_source=mbit_source, wire_bits=wire_bits(cfg),
    )


async def measure_bandwidth_later(server: BlockServer) -> None:
    """A server that found no one to measure its link against (the first of a swarm) announces the
    assumed bandwidth, and measures once servers appear (checked every announce period; after a
    failed try, twice as long a wait, up to 10 minutes)."""
    wait = max(1.0, server.cfg.announce_period)
    while server.speed.bandwidth_source == "assumed":
        await asyncio.sleep(wait)
        peers = _peers(server)
        if not peers:
            continue
        measured = await measure_link(server.host, peers, PROBE_TIMEOUT)
        if not measured:
            wait = min(600.0, wait * 2)
        else:  # (not run when --throughput is given: the link would not change the figure)
            server.speed = server_throughput(
                server.speed.block_rate, server.end_block - server.start_block, round(measured, 1),
                server.checkpoint.config.hidden_size, source=server.speed.source, bandwidth_source="measured",
                wire_bits=wire_bits(server.cfg),
            )
            log.info("link measured: %.0f Mbit/s; announcing %.1f tokens/s", measured, server.speed.throughput)


async def balance_loop(server: BlockServer) -> None:
    """Every random 0–2 × ``balance_period``: move where the swarm is weakest when that raises
    its bottleneck enough (the decision: :func:`swarm.p2p.balance.should_move`, on the table as
    it is at that moment)."""
    while True:
        await asyncio.sleep(random.uniform(0, 2) * server.cfg.balance_period)
        server.balance_checks += 1
        if server.state != "online":
            continue
        start = should_move(server.table.snapshot(), server.host.peer_id, server.num_blocks, server.cfg.balance_quality)
        if start is not None and start != server.start_block:
            try:
                await move(server, start)
            except (CheckpointError, RuntimeError, MemoryError, OSError, P2PError) as exc:
                log.warning("could not move to blocks %d:%d: %s", start,
                            start + server.end_block - server.start_block, exc)


async def move(server: BlockServer, start: int) -> None:
    """Serve the same number of blocks from ``start`` on: announce the new range as joining,
    load it, announce it online; sessions on the old range may finish within
    ``drain_timeout``, then end with ``session_expired`` (their clients fail over, replaying
    their history, so their output stays exact). Requests for the old range from clients
    with an older view are answered ``busy`` (they go elsewhere). If loading fails, the
    server stays on its old range."""
    old_blocks, old_range = server.blocks, (server.start_block, server.end_block)
    end = start + old_range[1] - old_range[0]
    log.info("moving from blocks %d:%d to %d:%d", *old_range, start, end)
    try:
        server._moved_from = old_range
        server.state, server.start_block, server.end_block = "joining", start, end
        await _announce(server)
        blocks = await asyncio.get_running_loop().run_in_executor(
            server._executor,
            functools.partial(server.checkpoint.load_blocks, start, end, parse_dtype(server.cfg.dtype), quant=server.cfg.quant),
        )
    except BaseException:
        server._moved_from = None
        server.state, server.start_block, server.end_block = "online", *old_range
        await _announce(server)
        raise
    server.blocks = attach(blocks)
    server.state = "online"
    server.moves = [*server.moves[-9:], {"time": time.time(), "from": list(old_range), "to": [start, end]}]
    await _announce(server)
    await server.inference.drain(old_blocks, server.cfg.drain_timeout)


async def _announce(server: BlockServer) -> None:
    """Announce a step of a move, best effort: a failed announcement must not leave a move half
    done (the periodic announcements repeat it)."""
    try:
        await server._announce(direct=True)
    except (P2PError, OSError) as exc:
        log.warning("could not announce blocks %d:%d (%s): %s", server.start_block, server.end_block, server.state, exc)
