"""Where blocks and heads compute: ``--device auto|cpu|cuda|cuda:N|cuda:0,cuda:1``.

A process computes on the CPU or on one or more GPUs. Several GPUs in one server hold
consecutive parts of its range (a pipeline inside the server: a step's hidden states go from one
GPU to the next). Hidden states enter and leave a :class:`~swarm.engine.checkpoint.BlockRange`
on the CPU, where the wire is; weights, KV caches and compute live on the devices.

The choices (:func:`parse_device`, :func:`split_range`) are pure functions over what the machine
has; :func:`gpu_count` and :func:`free_memory` ask the machine.
"""

from __future__ import annotations

import torch

CPU = torch.device("cpu")
# the most a GPU leaves to what is not weights or caches: the CUDA context, cuBLAS workspaces and
# a step's activations (of the free memory at start, the larger of this and GPU_RESERVED_SHARE)
GPU_RESERVED_BYTES = 1 << 30
GPU_RESERVED_SHARE = 0.08


def gpu_count() -> int:
    """GPUs torch can use here (0 with a CPU-only build or no driver)."""
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except (RuntimeError, AssertionError):  # a driver that fails to initialise
        return 0


def parse_device(spec: str, gpus: int | None = None, flag: str = "--device") -> tuple[torch.device, ...]:
    """The devices ``spec`` names, on a machine with ``gpus`` GPUs (None: ask torch). ``auto``:
    the first GPU where there is one, else the CPU; ``cuda``: the first GPU; ``cuda:N``; a
    comma-separated list of distinct GPUs (a server's range split over them, in that order).
    Raises ``ValueError`` naming ``flag``: one line, what to use instead."""
    text = str(spec).strip().lower()
    if gpus is None:
        gpus = gpu_count() if text != "cpu" else 0
    if text == "auto":
        return (torch.device("cuda", 0),) if gpus else (CPU,)
    if text == "cpu":
        return (CPU,)
    names = [part.strip() for part in text.split(",")]
    devices = []
    for name in names:
        if name == "cuda":
            name = "cuda:0"
        kind, _, index = name.partition(":")
        if kind != "cuda" or not index.isdigit():
            raise ValueError(f"{flag} must be auto, cpu, cuda, cuda:N or a list such as cuda:0,cuda:1; got {spec!r}")
        if not gpus:
            raise ValueError(
                f"{flag} {spec}: this machine has no GPU torch can use (no CUDA device, or a CPU-only torch "
                f"build); use --device cpu (or auto, which takes a GPU only where there is one)"
            )
        if int(index) >= gpus:
            raise ValueError(f"{flag} {spec}: there is no {name} here; this machine has {gpus} GPU(s): cuda:0..cuda:{gpus - 1}")
        devices.append(torch.device("cuda", int(index)))
    if len(set(devices)) != len(devices):
        raise ValueError(f"{flag} {spec} names a GPU twice; list each once")
    return tuple(devices)


def device_label(devices: tuple[torch.device, ...] | list[torch.device]) -> str:
    """``cpu``, ``cuda:0`` or ``cuda:0,cuda:1``: devices as the flag names them."""
    return ",".join(str(d) for d in devices)


def split_range(count: int, capacities: list[int]) -> list[int]:
    """How many of ``count`` consecutive blocks each device holds, in order, given how many each
    could hold (``capacities``): in proportion to them, each at most its capacity, every block
    placed (``ValueError`` when the capacities do not add up to ``count``). A device may get 0."""
    if count < 0 or not capacities or any(c < 0 for c in capacities):
        raise ValueError(f"cannot split {count} blocks over capacities {capacities}")
    total = sum(capacities)
    if total < count:
        raise ValueError(f"{count} blocks do not fit on these devices (room for {total})")
    shares = [count * c // total if total else 0 for c in capacities]
    # the blocks left by rounding down go to the devices with the most room left, first ones first
    for _ in range(count - sum(shares)):
        i = max(range(len(capacities)), key=lambda j: (capacities[j] - shares[j], -j))
        shares[i] += 1
    return shares


def block_devices(count: int, devices: tuple[torch.device, ...], capacities: list[int] | None = None) -> list[torch.device]:
    """The device of each of ``count`` consecutive blocks: split over ``devices`` by
    :func:`split_range` (equal capacities when None)."""
    if len(devices) == 1:
        return [devices[0]] * count
    shares = split_range(count, capacities if capacities is not None else [count] * len(devices))
    return [device for device, share in zip(devices, shares, strict=True) for _ in range(share)]


def free_memory(device: torch.device) -> int:
    """Bytes a server may fill on ``device`` now: on a GPU its free memory less what computing
    needs besides weights and caches (:data:`GPU_RESERVED_BYTES`); on the CPU what the machine
    has available (see :func:`swarm.engine.memory.available_memory`)."""
    if device.type == "cpu":
        from swarm.engine.memory import available_memory

        return available_memory()
    torch.cuda.empty_cache()  # memory torch's allocator keeps from freed tensors (a measurement's block) is free too
    free, _ = torch.cuda.mem_get_info(device)
    return max(0, free - max(GPU_RESERVED_BYTES, int(free * GPU_RESERVED_SHARE)))


def device_name(device: torch.device) -> str:
    """What a measurement on ``device`` depends on: the GPU's model, or the processor's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from swarm.engine.throughput import cpu_name

    return cpu_name()


def devices_label(devices: tuple[torch.device, ...]) -> str:
    """What a server announces it computes on: ``cpu``, or its GPUs' names (``NVIDIA A100 ×2``)."""
    if all(d.type == "cpu" for d in devices):
        return "cpu"
    names = [device_name(d) for d in devices]
    return " + ".join(f"{name} ×{names.count(name)}" if names.count(name) > 1 else name for name in dict.fromkeys(names))


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has finished what was queued on it (timing; a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_dtype(devices: tuple[torch.device, ...], dtype: torch.dtype, flag: str = "--dtype") -> None:
    """``ValueError`` for a dtype the devices cannot compute in: bfloat16 on a GPU older than
    Ampere (compute capability 8; torch would emulate it, slowly)."""
    for device in devices:
        if device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] < 8:
            raise ValueError(f"{flag} bfloat16: {device_name(device)} cannot compute in bfloat16; use --dtype float16 or float32")
