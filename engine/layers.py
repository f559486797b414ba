"""Pieces shared by the model families: norms, rotary embeddings, masks and cached attention.

Conventions where tensors cross a boundary:
    hidden: [batch, seq, hidden_size]
    q:      [batch, heads, seq, head_dim]
    k, v:   [batch, kv_heads, seq, head_dim]
A step processes ``seq`` new positions after ``past`` positions already in the session's cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back (as the reference checkpoints expect)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class OffsetRMSNorm(nn.Module):
    """Gemma's root-mean-square norm: scaled by ``1 + weight`` (the weight is stored as an offset
    from 1), all in float32, cast back at the end."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, seq_len: int = 0) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of rotary embeddings and the attention factor applied to cos/sin.

    Supports the plain rotary embedding, ``linear`` scaling, Llama 3's ``llama3`` scaling, YaRN
    (``yarn``: Qwen3's long-context setting) and Phi-3's ``longrope`` (its short factors for a
    sequence of ``seq_len`` positions within ``original_max_position_embeddings``, its long ones
    past it); any other ``rope_type`` is refused with the list of supported ones.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    kind = rope_type(scaling)
    check_rope(scaling)
    if kind == "default":
        return inv_freq, 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, exponents, scaling)
    if kind == "longrope":
        original = scaling["original_max_position_embeddings"]
        factor = scaling.get("factor") or scaling["max_position_embeddings"] / original
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        ext = torch.tensor(scaling["long_factor" if seq_len > original else "short_factor"], dtype=torch.float32)
        if ext.shape != inv_freq.shape:
            raise ValueError(f"longrope factors must number {inv_freq.numel()} (half the rotated head), got {ext.numel()}")
        return 1.0 / (ext * theta**exponents), attention
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    raise AssertionError(kind)  # check_rope refused it


ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
# the types with one set of frequencies for every position (longrope's depend on the position: only
# the Llama-like families compute it, by position)
FIXED_ROPE_TYPES = ROPE_TYPES[:-1]


def rope_type(scaling: dict | None) -> str:
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))


def check_rope(scaling: dict | None, supported: tuple[str, ...] = ROPE_TYPES) -> None:
    """``ValueError`` for a rotary scaling this engine does not compute (``dynamic``: its
    frequencies change with each pass's length, so a position's rotation would depend on how the
    sequence was stepped; ``longrope`` outside the families that compute it by position)."""
    kind = rope_type(scaling)
    if kind not in supported:
        raise ValueError(f"unsupported rope scaling type {kind!r}; supported: {', '.join(supported)}")


def check_rope_values(head_dim: int, theta: float, scaling: dict | None) -> None:
    """The frequencies of ``scaling`` computed once, so a missing or malformed value (``factor``,
    a longrope factor list of the wrong length) is a ``KeyError``/``ValueError`` when a
    checkpoint opens rather than at its first request."""
    rotary = int(head_dim * (scaling or {}).get("partial_rotary_factor", 1.0))
    rope_inv_freq(rotary, theta, scaling)
    if rope_type(scaling) == "longrope":
        rope_inv_freq(rotary, theta, scaling, scaling["original_max_position_embeddings"] + 1)  # the long factors


