"""How fast this machine runs a block: single-token decode steps per second for one block.

Measured once per (model, dtype, threads) and cached in ``$SWARM_HOME/throughput.json``, as the
reference system does, so restarts announce at once.
"""

from __future__ import annotations

import json
import math
import time

import torch

from swarm.engine.checkpoint import BlockRange
from swarm.engine.default_model import swarm_home


def measure_block_throughput(blocks: BlockRange, steps: int = 8, context: int = 32) -> float:
    """Decode steps per second of one block (the range's time per token × its number of blocks)."""
    one = blocks.sub(blocks.start, blocks.start + 1)
    hidden = torch.randn(1, context, blocks.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), one.open_session(batch=1, max_length=context + steps + 2) as kv:
        one(hidden, kv)
        one(hidden[:, :1], kv)  # warm up
        t = time.perf_counter()
        for i in range(steps):
            one(hidden[:, i : i + 1], kv)
        elapsed = time.perf_counter() - t
    return steps / elapsed


def parse_throughput(spec: str) -> str | float:
    """``--throughput``: ``auto`` (the cached measurement, measured once), ``eval`` (measure again
    and update the cache) or a positive number of decode steps per second of one block (announced
    as it is: tests and descriptions of other machines). Raises ``ValueError`` naming the flag."""
    if spec in ("auto", "eval"):
        return spec
    try:
        value = float(spec)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--throughput must be auto, eval or a positive number (tokens/s of one block), got {spec!r}")
    return value


def cached_block_throughput(model: str, blocks: BlockRange, refresh: bool = False) -> float:
    """:func:`measure_block_throughput`, cached on disk by model, dtype and thread count
    (``refresh``: measure again and replace the cached figure)."""
    path = swarm_home() / "throughput.json"
    key = f"{model}/{str(blocks.dtype).removeprefix('torch.')}/threads={torch.get_num_threads()}"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if refresh or key not in cache:
        cache[key] = round(measure_block_throughput(blocks), 2)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(path)
    return cache[key]
