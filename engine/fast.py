"""Faster CPU kernels, applied from outside: blocks are built plainly, then their linears swapped.

Batch-1 decoding is bound by how fast weights stream from memory. On this kind of CPU, PyTorch's
default bfloat16 ``F.linear`` reaches ~25–30 GB/s for a matrix-vector product; the same product on
weights pre-packed into oneDNN's blocked layout reaches ~45–75 GB/s, with bit-identical results
(see ``scripts/bench_local.py``). :func:`pack_linears` swaps every ``nn.Linear`` of a module for a
:class:`PackedLinear` holding only the packed weight (no second copy).

No kernel here is trusted to be **batch-invariant** (a row's output the same whatever rows share
the call; ``scripts/bench_invariance.py`` measures them): PyTorch's float32 kernel takes another
path for one row, for 2–15 and for 16 or more; its bfloat16 kernel and the packed one agree for
the default model's shapes but not for a 1.1B model's at some row counts (36+, 100, 256+). So a
batched pass of several sessions runs each linear once per session (:func:`run_per_segment`):
exact, sharing everything else of the pass (attention, norms, the per-step overheads). Where the
private op is missing (another PyTorch build), modules are left as they are.
"""

from __future__ import annotations

import contextvars

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


def run_per_segment(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)``; inside a batched pass of several sessions (``x``: ``[1, positions, in]``,
    :data:`SEGMENTS` set), one call per session's positions, each then the very call its step
    alone makes (no kernel is trusted to be batch-invariant: see the module's docstring)."""
    segments = SEGMENTS.get()
    if segments is None or len(segments) == 1:
        return linear(x)
    return torch.cat([linear(part) for part in x.split(segments, dim=1)], dim=1)


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