def rope_defaults(raw: dict, rope: dict) -> dict:
    """``rope`` (a config's ``rope_parameters``/``rope_scaling``) with what transformers fills in
    for the scalings that need the pretraining context: ``original_max_position_embeddings``
    (the config's top-level one first, else ``max_position_embeddings``) and the context itself."""
    if rope_type(rope) in ("llama3", "yarn"):
        rope = dict(rope)
        if raw.get("original_max_position_embeddings"):
            rope["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
        rope.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings"))
        if rope_type(rope) == "yarn":  # its factor, when not given: the context over the original one
            rope.setdefault("max_position_embeddings", raw.get("max_position_embeddings"))
    return rope


def read_rope(raw: dict, supported: tuple[str, ...] | None = None) -> tuple[float, dict | None]:
    """A config's rotary settings: (``rope_theta``, the scaling or None) from its
    ``rope_parameters`` (or older ``rope_scaling``), with :func:`rope_defaults`' fillings, the type
    checked against ``supported`` (None: left to the checkpoint's load, a family may rename it);
    theta from that dict, else the config's top level, else 10000."""
    rope = rope_defaults(raw, dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {}))
    if supported is not None:
        check_rope(rope, supported)
    theta = rope.pop("rope_theta", None) or raw.get("rope_theta", 10000.0)
    return float(theta), rope or None


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(head_dim: int, theta: float, exponents: torch.Tensor, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): the dimensions that turn fewer than ``beta_slow`` times over the
    original context are interpolated (divided by ``factor``), those that turn more than
    ``beta_fast`` times kept, a linear ramp between; cos/sin scaled by 0.1 ln(factor) + 1 (or the
    ratio of the ``mscale``/``mscale_all_dim`` ones, or ``attention_factor``)."""
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or scaling["max_position_embeddings"] / original
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all
                     else _yarn_mscale(factor))

    def dimension(turns: float) -> float:  # the dimension whose wavelength fits ``turns`` times in the context
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension(scaling.get("beta_fast") or 32), dimension(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    kept = 1 - ramp  # 1: extrapolated (the original frequency), 0: interpolated
    base = theta**exponents
    return 1.0 / (factor * base) * (1 - kept) + 1.0 / base * kept, float(attention)


def rope_cos_sin(
    inv_freq: torch.Tensor, attention_factor: float, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for ``positions`` ([seq]), each ``[seq, head_dim]`` in ``dtype``."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_factor).to(dtype), (emb.sin() * attention_factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ([batch, heads, seq, head_dim]) by the half-split convention of HF checkpoints."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def causal_mask(past: int, seq: int, sliding_window: int | None = None, device=None) -> torch.Tensor:
    """Boolean ``[seq, past + seq]`` mask (on ``device``): query ``past + i`` sees key ``j`` iff
    ``j ≤ past + i`` (and ``j > past + i - sliding_window`` when a window is set)."""
    q_pos = torch.arange(past, past + seq, device=device)[:, None]
    k_pos = torch.arange(past + seq, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


class PerSegment:
    """A value of a batched step that differs by segment (a mask, ALiBi biases): :func:`attend`
    resolves it with each segment's own context."""

    def __init__(self, resolve: Callable[[StepContext], object]):
        self.resolve = resolve


# extras that hold one row per position (rotary cos/sin, [seq, head_dim] each; "rope_local":
# those of local-attention layers where they differ, as in Gemma 3): a batched step concatenates
# its segments' along the positions; every other extra is resolved per segment
TOKEN_EXTRAS = ("rope", "rope_local")


@dataclass
class StepContext:
    """What every block of a run needs for one step, computed once per step.

    ``past``: positions already cached; ``seq``: new positions in this step. ``extra`` holds
    family-specific precomputed tensors (rotary cos/sin, ALiBi masks), made on the CPU by the
    family's ``prepare_step``; :meth:`to` gives the context for blocks on another ``device``.

    A batched step (:meth:`batched`) runs several sessions' steps side by side along the
    positions of one row: ``segments`` holds each session's own context, in order, and the
    blocks get one KV cache per segment. Everything but attention works on the positions as they
    come; :func:`attend` runs each segment's attention on its own, exactly as if it were alone.
    """

    past: int
    seq: int
    extra: dict = field(default_factory=dict)
    _masks: dict = field(default_factory=dict)
    segments: list[StepContext] | None = None
    device: torch.device = torch.device("cpu")

    def to(self, device: torch.device) -> StepContext:
        """This context for blocks on ``device``: its tensors copied there (itself on its own)."""
        if device == self.device:
            return self
        segments = None if self.segments is None else [s.to(device) for s in self.segments]
        extra = {key: _moved(value, device) for key, value in self.extra.items()}
        return StepContext(past=self.past, seq=self.seq, extra=extra, segments=segments, device=device)

    @classmethod
    def batched(cls, segments: list[StepContext]) -> StepContext:
        """One context for ``segments`` (each prepared by its family's ``prepare_step``) laid end
        to end: per-position extras concatenated, the others (and masks) resolved per segment.
        One segment keeps its own ``past`` (a deep prompt's hook reads it)."""
        ctx = cls(past=segments[0].past if len(segments) == 1 else 0, seq=sum(s.seq for s in segments),
                  segments=segments)
        for key, value in segments[0].extra.items():
            if key not in TOKEN_EXTRAS:
                ctx.extra[key] = PerSegment(lambda sub, key=key: sub.extra[key])
            elif len(segments) == 1:
                ctx.extra[key] = value
            elif isinstance(value, tuple):
                ctx.extra[key] = tuple(torch.cat([s.extra[key][i] for s in segments]) for i in range(len(value)))
            else:
                ctx.extra[key] = torch.cat([s.extra[key] for s in segments])
        return ctx

    def bool_mask(self, sliding_window: int | None = None) -> torch.Tensor | PerSegment | None:
        """The causal mask for this step, or ``None`` where every key is visible (plain decode)."""
        if self.segments is not None:
            return PerSegment(lambda sub: sub.bool_mask(sliding_window))
        if sliding_window is None and self.seq == 1:
            return None
        if sliding_window is not None and self.past + self.seq <= sliding_window and self.seq == 1:
            return None
        if sliding_window not in self._masks:
            self._masks[sliding_window] = causal_mask(self.past, self.seq, sliding_window, self.device)
        return self._masks[sliding_window]


