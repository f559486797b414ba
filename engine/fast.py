"""Faster CPU kernels, applied from outside: blocks are built plainly, then their linears swapped.

Batch-1 decoding is bound by how fast weights stream from memory. On this kind of CPU, PyTorch's
default bfloat16 ``F.linear`` reaches ~25–30 GB/s for a matrix-vector product; the same product on
weights pre-packed into oneDNN's blocked layout reaches ~45–75 GB/s, with bit-identical results
(see ``scripts/bench_local.py``). :func:`pack_linears` swaps every ``nn.Linear`` of a module for a
:class:`PackedLinear` holding only the packed weight (no second copy).

Only bfloat16 is packed: for float32, oneDNN's packed kernels sum in another order than the
default path (differences ~1e-4), and float32 is our reference precision. Where the private op is
missing (another PyTorch build), modules are left as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def packing_available() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


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
