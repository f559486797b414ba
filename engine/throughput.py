"""What a server adds to a chain, in tokens/s: min(compute, network), as the paper defines it.

- compute: single-token decode steps per second of one block (with a KV cache), ÷ the number of
  this server's blocks a request is expected to use, (n + 1) / 2 for a server of n blocks (a chain
  enters or leaves a server anywhere in its range). Measured once per (model, dtype, quantization,
  threads, CPU) and cached in ``$SWARM_HOME/throughput.json``, as the reference system does, so
  restarts announce at once.
- network: the link's bandwidth ÷ the bits of one token's hidden state on the wire.

And what it carries with its sessions batched (``capacity``): the same with :data:`CAPACITY_BATCH`
sessions' decode steps in each pass (:func:`measure_batch_throughput`), for balancing, which
places servers by what the swarm can carry; routing takes the one-session figure (a token's
latency) and the announced load.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from swarm.engine.checkpoint import BlockRange
from swarm.engine.default_model import swarm_home, usable_home
from swarm.engine.devices import CPU, device_name, synchronize

ASSUMED_BANDWIDTH_MBIT = 100.0  # announced when nothing was measured or given (status marks it "assumed")
WIRE_BITS = 32  # bits per value of a hidden state on the wire by default: a float32 server's (--wire-dtype auto)
CAPACITY_BATCH = 8  # sessions per pass at which a batching server's capacity is measured (a typical busy batch)


def measure_block_throughput(blocks: BlockRange, seconds: float = 0.3, max_steps: int = 128, context: int = 32) -> float:
    """Decode steps per second of one block: single-token steps with a KV cache for ``seconds``
    or ``max_steps``, whichever comes first (at least 8 steps). Long enough that a CPU quota's
    periods (100 ms by default) average out: 8 steps of a small block fit inside one burst of
    quota; 128 steps of a server limited to a share of a core take more than a period."""
    one = _first_block(blocks)
    hidden = torch.randn(1, context + 1 + max_steps, blocks.config.hidden_size, generator=torch.Generator().manual_seed(0))
    hidden = hidden.to(one.io_device)
    with torch.no_grad(), one.open_session(batch=1, max_length=context + max_steps + 2) as kv:
        one(hidden[:, :context], kv)
        one(hidden[:, context : context + 1], kv)  # warm up
        steps, t = 0, time.perf_counter()
        while steps < max_steps and (steps < 8 or time.perf_counter() - t < seconds):
            one(hidden[:, context + 1 + steps : context + 2 + steps], kv)
            steps += 1
        synchronize(one.block_devices[0])
        elapsed = time.perf_counter() - t
    return steps / elapsed


def measure_batch_throughput(blocks: BlockRange, batch: int, seconds: float = 0.3, max_steps: int = 64,
                             context: int = 32) -> float:
    """Decode steps per second of one block with ``batch`` sessions' steps in each pass, as a
    batching server runs them (linears attached and pooled: :meth:`BlockRange.run_batch`); the
    steps of all sessions count. The first block of ``blocks`` is attached in place (its modules
    are shared: measure on blocks loaded for it). As :func:`measure_block_throughput` otherwise."""
    from swarm.engine.adapters import attach

    one = _first_block(blocks)
    attach(one)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, context + 1 + max_steps, blocks.config.hidden_size, generator=generator).to(one.io_device)
    sessions = [one.open_session(batch=1, max_length=context + max_steps + 2) for _ in range(batch)]
    try:
        with torch.no_grad():
            for i, kv in enumerate(sessions):
                one(hidden[i : i + 1, :context], kv)

            def step(at: int) -> None:
                one.run_batch([(hidden[i : i + 1, at : at + 1], kv) for i, kv in enumerate(sessions)])

            step(context)  # warm up
            steps, t = 0, time.perf_counter()
            while steps < max_steps and (steps < 4 or time.perf_counter() - t < seconds):
                step(context + 1 + steps)
                steps += 1
            synchronize(one.block_devices[0])
            elapsed = time.perf_counter() - t
    finally:
        for kv in sessions:
            kv.close()
    return steps * batch / elapsed


def _first_block(blocks: BlockRange) -> BlockRange:
    """The first block of ``blocks`` alone (its module shared), taking and giving hidden states on
    its own device: a range pays the copies to and from a GPU once per step, not once per block,
    so a block's rate is measured without them."""
    one = BlockRange(blocks.family, blocks.config, blocks.start, blocks.start + 1, [blocks.blocks[0]], blocks.dtype,
                     blocks.block_devices[:1])
    one.io_device = one.block_devices[0]
    return one