def _moved(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_moved(v, device) for v in value)
    return value  # a PerSegment resolves from the moved segments; numbers stay


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ctx: StepContext,
    kv: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    mask: torch.Tensor | None,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Write the new ``k``/``v`` into the cache buffers ``kv`` (if any) and attend over everything
    cached so far. Returns ``[batch, heads, seq, head_dim]``.

    ``mask`` is a boolean or additive float mask broadcastable to ``[batch, heads, seq, past + seq]``,
    or ``None`` for "every key visible".

    A batched step (``ctx.segments``; ``kv`` one cache per segment) attends segment by segment,
    each on contiguous copies of its positions, so a session's result does not depend on what
    else shares the step. ``softcap``: scores become ``softcap · tanh(score / softcap)`` before
    the mask (Gemma 2).
    """
    if ctx.segments is not None:
        return _attend_segments(q, k, v, ctx, kv, mask, scale, softcap)
    if kv is not None:
        k_buf, v_buf = kv
        end = ctx.past + ctx.seq
        k_buf[:, :, ctx.past : end] = k
        v_buf[:, :, ctx.past : end] = v
        if ctx.seq == 1:
            # attend over a whole bucket of cached positions (the rest are zeros, masked out): the
            # matmuls then keep their shapes for DECODE_BUCKET steps instead of changing every step,
            # and oneDNN builds (JIT-compiles) a kernel per shape, ~0.2 ms each here.
            padded = _decode_bucket(ctx, kv)
            return _decode_attention(q, k_buf[:, :, :padded], v_buf[:, :, :padded], mask, scale, valid=end,
                                     softcap=softcap)
        k, v = k_buf[:, :, :end], v_buf[:, :, :end]
    elif ctx.past:
        raise ValueError("a step after cached positions needs the session's KV cache")
    if ctx.seq == 1:
        return _decode_attention(q, k, v, mask, scale, valid=k.shape[2], softcap=softcap)
    if softcap is not None:
        return _capped_attention(q, k, v, mask, scale, softcap)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _capped_attention(q, k, v, mask, scale, softcap: float) -> torch.Tensor:
    """Attention with soft-capped scores (no fused kernel has it): plain matmuls, softmax in float32."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    return torch.matmul(scores.float().softmax(-1).to(v.dtype), v)


DECODE_BUCKET = 64  # cached positions are attended in multiples of this many during decoding


