"""How many blocks a server can hold: its memory, less the KV cache budget, ÷ one block's weights.

A volunteer says how much memory the server may use (``--memory GB``), or the server takes what the
machine has available when it starts (on GPUs: their free memory, see :mod:`swarm.engine.devices`). Each block needs its weights (in the serving dtype) plus its
share of the KV cache budget (``--cache-tokens`` tokens × that block's keys and values), and the
process itself needs some room (:data:`RESERVED_BYTES`: interpreter, torch, buffers of requests).
"""

from __future__ import annotations

import os

import torch
from swarm.engine.checkpoint import Checkpoint
from swarm.engine.quant import matrix_bytes

RESERVED_BYTES = 512 << 20  # the process besides its blocks and caches: Python, torch, frames in flight
GIB = 1 << 30


def block_bytes(checkpoint: Checkpoint, index: int, dtype: torch.dtype, quant: str = "none") -> int:
    """Bytes of block ``index``'s weights in ``dtype``, its matrices quantized to ``quant`` (from
    the files' headers; nothing is read)."""
    prefix = checkpoint.family.block_prefix(checkpoint.config, index)
    total = 0
    for key in checkpoint.tensor_names():
        if key.startswith(prefix):
            shape = checkpoint.tensor_shape(key)
            n = 1
            for size in shape:
                n *= size
            total += matrix_bytes(*shape, quant, dtype.itemsize) if quant != "none" and len(shape) == 2 else n * dtype.itemsize
    return total


def kv_bytes_per_token(checkpoint: Checkpoint, dtype: torch.dtype) -> int:
    """Bytes one cached token takes in one block (keys and values)."""
    kv_heads, head_dim = checkpoint.family.kv_heads(checkpoint.config)
    return 2 * kv_heads * head_dim * dtype.itemsize


CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def available_memory() -> int:
    """Bytes available to this process now: the machine's ``MemAvailable`` (where that cannot be
    read, total physical memory), at most a container's memory limit (cgroup v2 or v1)."""
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for path in CGROUP_LIMITS:
        try:
            with open(path) as f:
                available = min(available, int(f.read().strip()))  # "max" (no limit) is not a number
        except (OSError, ValueError):
            pass
    return available


def blocks_that_fit(checkpoint: Checkpoint, dtype: torch.dtype, memory: int, cache_tokens: int, quant: str = "none") -> int:
    """How many consecutive blocks fit in ``memory`` bytes with a KV budget of ``cache_tokens``
    (0 when not even one does), at most the model's blocks. Blocks of a model are alike, so the
    largest one's size stands for all."""
    per_block = max(block_bytes(checkpoint, i, dtype, quant) for i in {0, checkpoint.num_blocks - 1})
    per_block += cache_tokens * kv_bytes_per_token(checkpoint, dtype)
    return max(0, min(checkpoint.num_blocks, (memory - RESERVED_BYTES) // per_block))


def device_memories(devices, memory_gb: float | None) -> list[int]:
    """Bytes each of ``devices`` may fill: ``--memory`` (GB, shared equally among them) or, without
    it, each one's free memory now (:func:`~swarm.engine.devices.free_memory`: a GPU's own, the
    machine's for the CPU)."""
    from swarm.engine.devices import free_memory

    if memory_gb is not None:
        return [int(memory_gb * GIB / len(devices))] * len(devices)
    return [free_memory(device) for device in devices]


def device_capacities(checkpoint: Checkpoint, dtype: torch.dtype, devices, memory_gb: float | None, cache_tokens: int,
                      quant: str = "none") -> list[int]:
    """How many blocks each of ``devices`` holds (see :func:`device_memories`)."""
    return [blocks_that_fit(checkpoint, dtype, memory, cache_tokens, quant) for memory in device_memories(devices, memory_gb)]


def default_num_blocks(
    checkpoint: Checkpoint, dtype: torch.dtype, memory_gb: float | None, cache_tokens: int, quant: str = "none",
    devices=(torch.device("cpu"),),
) -> int:
    """``--num-blocks`` when not given: as many blocks as fit in ``--memory`` (GB) or, without it,
    the memory available now, on ``devices`` together (a GPU's memory for blocks on it). Raises
    ``ValueError`` naming ``--memory`` (or ``--cache-tokens``) when not one block fits."""
    on_cpu = all(d.type == "cpu" for d in devices)
    if on_cpu:
        memory = int(memory_gb * GIB) if memory_gb is not None else available_memory()
        count = blocks_that_fit(checkpoint, dtype, memory, cache_tokens, quant)
    else:  # each GPU's memory asked once: the sizing and the message agree
        memories = device_memories(devices, memory_gb)
        memory = sum(memories)
        count = min(checkpoint.num_blocks,
                    sum(blocks_that_fit(checkpoint, dtype, m, cache_tokens, quant) for m in memories))
    if count < 1:
        need = (RESERVED_BYTES + max(block_bytes(checkpoint, i, dtype, quant) for i in {0, checkpoint.num_blocks - 1})
                + cache_tokens * kv_bytes_per_token(checkpoint, dtype)) / GIB
        where = f"--memory {memory_gb:g} GB" if memory_gb is not None else f"the {memory / GIB:.1f} GB available"
        where += "" if on_cpu else " on " + ",".join(str(d) for d in devices)
        raise ValueError(
            f"{where} leaves no room for one block of this model: one block with a KV budget of {cache_tokens} tokens "
            f"needs {need:.2f} GB; give more --memory or fewer --cache-tokens"
        )
    return count