def parse_throughput(spec: str) -> str | float:
    """``--throughput``: ``auto`` (the cached measurement, measured once), ``eval`` (measure again
    and update the cache) or a positive number of tokens/s, announced as it is (tests, and
    descriptions of other machines). Raises ``ValueError`` naming the flag."""
    if spec in ("auto", "eval"):
        return spec
    try:
        value = float(spec)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--throughput must be auto, eval or a positive number (tokens/s), got {spec!r}")
    return value


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what the platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cache_key(model: str, dtype: torch.dtype, quantization: str = "none", batch: int = 1, device: torch.device = CPU) -> str:
    """What a block's speed depends on: the model, dtype, quantization, threads and processor, or
    the GPU it runs on (and the sessions per pass, for a batched figure)."""
    dtype_name = str(dtype).removeprefix("torch.")
    where = f"threads={torch.get_num_threads()}/cpu={cpu_name()}" if device.type == "cpu" else f"gpu={device_name(device)}"
    key = f"{model}/{dtype_name}/quant={quantization}/{where}"
    return key if batch == 1 else f"{key}/batch={batch}"


def cached_block_throughput(model: str, dtype: torch.dtype, measure: Callable[[], float], refresh: bool = False,
                            quantization: str = "none") -> tuple[float, bool]:
    """One block's decode steps/s, cached on disk by :func:`cache_key`; ``measure()`` gives it
    (:func:`measure_block_throughput` of a block) when it is not cached or with ``refresh``.
    Returns (steps/s, whether it was measured now)."""
    (figure,), fresh = cached_block_rates(model, dtype, lambda: (measure(),), (1,), refresh, quantization)
    return figure, fresh


def cached_block_rates(model: str, dtype: torch.dtype, measure: Callable[[], tuple[float, ...]],
                       batches: tuple[int, ...], refresh: bool = False,
                       quantization: str = "none", device: torch.device = CPU) -> tuple[tuple[float, ...], bool]:
    """One block's decode steps/s with each of ``batches`` sessions per pass, cached on disk by
    :func:`cache_key`. ``measure()`` gives them all, one after another, when any is not cached
    or with ``refresh``: figures that are compared (a capacity against a throughput) are taken
    under the same conditions. Returns (steps/s per batch, whether they were measured now)."""
    path = swarm_home() / "throughput.json"
    keys = [cache_key(model, dtype, quantization, batch, device) for batch in batches]
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    figures = [cache.get(key) for key in keys]
    if not refresh and all(isinstance(f, (int, float)) and math.isfinite(f) and f > 0 for f in figures):
        return tuple(float(f) for f in figures), False
    measured = tuple(round(f, 2) for f in measure())
    cache.update(zip(keys, measured))
    path = usable_home() / path.name  # HomeError (a ValueError) when it cannot take the file
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
    tmp.replace(path)
    return measured, True


def expected_blocks_used(num_blocks: int) -> float:
    """How many of a server's ``num_blocks`` blocks a request is expected to pass through."""
    return (num_blocks + 1) / 2


def network_throughput(bandwidth_mbit: float, hidden_size: int, bits: int = WIRE_BITS) -> float:
    """Tokens/s a link of ``bandwidth_mbit`` carries: one token is one hidden state of ``bits`` per value."""
    return bandwidth_mbit * 1e6 / (hidden_size * bits)


@dataclass(frozen=True)
class Throughput:
    """What a server announces about its speed. ``throughput`` is what balancing and routing use;
    the rest says where it comes from (``source``: measured, cached or given; ``bandwidth_source``:
    measured, given or assumed)."""

    throughput: float  # tokens/s this server adds to a chain
    compute: float  # tokens/s of its compute (0: not measured, the throughput was given)
    network: float  # tokens/s its link carries
    bandwidth: float  # Mbit/s
    source: str = "measured"
    bandwidth_source: str = "assumed"
    block_rate: float = 0.0  # decode steps/s of one block, as measured (0: not measured)
    capacity: float = 0.0  # tokens/s it carries with CAPACITY_BATCH sessions per pass (min with network; 0: as throughput)
    batch_rate: float = 0.0  # decode steps/s of one block in such passes, all sessions' (0: not measured)


def server_throughput(
    block_rate: float | None, num_blocks: int, bandwidth_mbit: float, hidden_size: int,
    given: float | None = None, source: str = "measured", bandwidth_source: str = "assumed", wire_bits: int = WIRE_BITS,
    batch_rate: float | None = None,
) -> Throughput:
    """min(compute, network) for a server of ``num_blocks`` blocks, one of which runs ``block_rate``
    decode steps/s, on a link of ``bandwidth_mbit``; ``given`` (``--throughput NUMBER``) replaces
    the minimum (compute is then reported as 0 unless a ``block_rate`` is known), and is the
    capacity too. ``batch_rate``: the block's steps/s with sessions batched, for the capacity
    (without it, the capacity is the throughput)."""
    used = expected_blocks_used(num_blocks)
    compute = block_rate / used if block_rate else 0.0
    network = network_throughput(bandwidth_mbit, hidden_size, wire_bits)
    if given is not None:
        return Throughput(given, round(compute, 2), round(network, 2), bandwidth_mbit, "given", bandwidth_source,
                          block_rate or 0.0, given, 0.0)
    throughput = round(min(compute, network), 2)
    capacity = round(min(batch_rate / used, network), 2) if batch_rate else throughput
    return Throughput(throughput, round(compute, 2), round(network, 2), bandwidth_mbit,
                      source, bandwidth_source, block_rate or 0.0, max(capacity, throughput), batch_rate or 0.0)