def _attend_segments(q, k, v, ctx: StepContext, kvs, mask, scale, softcap=None) -> torch.Tensor:
    """:func:`attend` for a batched step: each segment on contiguous copies of its positions, as
    alone; the decode steps (one position, no mask) that attend over the same number of cached
    positions together, in one matmul each way (measured bit-identical to one at a time: the
    batch dimensions of a matmul do not change the sums of an item; a different number of
    positions would)."""
    outputs: list[torch.Tensor | None] = [None] * len(ctx.segments)
    groups: dict[int, list[tuple[int, list[torch.Tensor], StepContext, tuple]]] = {}
    ids = [id(kv[0]) for kv in kvs if kv is not None]
    shared = {i for i in ids if ids.count(i) > 1}
    if shared:
        # segments sharing a cache (one session's positions, each computed as its own decode
        # step): every position's keys and values are in place before any of them attends
        start = 0
        for sub, kv in zip(ctx.segments, kvs, strict=True):
            if kv is not None:
                kv[0][:, :, sub.past : sub.past + sub.seq] = k[:, :, start : start + sub.seq]
                kv[1][:, :, sub.past : sub.past + sub.seq] = v[:, :, start : start + sub.seq]
            start += sub.seq
    start = 0
    for i, (sub, sub_kv) in enumerate(zip(ctx.segments, kvs, strict=True)):
        end = start + sub.seq
        part = [t[:, :, start:end].contiguous() for t in (q, k, v)]
        sub_mask = mask.resolve(sub) if isinstance(mask, PerSegment) else mask
        # grouped on the CPU only: measured bit-identical there; a GPU's batched matmul may choose
        # another kernel by the batch's size, so its decode steps attend one by one
        if sub.seq == 1 and sub_kv is not None and sub_mask is None and id(sub_kv[0]) not in shared and q.device.type == "cpu":
            groups.setdefault(_decode_bucket(sub, sub_kv), []).append((i, part, sub, sub_kv))
        else:
            outputs[i] = attend(*part, sub, sub_kv, mask=sub_mask, scale=scale, softcap=softcap)
        start = end
    for padded, members in groups.items():
        if len(members) == 1:
            i, part, sub, sub_kv = members[0]
            outputs[i] = attend(*part, sub, sub_kv, mask=None, scale=scale, softcap=softcap)
            continue
        for _, (_, k_new, v_new), sub, (k_buf, v_buf) in members:
            k_buf[:, :, sub.past : sub.past + 1] = k_new
            v_buf[:, :, sub.past : sub.past + 1] = v_new
        together = _decode_attention(
            torch.cat([part[0] for _, part, _, _ in members]),
            torch.cat([kv[0][:, :, :padded] for _, _, _, kv in members]),
            torch.cat([kv[1][:, :, :padded] for _, _, _, kv in members]),
            None, scale, valid=torch.tensor([sub.past + 1 for _, _, sub, _ in members], device=q.device), softcap=softcap,
        )
        for row, (i, _, _, _) in enumerate(members):
            outputs[i] = together[row : row + 1]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def _decode_bucket(ctx: StepContext, kv) -> int:
    """The cached positions a decode step attends over: whole buckets, within the buffer."""
    return min(-(-(ctx.past + ctx.seq) // DECODE_BUCKET) * DECODE_BUCKET, kv[0].shape[2])


def _decode_attention(q, k, v, mask, scale, valid: int | torch.Tensor, softcap: float | None = None):
    """One query position: plain matmuls over grouped heads (PyTorch's CPU SDPA kernel costs ~10×
    more here). Softmax in float32, as the fused kernels do. Keys from ``valid`` on are padding
    (zeros in the cache buffers): masked out, they weigh exactly 0. ``valid``: one count for every
    row, or one per row of the batch (decode steps of several sessions, ``mask`` None)."""
    b, heads, _, d = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    group = heads // kv_heads
    q = q.reshape(b, kv_heads, group, d)  # query heads sharing a KV head sit next to each other
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else d**-0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        mask = mask.reshape(-1, mask.shape[-1])[..., :valid]
        if mask.dtype == torch.bool:
            scores[..., :valid].masked_fill_(~mask.reshape(-1, 1, 1, valid), float("-inf"))
        else:
            scores[..., :valid] += mask.reshape(-1, kv_heads, group, valid)
    if isinstance(valid, torch.Tensor):  # per row: the same -inf a row alone gets
        padding = torch.arange(length, device=q.device)[None, :] >= valid[:, None]
        scores.masked_fill_(padding[:, None, None, :], float("-inf"))
    elif valid < length:
        scores[..., valid:] = float("-inf")
    probs = scores.float().softmax(-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(b, heads, 1, d)
