"""Gemma 2: norms before and after both the attention and the MLP (Gemma's RMSNorm, scaled by
``1 + weight``), soft-capped attention scores and final logits, sliding-window attention on
alternate layers, queries scaled by ``query_pre_attn_scalar``, GELU (tanh) MLP, and token
embeddings scaled by ``sqrt(hidden_size)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from swarm.engine.families.base import Family, check_keys
from swarm.engine.families.base import frozen_linear as _frozen_linear
from swarm.engine.layers import (
    FIXED_ROPE_TYPES,
    OffsetRMSNorm,
    StepContext,
    apply_rope,
    attend,
    read_rope,
    rope_cos_sin,
    rope_inv_freq,
)


@dataclass(frozen=True)
class Gemma2Config:
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    query_scale: float  # the queries' factor: query_pre_attn_scalar ** -0.5
    attn_softcap: float | None
    final_softcap: float | None
    sliding_windows: tuple[int | None, ...]
    attention_bias: bool
    tie_word_embeddings: bool
    max_positions: int | None
    rope_scaling: dict | None = None
    qk_norm: bool = False  # Gemma's RMSNorm over each head's queries and keys (Gemma 3)
    # (theta, scaling) of the sliding-window layers' rotary embeddings where they differ (Gemma 3)
    local_rope: tuple[float, dict | None] | None = None
    # where the language model's tensors are (a multimodal Gemma 3 checkpoint's: "language_model.model.")
    prefix: str = "model."
    lm_head_key: str = "lm_head.weight"  # the untied LM head's tensor

    @classmethod
    def from_dict(cls, raw: dict) -> Gemma2Config:
        n, heads = raw["num_hidden_layers"], raw["num_attention_heads"]
        act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"{raw['model_type']}: unsupported hidden_activation {act!r} (only gelu_pytorch_tanh)")
        theta, rope = read_rope(raw, FIXED_ROPE_TYPES)
        window = raw.get("sliding_window")
        types = raw.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
        return cls(
            model_type=raw["model_type"],
            num_layers=n,
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            vocab_size=raw["vocab_size"],
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            query_scale=float(raw.get("query_pre_attn_scalar", 256)) ** -0.5,
            attn_softcap=raw.get("attn_logit_softcapping"),
            final_softcap=raw.get("final_logit_softcapping"),
            sliding_windows=tuple(window if t == "sliding_attention" else None for t in types),
            attention_bias=raw.get("attention_bias", False),
            tie_word_embeddings=raw.get("tie_word_embeddings", True),
            max_positions=raw.get("max_position_embeddings"),
            rope_scaling=rope,
        )


class Gemma2Attention(nn.Module):
    def __init__(self, cfg: Gemma2Config, sliding_window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.sliding_window, self.scale, self.softcap = sliding_window, cfg.query_scale, cfg.attn_softcap
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=bias)
        if cfg.qk_norm:
            self.q_norm = OffsetRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = OffsetRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.rope = "rope_local" if sliding_window is not None and cfg.local_rope is not None else "rope"

    def forward(self, x: torch.Tensor, ctx: StepContext, kv) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = ctx.extra[self.rope]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(q, k, v, ctx, kv, mask=ctx.bool_mask(self.sliding_window), scale=self.scale, softcap=self.softcap)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class Gemma2MLP(nn.Module):
    def __init__(self, cfg: Gemma2Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Gemma2Block(nn.Module):
    """One decoder block. ``forward(hidden [b, s, h], ctx, kv) -> hidden [b, s, h]``."""

    def __init__(self, cfg: Gemma2Config, index: int):
        super().__init__()
        eps = cfg.rms_norm_eps
        self.input_layernorm = OffsetRMSNorm(cfg.hidden_size, eps)
        self.self_attn = Gemma2Attention(cfg, cfg.sliding_windows[index])
        self.post_attention_layernorm = OffsetRMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = OffsetRMSNorm(cfg.hidden_size, eps)
        self.mlp = Gemma2MLP(cfg)
        self.post_feedforward_layernorm = OffsetRMSNorm(cfg.hidden_size, eps)

    def forward(self, hidden: torch.Tensor, ctx: StepContext, kv) -> torch.Tensor:
        hidden = hidden + self.post_attention_layernorm(self.self_attn(self.input_layernorm(hidden), ctx, kv))
        return hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))


class Gemma2Head(nn.Module):
    """The client's part: token embeddings (scaled by ``sqrt(hidden_size)``), the final norm, the
    LM head (tied or not) and the final logits' soft cap."""

    def __init__(self, cfg: Gemma2Config, tensors: dict[str, torch.Tensor]):
        super().__init__()
        table = tensors[f"{cfg.prefix}embed_tokens.weight"]
        self.embed_tokens = nn.Embedding.from_pretrained(table, freeze=True)
        self.scale = cfg.hidden_size**0.5
        self.norm = OffsetRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm.weight.data = tensors[f"{cfg.prefix}norm.weight"]
        self.lm_head = _frozen_linear(tensors.get(cfg.lm_head_key, table))
        self.softcap = cfg.final_softcap
        self.max_positions = cfg.max_positions

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embeddings of ``input_ids`` as the blocks get them (scaled, as peft's prompt tuning
        initializes from them)."""
        table = self.embed_tokens.weight
        return self.embed_tokens(input_ids) * torch.tensor(self.scale, dtype=table.dtype)

    def embed(self, input_ids: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids: [batch, seq]`` → ``hidden: [batch, seq, hidden]``; a ``prefix`` ``[n, hidden]``
        of virtual token embeddings (prompt tuning) comes first, as it is (not scaled)."""
        hidden = self.token_embeddings(input_ids)
        if prefix is None:
            return hidden
        return torch.cat([prefix.to(hidden.dtype).expand(hidden.shape[0], -1, -1), hidden], dim=1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden: [batch, seq, hidden]`` → ``logits: [batch, seq, vocab]`` in float32."""
        logits = self.lm_head(self.norm(hidden))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()


def head_keys(cfg: Gemma2Config, available: set[str]) -> list[str]:
    keys = [f"{cfg.prefix}embed_tokens.weight", f"{cfg.prefix}norm.weight"]
    if not cfg.tie_word_embeddings:
        check_keys([cfg.lm_head_key], available)
        keys.append(cfg.lm_head_key)
    return keys


def prepare_step(cfg: Gemma2Config, ctx: StepContext, dtype: torch.dtype, batch: int) -> None:
    positions = torch.arange(ctx.past, ctx.past + ctx.seq)
    inv_freq, factor = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    ctx.extra["rope"] = rope_cos_sin(inv_freq, factor, positions, dtype)
    if cfg.local_rope is not None:
        inv_freq, factor = rope_inv_freq(cfg.head_dim, *cfg.local_rope)
        ctx.extra["rope_local"] = rope_cos_sin(inv_freq, factor, positions, dtype)


FAMILY = Family(
    name="gemma2",
    parse_config=Gemma2Config.from_dict,
    block=Gemma2Block,
    block_prefix=lambda cfg, i: f"{cfg.prefix}layers.{i}.",
    head=Gemma2Head,
    head_keys=head_keys,
    prepare_step=prepare_step,
    kv_heads=lambda cfg: (cfg.num_kv_heads, cfg.head_dim),
)
