"""Where a server's blocks go and how fast it says it is: the first choice of an ``auto`` range,
the throughput it announces, and the balance loop that decides when it moves. The decisions
themselves are pure functions of a table snapshot (:mod:`swarm.p2p.balance`); this module runs
them for one server, which it sees only through :class:`Placed` (the server carries a move out:
:meth:`BlockServer.move <swarm.p2p.server.BlockServer.move>`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from swarm.engine.checkpoint import BlockRange, Checkpoint, parse_dtype
from swarm.engine.families import CheckpointError
from swarm.engine.memory import default_num_blocks, device_capacities
from swarm.engine.throughput import (
    ASSUMED_BANDWIDTH_MBIT,
    CAPACITY_BATCH,
    Throughput,
    cached_block_rates,
    measure_batch_throughput,
    measure_block_throughput,
    server_throughput,
)
from swarm.p2p.balance import should_move
from swarm.p2p.host import P2PError
from swarm.p2p.routing import choose_blocks
from swarm.p2p.table import ServerInfo

if TYPE_CHECKING:
    from swarm.p2p.server import ServerConfig

log = logging.getLogger("swarm.server")

PROBE_TIMEOUT = 5.0  # seconds one peer gets for its bandwidth echoes


@runtime_checkable
class Placed(Protocol):
    """What placement needs of a server, and all it touches (a
    :class:`~swarm.p2p.server.BlockServer` is one): its options and model, the range it serves,
    the swarm as its table shows it, its compute thread, its link, and a move."""

    cfg: ServerConfig
    checkpoint: Checkpoint
    model: str  # the model's id
    speed: Throughput  # what it announces; placement measures it
    balance_checks: int  # times the balance loop looked at the swarm

    @property
    def peer_id(self) -> str: ...

    @property
    def block_range(self) -> tuple[int, int]:
        """The blocks it serves (or is loading), end exclusive."""

    @property
    def online(self) -> bool:
        """Serving its range (not loading it, moving or stopped)."""

    def snapshot(self) -> Mapping[str, ServerInfo]:
        """The servers of the swarm by peer id, itself included, as its table has them now."""

    async def compute(self, fn, *args) -> Any:
        """``fn(*args)`` on its compute thread (a block's measurement waits for the passes running)."""

    async def link_speed(self, peers: list[str], timeout: float) -> float | None:
        """Mbit/s of its link, timed against some of ``peers`` (None: none answered)."""

    async def move(self, start: int) -> None:
        """Serve as many blocks from ``start`` on."""


def auto_count(server: Placed) -> int:
    """How many blocks an ``auto`` server holds: ``--num-blocks``, else as many as fit in
    ``--memory`` (or the memory available now), at most the model's (``--num-blocks`` beyond
    it was refused at the start: :func:`~swarm.p2p.serve_options.check_num_blocks`)."""
    cfg = server.cfg
    count = cfg.num_blocks or default_num_blocks(server.checkpoint, parse_dtype(cfg.dtype), cfg.memory, cfg.cache_tokens,
                                                 cfg.quant, cfg.devices())
    return min(count, server.checkpoint.num_blocks)


def load_range(server: Placed, start: int, end: int) -> BlockRange:
    """Load blocks ``[start, end)`` as the server's options say (dtype, quantization, devices), on
    the compute thread. A range over several GPUs is split in proportion to the blocks each could
    hold when the server started (measured once: later, its own blocks fill them). A move on one
    device reuses the blocks the old range and the new one share (the old range's sessions go on
    with them while they drain), so it loads, and needs memory for, only the blocks it adds."""
    cfg, devices = server.cfg, server.cfg.devices()
    dtype = parse_dtype(cfg.dtype)
    old: BlockRange | None = getattr(server, "blocks", None)
    if len(devices) == 1 and old is not None and old.start < end and start < old.end:
        return _reuse(server.checkpoint, old, start, end, dtype, cfg.quant, devices)
    capacities = None
    if len(devices) > 1:
        capacities = getattr(server, "capacities", None)
        if capacities is None:
            capacities = device_capacities(server.checkpoint, dtype, devices, cfg.memory, cfg.cache_tokens, cfg.quant)
            server.capacities = capacities
        if sum(capacities) < end - start:  # more than fits (--num-blocks): still in proportion to their room
            capacities = [max(1, c) * (end - start) for c in capacities]
    return server.checkpoint.load_blocks(start, end, dtype, quant=cfg.quant, devices=devices, capacities=capacities)


def _reuse(checkpoint: Checkpoint, old: BlockRange, start: int, end: int, dtype, quant: str, devices) -> BlockRange:
    """Blocks ``[start, end)`` made of ``old``'s where it holds them and new ones elsewhere."""
    blocks: list = []
    index = start
    while index < end:
        if old.start <= index < old.end:
            blocks.append(old.blocks[index - old.start])
            index += 1
            continue
        stop = old.start if index < old.start else end  # a run of blocks the old range lacks
        stop = min(stop, end)
        blocks.extend(checkpoint.load_blocks(index, stop, dtype, quant=quant, devices=devices).blocks)
        index = stop
    return BlockRange(old.family, old.config, start, end, blocks, dtype, [devices[0]] * (end - start))


async def initial_range(server: Placed, count: int) -> tuple[int, int]:
    """An ``auto`` range of ``count`` blocks at the paper's best start, chosen after a random
    0–``choice_delay`` s wait so that servers started together see each other's choices (each
    announces its range, with its speed, as joining at once)."""
    if server.cfg.choice_delay > 0:
        await asyncio.sleep(random.uniform(0, server.cfg.choice_delay))
    others = {p: s for p, s in server.snapshot().items() if p != server.peer_id}
    start = choose_blocks(others, server.checkpoint.num_blocks, count)
    return start, start + count


def _peers(server: Placed) -> list[str]:
    return [p for p, s in server.snapshot().items() if p != server.peer_id and s.state == "online"]


def wire_bits(cfg) -> int:
    """Bits per value of a hidden state this server receives by default (``--wire-dtype auto``
    sends each server its own dtype: 16 for bfloat16, 32 for float32)."""
    return parse_dtype(cfg.dtype).itemsize * 8


def _measure_one_block(checkpoint, index: int, dtype, quant: str, batches: tuple[int, ...], device) -> tuple[float, ...]:
    blocks = checkpoint.load_blocks(index, index + 1, dtype, quant=quant, devices=(device,))
    return tuple(measure_block_throughput(blocks) if b == 1 else measure_batch_throughput(blocks, b) for b in batches)


async def measure_speed(server: Placed, count: int, index: int = 0) -> Throughput:
    """What a server of ``count`` blocks announces: ``--throughput NUMBER`` as it is, else
    min(compute, network) with compute from the cached (``auto``) or a new (``eval``) measurement
    of one block (block ``index``, loaded alone for it when not cached) and network from
    ``--bandwidth``, a timed echo to known servers, or the assumed default. Runs before the
    server chooses and loads its range, so that its range is announced with its speed."""
    cfg = server.cfg
    block_rate, batch_rate, source = None, None, "given"
    if isinstance(cfg.throughput, str):
        dtype = parse_dtype(cfg.dtype)
        # and, batching, what it carries with sessions batched (see engine.throughput), measured together
        batches = (1, min(cfg.batch_steps, CAPACITY_BATCH)) if cfg.batch_steps > 1 else (1,)
        rates, fresh = await server.compute(
            cached_block_rates, server.model, dtype,
            functools.partial(_measure_one_block, server.checkpoint, index, dtype, cfg.quant, batches, cfg.devices()[0]),
            batches, cfg.throughput == "eval", cfg.quant, cfg.devices()[0], kind="pass",
        )
        block_rate, batch_rate = rates[0], (rates[1] if len(rates) > 1 else None)
        source = "measured" if fresh else "cached"
    if cfg.bandwidth is not None:
        mbit, mbit_source = cfg.bandwidth, "given"
    else:
        measured = await server.link_speed(_peers(server), PROBE_TIMEOUT)
        mbit, mbit_source = (round(measured, 1), "measured") if measured else (ASSUMED_BANDWIDTH_MBIT, "assumed")
    return server_throughput(
        block_rate, count, mbit, server.checkpoint.config.hidden_size,
        given=None if isinstance(cfg.throughput, str) else float(cfg.throughput),
        source=source, bandwidth_source=mbit_source, wire_bits=wire_bits(cfg), batch_rate=batch_rate,
    )


async def measure_bandwidth_later(server: Placed) -> None:
    """A server that found no one to measure its link against (the first of a swarm) announces the
    assumed bandwidth, and measures once servers appear (checked every announce period; after a
    failed try, twice as long a wait, up to 10 minutes)."""
    wait = max(1.0, server.cfg.announce_period)
    while server.speed.bandwidth_source == "assumed":
        await asyncio.sleep(wait)
        peers = _peers(server)
        if not peers:
            continue
        measured = await server.link_speed(peers, PROBE_TIMEOUT)
        if not measured:
            wait = min(600.0, wait * 2)
        else:  # (not run when --throughput is given: the link would not change the figure)
            start, end = server.block_range
            server.speed = server_throughput(
                server.speed.block_rate, end - start, round(measured, 1),
                server.checkpoint.config.hidden_size, source=server.speed.source, bandwidth_source="measured",
                wire_bits=wire_bits(server.cfg), batch_rate=server.speed.batch_rate,
            )
            log.info("link measured: %.0f Mbit/s; announcing %.1f tokens/s", measured, server.speed.throughput)


async def balance_loop(server: Placed) -> None:
    """Every random 0–2 × ``balance_period``: move where the swarm is weakest when that raises
    its bottleneck enough (the decision: :func:`swarm.p2p.balance.should_move`, on the table as
    it is at that moment)."""
    while True:
        await asyncio.sleep(random.uniform(0, 2) * server.cfg.balance_period)
        server.balance_checks += 1
        if not server.online:
            continue
        now, end = server.block_range
        start = should_move(server.snapshot(), server.peer_id, server.checkpoint.num_blocks, server.cfg.balance_quality)
        if start is not None and start != now:
            try:
                await server.move(start)
            except (CheckpointError, RuntimeError, MemoryError, OSError, P2PError) as exc:
                log.warning("could not move to blocks %d:%d: %s", start, start + end - now, exc)
