"""Adapters applied to frozen blocks from outside: LoRA on chosen linears, and deep prompts.

The family files know nothing of adapters (see STYLE.md, lesson 2): :func:`attach` wraps every
linear of a :class:`~swarm.engine.checkpoint.BlockRange`'s blocks in a :class:`LoraLinear` once,
and :func:`applied` lends a pass the adapter tensors it should use. One set of blocks thus serves
passes with different adapters (a server's clients each own theirs), one pass at a time.

An adapter's tensors are a flat ``dict[str, Tensor]`` keyed by global block index, so the part of
one span is a filter on the keys (:func:`span_tensors`):

- ``"{i}.{path}.lora_A"`` ``[r, in_features]`` and ``"{i}.{path}.lora_B"`` ``[out_features, r]``:
  LoRA on the linear at ``path`` in block ``i`` (e.g. ``"3.self_attn.q_proj.lora_A"``); the linear
  computes ``W x + scale · B (A dropout(x))``, as peft does (``scale = alpha / r``).
- ``"{i}.prompt"`` ``[num_virtual, hidden]``: a deep prompt, added to the first ``num_virtual``
  positions of block ``i``'s input (the paper's deep prompt tuning).
- ``"prompt_embeddings"`` ``[num_virtual, hidden]``: the client's shallow prompt, prepended to the
  token embeddings (never sent to servers).

:func:`run_forward` and :func:`run_backward` are the stateless passes a server runs for a client's
training step; backward recomputes the span's forward and returns the gradient with respect to the
span's input and to every adapter tensor it was given.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from swarm.engine.checkpoint import BlockRange, Checkpoint
from swarm.engine.fast import FrozenLinear, run_per_segment

PROMPT_KEY = "prompt_embeddings"
MAX_RANK = 1024  # LoRA rank a server accepts
MAX_VIRTUAL_TOKENS = 1024  # deep-prompt positions a server accepts
ADAPTER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# canonical keys only (ASCII digits without leading zeros, no trailing newline): one tensor, one name
_KEY = re.compile(r"(0|[1-9][0-9]*)\.(?:([A-Za-z_][A-Za-z0-9_.]*)\.lora_([AB])|prompt)\Z", re.ASCII)


@dataclass(frozen=True)
class AdapterSpec:
    """How a pass applies its adapter tensors (sent along with them).

    ``scale``: LoRA's ``alpha / r``. ``dropout``: LoRA dropout on the linears' inputs (training
    passes only); each row's mask is drawn from ``seed``, the block, the linear and the row's index
    in the whole batch (``row`` + its index in the pass), so masks are the same wherever a block
    runs, when backward recomputes the forward, and when a batch is split into several requests."""

    scale: float = 1.0
    dropout: float = 0.0
    seed: int = 0
    row: int = 0  # the index of the pass's first row in the whole batch (a batch split into requests)

    def __post_init__(self):
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale)):
            raise ValueError(f"LoRA scale must be a finite number, got {self.scale!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"dropout seed must be an integer in [0, 2^63), got {self.seed!r}")
        if not isinstance(self.row, int) or not 0 <= self.row < 2**31:
            raise ValueError(f"the first row must be an integer in [0, 2^31), got {self.row!r}")

    def to_wire(self) -> dict:
        return {"scale": float(self.scale), "dropout": float(self.dropout), "seed": int(self.seed), "row": int(self.row)}

    @classmethod
    def from_wire(cls, data) -> AdapterSpec:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValueError("the adapter spec must be a map")
        return cls(data.get("scale", 1.0), data.get("dropout", 0.0), data.get("seed", 0), data.get("row", 0))


class LoraLinear(nn.Module):
    """A frozen linear (``nn.Linear`` or a packed one) with an optional low-rank update, lent per pass.

    ``key`` is ``"{block}.{path}"``, the adapter keys' stem (and the dropout stream's name)."""

    def __init__(self, base: nn.Module, key: str, in_features: int, out_features: int):
        super().__init__()
        self.base, self.key = base, key
        self.in_features, self.out_features = in_features, out_features
        self.lora: tuple[torch.Tensor, torch.Tensor, AdapterSpec] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = run_per_segment(self.base, x)  # in a batched pass: over only as many rows as the kernel is invariant for
        if self.lora is None:
            return out
        a, b, spec = self.lora
        if a.device != x.device:  # the adapter's tensors stay where their owner keeps them (gradients flow back)
            a, b = a.to(x.device), b.to(x.device)
        h = x.to(a.dtype)
        if spec.dropout > 0:  # one mask per row (see AdapterSpec); h: [batch, ..., in_features]
            keep = 1.0 - spec.dropout
            masks = []
            for r in range(h.shape[0]):  # drawn on the CPU: the same masks whatever the device
                generator = torch.Generator().manual_seed(_stream_seed(spec.seed, f"{self.key}:{spec.row + r}"))
                masks.append(torch.rand(h.shape[1:], generator=generator) < keep)
            h = h * torch.stack(masks).to(h.device) / keep
        return out + (F.linear(F.linear(h, a), b) * spec.scale).to(out.dtype)


def _stream_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, LoraLinear, FrozenLinear))


def attach(blocks: BlockRange) -> BlockRange:
    """Wrap every linear of ``blocks`` in a :class:`LoraLinear` (once; idempotent). Returns ``blocks``."""
    for offset, block in enumerate(blocks.blocks):
        index = blocks.start + offset
        for path, module in list(block.named_modules()):
            for name, child in list(module.named_children()):
                if _is_linear(child) and not isinstance(child, LoraLinear) and not isinstance(module, LoraLinear):
                    full = f"{path}.{name}" if path else name
                    setattr(module, name, LoraLinear(child, f"{index}.{full}", child.in_features, child.out_features))
    return blocks


def lora_layers(blocks: BlockRange) -> dict[str, LoraLinear]:
    """``"{block}.{path}"`` → the wrapped linear, for every linear of ``blocks`` (after :func:`attach`)."""
    return {m.key: m for block in blocks.blocks for m in block.modules() if isinstance(m, LoraLinear)}


def block_linears(checkpoint: Checkpoint, index: int) -> dict[str, tuple[int, int]]:
    """Every linear of block ``index`` as ``path → (out_features, in_features)``, from the
    checkpoint's tensor headers (a client finds its adapter's shapes without loading blocks)."""
    prefix = checkpoint.family.block_prefix(checkpoint.config, index)
    shapes = {}
    for key in checkpoint.tensor_names():
        if key.startswith(prefix) and key.endswith(".weight"):
            shape = checkpoint.tensor_shape(key)
            if len(shape) == 2:
                shapes[key[len(prefix) : -len(".weight")]] = (shape[0], shape[1])
    return shapes


def resolve_targets(checkpoint: Checkpoint, targets: list[str] | str | None) -> list[str]:
    """The module paths (within a block) that LoRA targets: ``None`` → the family's default (as
    peft's), ``"all-linear"`` → every linear of the blocks, else names matched against the last
    component of each path (``q_proj``) or a whole path (``self_attn.q_proj``). Blocks may differ
    (Qwen3-MoE's dense and sparse MLPs): a path is a target where a block has it, as in peft.
    Raises ``ValueError`` naming ``--target-modules`` and the available names for a name that
    matches nothing."""
    paths = sorted(set().union(*(block_linears(checkpoint, i) for i in range(checkpoint.num_blocks))))
    if targets is None:
        targets = list(checkpoint.family.lora_default)
    if isinstance(targets, str):
        targets = [targets] if targets == "all-linear" else [t for t in re.split(r"[,\s]+", targets) if t]
    if targets == ["all-linear"]:
        return paths
    chosen, unknown = [], []
    for name in targets:
        matched = [p for p in paths if p == name or p.rsplit(".", 1)[-1] == name]
        if not matched:
            unknown.append(name)
        chosen += [p for p in matched if p not in chosen]
    if unknown or not chosen:
        names = sorted({p.rsplit(".", 1)[-1] for p in paths})
        raise ValueError(
            f"--target-modules: {', '.join(unknown) or 'nothing'} names no linear of this model's blocks; "
            f"choose among {', '.join(names)} or all-linear"
        )
    return sorted(chosen)


def init_lora(
    checkpoint: Checkpoint, targets: list[str], rank: int, seed: int, blocks: range | None = None
) -> dict[str, torch.Tensor]:
    """Fresh LoRA tensors as peft makes them: A Kaiming-uniform (a = √5), B zero, float32; a
    target a block lacks (a dense MLP's path in a sparse block) is left out there."""
    if rank < 1:
        raise ValueError(f"--rank must be at least 1, got {rank}")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for index in blocks if blocks is not None else range(checkpoint.num_blocks):
        shapes = block_linears(checkpoint, index)
        for path in targets:
            if path not in shapes:
                continue
            out_features, in_features = shapes[path]
            a = torch.empty(rank, in_features)
            bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=√5) on [rank, in]
            a.uniform_(-bound, bound, generator=generator)
            tensors[f"{index}.{path}.lora_A"] = a
            tensors[f"{index}.{path}.lora_B"] = torch.zeros(out_features, rank)
    return tensors


def init_deep_prompts(num_blocks: int, num_virtual: int, hidden: int) -> dict[str, torch.Tensor]:
    """Zero deep prompts for every block (training starts from the shallow prompt alone)."""
    return {f"{i}.prompt": torch.zeros(num_virtual, hidden) for i in range(num_blocks)}


def span_tensors(tensors: Mapping[str, torch.Tensor], start: int, end: int) -> dict[str, torch.Tensor]:
    """The tensors of blocks ``[start, end)`` (what one server of the span needs)."""
    out = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match and start <= int(match.group(1)) < end:
            out[key] = value
    return out


def check_tensors(blocks: BlockRange, tensors: Mapping[str, torch.Tensor]) -> None:
    """``ValueError`` naming the first tensor that ``blocks`` cannot apply: a key of no known form,
    a block outside the range, a linear the blocks lack, a shape or dtype that does not fit, a rank
    over :data:`MAX_RANK`, an A without its B. Servers call this on every stranger's adapter."""
    layers = lora_layers(blocks)
    hidden = blocks.config.hidden_size
    ranks: dict[str, dict[str, int]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key) if isinstance(key, str) else None
        if match is None:
            raise ValueError(f"adapter tensor {key!r}: not a LoRA or deep-prompt name")
        if not isinstance(value, torch.Tensor) or value.dtype not in ADAPTER_DTYPES:
            raise ValueError(f"adapter tensor {key!r}: must be float32, bfloat16 or float16")
        index = int(match.group(1))
        if not blocks.start <= index < blocks.end:
            raise ValueError(f"adapter tensor {key!r}: block {index} is not in {blocks.start}:{blocks.end}")
        if match.group(2) is None:  # a deep prompt
            if value.dim() != 2 or value.shape[1] != hidden or not 1 <= value.shape[0] <= MAX_VIRTUAL_TOKENS:
                raise ValueError(
                    f"adapter tensor {key!r}: a deep prompt must be [1..{MAX_VIRTUAL_TOKENS}, {hidden}], "
                    f"got {list(value.shape)}"
                )
            continue
        stem, which = f"{index}.{match.group(2)}", match.group(3)
        layer = layers.get(stem)
        if layer is None:
            raise ValueError(f"adapter tensor {key!r}: block {index} has no linear {match.group(2)!r}")
        if value.dim() != 2:
            raise ValueError(f"adapter tensor {key!r}: must be 2-D, got {list(value.shape)}")
        rank = value.shape[0] if which == "A" else value.shape[1]
        fits = value.shape[1] == layer.in_features if which == "A" else value.shape[0] == layer.out_features
        if not fits or not 1 <= rank <= MAX_RANK:
            want = f"[r, {layer.in_features}]" if which == "A" else f"[{layer.out_features}, r]"
            raise ValueError(f"adapter tensor {key!r}: must be {want} with 1 ≤ r ≤ {MAX_RANK}, got {list(value.shape)}")
        ranks.setdefault(stem, {})[which] = rank
    for stem, pair in ranks.items():
        if set(pair) != {"A", "B"} or pair["A"] != pair["B"]:
            raise ValueError(f"adapter tensors of {stem!r}: lora_A and lora_B must both be given, with one rank")


# what applied() lent the blocks on this thread, innermost last: (layers with their LoRA, the
# prompt hooks' switches); suspended() takes it off for a moment and puts it back
_lent = threading.local()


def _lent_stack() -> list[tuple[list, list]]:
    if not hasattr(_lent, "stack"):
        _lent.stack = []
    return _lent.stack


@contextlib.contextmanager
def applied(
    blocks: BlockRange, tensors: Mapping[str, torch.Tensor] | None, spec: AdapterSpec | None = None
) -> Iterator[None]:
    """Run ``blocks`` with ``tensors`` applied (used as they are: gradients flow to them). The
    blocks must have been :func:`attach`-ed; the caller checked the tensors (:func:`check_tensors`)
    where they come from a stranger."""
    if not tensors:
        yield
        return
    spec = spec or AdapterSpec()
    layers = lora_layers(blocks)
    used, hooks, switches = [], [], []
    try:
        for key, a in tensors.items():
            match = _KEY.match(key)
            if match is None:  # the client's own (prompt_embeddings): not the blocks'
                continue
            index = int(match.group(1))
            if not blocks.start <= index < blocks.end:
                continue
            if match.group(2) is None:
                block = blocks.blocks[index - blocks.start]
                switch = [True]
                hooks.append(block.register_forward_pre_hook(_prompt_hook(a, switch)))
                switches.append(switch)
            elif match.group(3) == "A":
                layer = layers[f"{index}.{match.group(2)}"]
                layer.lora = (a, tensors[key[:-1] + "B"], spec)
                used.append(layer)
        _lent_stack().append(([(layer, layer.lora) for layer in used], switches))
        yield
    finally:
        if _lent_stack() and _lent_stack()[-1][1] is switches:
            _lent_stack().pop()
        for layer in used:
            layer.lora = None
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Inside :func:`applied` (a training pass between two of its blocks), run something else on
    the same blocks without the pass's adapter: what every enclosing ``applied`` of this thread
    lent is taken off until the end of the ``with`` (where another ``applied`` may lend its own),
    then put back."""
    stack = _lent_stack()
    _lent.stack = []
    for loras, switches in stack:
        for layer, _ in loras:
            layer.lora = None
        for switch in switches:
            switch[0] = False
    try:
        yield
    finally:
        _lent.stack = stack
        for loras, switches in stack:
            for layer, lora in loras:
                layer.lora = lora
            for switch in switches:
                switch[0] = True


def _prompt_hook(prompt: torch.Tensor, switch: list[bool]) -> Callable:
    """A pre-hook adding ``prompt`` ([num_virtual, hidden]) to a block's input at positions
    ``[0, num_virtual)``, wherever the step's positions ``[past, past + seq)`` meet them (while
    ``switch[0]``: see :func:`suspended`)."""

    def hook(module, args):
        if not switch[0]:
            return None
        hidden, ctx = args[0], args[1]
        first, last = ctx.past, min(ctx.past + ctx.seq, prompt.shape[0])
        if first >= last:
            return None
        n = last - first
        head = hidden[:, :n] + prompt[first:last].to(hidden.device, hidden.dtype)
        return (torch.cat([head, hidden[:, n:]], dim=1), *args[1:])

    return hook


def run_forward(
    blocks: BlockRange,
    hidden: torch.Tensor,
    tensors: Mapping[str, torch.Tensor] | None = None,
    spec: AdapterSpec | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """A stateless forward of ``hidden`` ``[batch, seq, hidden]`` through ``blocks`` with an adapter."""
    with torch.no_grad(), applied(blocks, tensors, spec):
        return blocks(hidden, should_stop=should_stop)


def run_backward(
    blocks: BlockRange,
    hidden: torch.Tensor,
    grad_output: torch.Tensor,
    tensors: Mapping[str, torch.Tensor] | None = None,
    spec: AdapterSpec | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Recompute the forward of ``hidden`` and backpropagate ``grad_output`` (its shape): returns
    the gradient with respect to ``hidden`` (in ``hidden``'s dtype) and to each adapter tensor
    (float32, zeros for a tensor the pass did not reach)."""
    if grad_output.shape != hidden.shape:
        raise ValueError(f"grad_output shape {list(grad_output.shape)} differs from hidden {list(hidden.shape)}")
    leaves = {k: v.detach().float().requires_grad_(True) for k, v in (tensors or {}).items()}
    with torch.enable_grad():
        inputs = hidden.to(blocks.dtype).detach().requires_grad_(True)
        with applied(blocks, leaves, spec):
            output = blocks(inputs, should_stop=should_stop)
        output.backward(grad_output.to(output.dtype))
    grads = {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in leaves.items()}
    return inputs.grad.to(hidden.dtype), grads


def adapter_digest(tensors: Mapping[str, torch.Tensor], spec: AdapterSpec | None = None) -> str:
    """A content hash of adapter tensors (names, dtypes, shapes, bytes), and of ``spec`` when one
    is given: what a server keys the adapters it keeps by, computed by both sides (a server never
    trusts a claim). The swarm hashes the tensors alone: the spec travels with every request."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key].detach().contiguous()
        digest.update(f"{key}|{value.dtype}|{list(value.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    if spec is not None:
        digest.update(repr(sorted(spec.to_wire().items())).encode())
    return digest.hexdigest()


class LocalBlocks(nn.Module):
    """Blocks held in this process as a trainable module (the local twin of the swarm's remote
    blocks): ``forward(hidden [batch, seq, hidden], tensors=None, spec=None) -> hidden``,
    differentiable with respect to ``hidden`` and to every adapter tensor."""

    def __init__(self, blocks: BlockRange):
        super().__init__()
        self.blocks = attach(blocks)

    def forward(
        self, hidden: torch.Tensor, tensors: Mapping[str, torch.Tensor] | None = None, spec: AdapterSpec | None = None
    ) -> torch.Tensor:
        with applied(self.blocks, tensors, spec):
            return self.blocks(hidden)
