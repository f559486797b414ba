"""Faster CPU kernels, applied from outside: blocks are built plainly, then their linears swapped.

Batch-1 decoding is bound by how fast weights stream from memory. On this kind of CPU, PyTorch's
default bfloat16 ``F.linear`` reaches ~25–30 GB/s for a matrix-vector product; the same product on
weights pre-packed into oneDNN's blocked layout reaches ~45–75 GB/s, with bit-identical results
(see ``scripts/bench_local.py``). :func:`pack_linears` swaps every ``nn.Linear`` of a module for a
:class:`PackedLinear` holding only the packed weight (no second copy).

No kernel is assumed to be **batch-invariant** (a row's output the same whatever rows share the
call; ``scripts/bench_invariance.py`` measures them): PyTorch's float32 kernel takes another path
for one row, for 2–15 and for 16 or more; its bfloat16 kernel and the packed one agree for the
default model's shapes but not for a 1.1B model's at some row counts (36+, 100, 256+). So in a
batched pass of several sessions each linear runs over pools of sessions' rows only as large as
it was *measured* to be invariant for (:func:`invariant_rows`: every call of 1..M rows gives each
row the bits of that row's call alone), and each longer step alone (:func:`run_per_segment`):
exact, whatever the kernel, sharing the weights' reads where the kernel allows. Where the
private op is missing (another PyTorch build), modules are left as they are.
"""

from __future__ import annotations

import contextvars
import threading

import torch
import torch.nn.functional as F
from torch import nn


def packing_available() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


# the positions of each session in a batched pass of several (see run_per_segment); None outside one
SEGMENTS: contextvars.ContextVar[tuple[int, ...] | None] = contextvars.ContextVar("swarm_segments", default=None)


class FrozenLinear(nn.Module):
    """A linear layer whose weight is frozen and kept in some other form than ``nn.Linear``'s
    (packed, quantized). Adapters wrap these like ``nn.Linear`` (gradients flow to the input)."""

    rows_interact = False  # whether a row's output may depend on the other rows' values (never pooled then)

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", bias, persistent=False)


class PackedLinear(FrozenLinear):
    """A frozen linear layer whose weight lives in oneDNN's packed layout (inference)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, None if linear.bias is None else linear.bias.detach())
        weight = linear.weight.detach()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            # backward through a frozen layer: gradients flow to the input only
            return F.linear(x, self.packed.to_dense(), self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def is_frozen_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, FrozenLinear))


POOL_ROWS = 64  # the most rows a linear's invariance is measured for (and so pooled in one call)


def run_per_segment(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)``; inside a batched pass of several sessions (``x``: ``[1, positions, in]``,
    :data:`SEGMENTS` set), in calls over consecutive sessions' rows that each give every row the
    bits of its session's step alone (see :func:`pools`)."""
    segments = SEGMENTS.get()
    if segments is None or len(segments) == 1:
        return linear(x)
    limit = 1 if torch.is_grad_enabled() else invariant_rows(linear, x.dtype)
    sizes = pools(segments, limit)
    if len(sizes) == 1:
        return linear(x)
    return torch.cat([linear(part) for part in x.split(sizes, dim=1)], dim=1)


def pools(segments: tuple[int, ...] | list[int], limit: int) -> list[int]:
    """The row counts of the calls a batched pass makes, in order: consecutive sessions' rows
    pooled up to ``limit`` rows, a session of more than ``limit`` rows alone. With a kernel
    invariant for every call of 1..``limit`` rows, each row then gets the bits of its session's
    step alone (itself at most ``limit`` rows, or the very same call)."""
    out: list[int] = []
    run = 0
    for rows in segments:
        if rows > limit or run + rows > limit:
            if run:
                out.append(run)
            run = 0
        if rows > limit:
            out.append(rows)
        else:
            run += rows
    if run:
        out.append(run)
    return out


_INVARIANT: dict[tuple, int] = {}
_INVARIANT_LOCK = threading.Lock()


def invariant_rows(linear: nn.Module, dtype: torch.dtype) -> int:
    """The largest M ≤ :data:`POOL_ROWS` for which ``linear`` is measured batch-invariant on
    inputs of ``dtype``: a call on 1..M rows gives each row exactly the bits of a call on that row
    alone (two random draws; rows at every place of the call). Measured once per kind of module,
    weight shapes and dtypes, thread count and device (what picks the kernel's path and reduction
    order; the values do not), then remembered; 1 where it is not invariant even for 2 rows, and for a
    module whose rows interact through their values (``rows_interact``: random inputs cannot show
    that)."""
    if getattr(linear, "rows_interact", False):
        return 1
    tensors = tuple((name, t.dtype, tuple(t.shape)) for name, t in
                    [*linear.named_parameters(recurse=False), *linear.named_buffers(recurse=False)] if t is not None)
    key = (type(linear), tensors, dtype, torch.get_num_threads(), module_device(linear))
    with _INVARIANT_LOCK:
        found = _INVARIANT.get(key)
        if found is None:
            found = _INVARIANT[key] = _measure_invariance(linear, dtype)
    return found


def measure_pooling(module: nn.Module, dtype: torch.dtype) -> dict[int, int]:
    """Measure now (see :func:`invariant_rows`) what every frozen linear of ``module`` may pool, so
    the first batched pass does not; returns how many rows, by how many linears may pool that many."""
    counts: dict[int, int] = {}
    for m in module.modules():
        if is_frozen_linear(m):
            rows = invariant_rows(m, dtype)
            counts[rows] = counts.get(rows, 0) + 1
    return counts


def _measure_invariance(linear: nn.Module, dtype: torch.dtype) -> int:
    limit = POOL_ROWS
    with torch.no_grad():
        for seed in (0, 1):
            generator = torch.Generator().manual_seed(seed)
            x = torch.randn(1, limit, linear.in_features, generator=generator).to(module_device(linear), dtype)
            alone = torch.cat([linear(x[:, i : i + 1]) for i in range(limit)], dim=1)
            for rows in range(2, limit + 1):
                if not torch.equal(linear(x[:, :rows]), alone[:, :rows]):
                    limit = rows - 1
                    break
            if limit == 1:
                break
    return limit


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s own weights are (the CPU for one without any)."""
    for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
        if t is not None:
            return t.device
    return torch.device("cpu")


def pack_linears(module: nn.Module) -> int:
    """Swap the bfloat16 ``nn.Linear`` layers of ``module`` (on CPU) for packed ones; returns how many."""
    if not packing_available():
        return 0
    swapped = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu":
            setattr(module, name, PackedLinear(child))
            swapped += 1
        else:
            swapped += pack_linears(child)
    return swapped
