"""Verification of servers' work, the pure part: how far two honest servers may disagree, when a
step is checked, and who lied when opinions differ. No network: tested with tables of cases.

A check compares two computations of the same blocks on the same inputs (:func:`disagreement`):
per position, how far apart the two outputs are, relative to how far the blocks moved the hidden
state (``output − input``: the blocks' own contribution; the residual stream it rides on is the
same in both and would hide a lie). Two honest servers differ by their arithmetic: float32 servers
by rounding (other kernels, thread counts, a prefill against decode steps), bfloat16 and
quantized ones by far more. :func:`tolerance` is the sum of what each side's precision and wire
dtype may add (:data:`PRECISION_ERROR`, :data:`WIRE_ERROR`, measured on the default model with
``scripts/calibrate_verify.py``), times a safety margin; a disagreement above it is a lie.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

MODES = ("off", "sample", "strict")
DEFAULT_RATE = 0.05  # the chance a step is checked once a server passed its first checks (see docs/security.md)
FIRST_CHECKS = 3  # checks a server must pass with a client before it is only sampled
MAX_PENDING = 64  # unchecked steps of a span after which a check is due whatever the draw
MAX_PENDING_PASSES = 8  # the same for fine-tuning's passes (a lie there goes into the adapter at once)
BLOCKING_CHECKS = 1  # checks a server must pass before sample-mode checks of it run in the background

# The largest disagreement an honest server's arithmetic shows against exact float32 math, per
# (dtype, quant): measured worst cases over prompts, positions and spans of the default model
# (scripts/calibrate_verify.py), rounded up. A pair's tolerance adds both sides' and the margin.
PRECISION_ERROR = {
    ("float32", "none"): 2e-5,
    ("float16", "none"): 0.2,
    ("bfloat16", "none"): 0.2,
    ("float32", "int8"): 0.25,
    ("float16", "int8"): 0.3,
    ("bfloat16", "int8"): 0.3,
    ("float32", "nf4"): 0.7,
    ("float16", "nf4"): 0.7,
    ("bfloat16", "nf4"): 0.7,
}
# what the output's wire dtype adds (relative to the blocks' change of the hidden state)
WIRE_ERROR = {"float32": 0.0, "float16": 0.1, "bfloat16": 0.1, "int8": 0.6}
MARGIN = 1.5  # over measured worst cases; two honest sides differ by at most the sum of theirs
# The same for a backward pass's gradients (with respect to the input, and the adapter's), as
# relative_error against float32's: worst cases over spans of 1 to 30 blocks of the default model
# with a LoRA (scripts/calibrate_verify_grads.py), rounded up. Quantized weights change gradients
# far more than outputs; nf4's are about as far from float32's as unrelated ones: they cannot be
# checked (any pair with an nf4 side gets a tolerance of 2 or more, which every answer meets).
GRAD_ERROR = {
    ("float32", "none"): 1e-4,
    ("float16", "none"): 0.15,
    ("bfloat16", "none"): 0.15,
    ("float32", "int8"): 0.6,
    ("float16", "int8"): 0.6,
    ("bfloat16", "int8"): 0.6,
    ("float32", "nf4"): 1.5,
    ("float16", "nf4"): 1.5,
    ("bfloat16", "nf4"): 1.5,
}
GRAD_WIRE_ERROR = {"float32": 0.0, "float16": 0.01, "bfloat16": 0.01, "int8": 0.05}
FLOOR = 0.03  # a position the blocks barely moved is measured against this share of |x| instead


@dataclass(frozen=True)
class Precision:
    """How a side of a check computes and sends: its announced compute ``dtype`` and ``quant``,
    and the ``wire`` dtype its outputs travel in."""

    dtype: str = "float32"
    quant: str = "none"
    wire: str = "float32"

    @property
    def error(self) -> float:
        compute = PRECISION_ERROR.get((self.dtype, self.quant), max(PRECISION_ERROR.values()))
        return compute + WIRE_ERROR.get(self.wire, max(WIRE_ERROR.values()))

    @property
    def grad_error(self) -> float:
        compute = GRAD_ERROR.get((self.dtype, self.quant), max(GRAD_ERROR.values()))
        return compute + GRAD_WIRE_ERROR.get(self.wire, max(GRAD_WIRE_ERROR.values()))


def worst(precisions) -> Precision:
    """The least precise of several (a chain of servers is as precise as its worst one)."""
    return max(precisions, key=lambda p: p.error)


def tolerance(a: Precision, b: Precision) -> float:
    """The largest :func:`disagreement` two honest servers of precisions ``a`` and ``b`` show."""
    return MARGIN * (a.error + b.error)


def grad_tolerance(a: Precision, b: Precision) -> float:
    """The largest :func:`relative_error` of the gradients two honest servers of precisions ``a``
    and ``b`` return for the same backward pass."""
    return MARGIN * (a.grad_error + b.grad_error)


def disagreement(inputs: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per position ``[seq]``, the worst over rows of ``‖a − b‖ / max(‖a − x‖, ‖b − x‖)`` (norms
    over the hidden dimension): ``a`` and ``b`` are two outputs ``[batch, seq, hidden]`` of the same
    blocks on ``inputs`` ``x``. 0 for equal outputs, about 1 or more for unrelated ones. A
    position whose blocks barely moved it is measured against :data:`FLOOR` ``‖x‖`` instead (a
    bfloat16 server's rounding of a large hidden state would look like a lie there). Not
    finite where an output is (NaN or infinity: a lie, or a broken server)."""
    x, a, b = inputs.float(), a.float(), b.float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        bad = ~(torch.isfinite(a).all(-1) & torch.isfinite(b).all(-1))  # [batch, seq]
        out = torch.zeros(x.shape[1])
        out[bad.any(0)] = math.inf
        return out
    moved = torch.maximum((a - x).norm(dim=-1), (b - x).norm(dim=-1))
    scale = torch.maximum(moved, FLOOR * x.norm(dim=-1)).clamp_min(1e-12)
    return ((a - b).norm(dim=-1) / scale).amax(dim=0)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / max(‖a‖, ‖b‖)`` over whole tensors: how far apart two servers' gradients of
    the same pass are (0 equal, about 1 or more unrelated; infinite where one is not finite)."""
    a, b = a.float(), b.float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    scale = max(float(a.norm()), float(b.norm()), 1e-12)
    return float((a - b).norm()) / scale


def first_disagreeing(errors: torch.Tensor, limit: float) -> int | None:
    """The index of the first position whose error exceeds ``limit`` (or is not finite), or None."""
    bad = ~(errors <= limit)  # NaN counts as bad
    hits = bad.nonzero()
    return int(hits[0, 0]) if len(hits) else None


@dataclass(frozen=True)
class VerifyPolicy:
    """When a client checks a span's steps. ``off``: never. ``strict``: every step, before its
    output is used. ``sample`` (the default): the steps of a server that has not yet passed
    :data:`FIRST_CHECKS` checks with this client always, then each step with chance ``rate``, and
    whenever :data:`MAX_PENDING` steps went unchecked; a check covers every step since the last
    one, so a lie on any step is found at the next check, and the steps left unchecked when a
    generation ends are checked before it returns.

    A check blocks (its step's output is used only once it passed) in ``strict`` mode and until
    a server passed :data:`BLOCKING_CHECKS` checks; otherwise it runs in the background while
    the generation goes on, and a lie it finds rewinds the generation to the first wrong
    position."""

    mode: str = "sample"
    rate: float = DEFAULT_RATE
    first: int = FIRST_CHECKS
    max_pending: int = MAX_PENDING

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"--verify must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not (0 <= self.rate <= 1):
            raise ValueError(f"--verify-rate must be between 0 and 1, got {self.rate}")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def due(self, passed: int, pending: int, draw: float) -> bool:
        """Whether to check a span now: its server passed ``passed`` checks with this client,
        ``pending`` steps are unchecked, ``draw`` is uniform in [0, 1)."""
        if self.mode == "off" or pending == 0:
            return False
        if self.mode == "strict" or passed < self.first or pending >= self.max_pending:
            return True
        return draw < self.rate

    def blocking(self, passed: int) -> bool:
        """Whether a due check of a server that passed ``passed`` checks is awaited before its
        step's output is used (else it runs in the background)."""
        return self.mode == "strict" or passed < BLOCKING_CHECKS

    def draw(self, rng: random.Random | None = None) -> float:
        return (rng or random).random()


def blame(primary_vs_checker: bool, primary_vs_third: bool | None, checker_vs_third: bool | None) -> str:
    """Who lied, from which pairs agree (True), disagree (False) or were not compared (None): the
    one the other two agree against. ``"primary"``, ``"checker"``, ``"none"`` (all agree) or
    ``"unknown"`` (no third opinion, or all three disagree)."""
    if primary_vs_checker:
        return "none"
    if primary_vs_third is None or checker_vs_third is None:
        return "unknown"
    if checker_vs_third and not primary_vs_third:
        return "primary"
    if primary_vs_third and not checker_vs_third:
        return "checker"
    return "unknown"
