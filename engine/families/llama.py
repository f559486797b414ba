"""Llama (Llama 2/3, SmolLM2, TinyLlama): pre-norm decoder blocks with GQA, RoPE and SwiGLU.

Written against the checkpoint format: a block's parameters carry the names they have in the
checkpoint under ``model.layers.{i}.``. Mistral, Qwen2 and Qwen3 reuse this block with their own
config parsing (sliding windows, q/k/v biases, Qwen3's norms of each head's queries and keys).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from swarm.engine.families.base import Family, check_keys
from swarm.engine.families.base import frozen_linear as _frozen_linear
from swarm.engine.layers import RMSNorm, StepContext, apply_rope, attend, read_rope, rope_cos_sin, rope_inv_freq


@dataclass(frozen=True)
class LlamaConfig:
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
    rope_scaling: dict | None
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # per layer: None for full attention, else the window in tokens
    sliding_windows: tuple[int | None, ...] = ()
    hidden_act: str = "silu"
    qk_norm: bool = False  # an RMSNorm over each head's queries and keys, before RoPE (Qwen3)
    # the context length (prompt and generated tokens together); None: not stated by config.json
    max_positions: int | None = None

    @classmethod
    def from_dict(cls, raw: dict, **overrides) -> LlamaConfig:
        heads = raw["num_attention_heads"]
        theta, rope = read_rope(raw)
        bias = raw.get("attention_bias", False)
        fields = dict(
            model_type=raw["model_type"],
            num_layers=raw["num_hidden_layers"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            vocab_size=raw["vocab_size"],
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=rope,
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            qkv_bias=bias,
            o_bias=bias,
            mlp_bias=raw.get("mlp_bias", False),
            sliding_windows=(None,) * raw["num_hidden_layers"],
            hidden_act=raw.get("hidden_act", "silu"),
            max_positions=raw.get("max_position_embeddings"),
        )
        fields.update(overrides)
        if fields["hidden_act"] != "silu":
            raise ValueError(f"{raw['model_type']}: unsupported hidden_act {fields['hidden_act']!r} (only silu)")
        return cls(**fields)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig, sliding_window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.sliding_window = sliding_window
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: StepContext, kv) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = ctx.extra["rope"]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(q, k, v, ctx, kv, mask=ctx.bool_mask(self.sliding_window))
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    """SwiGLU; ``intermediate``: its width where not the config's (a mixture of experts' expert)."""

    def __init__(self, cfg: LlamaConfig, intermediate: int | None = None):
        super().__init__()
        width = intermediate or cfg.intermediate_size
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, width, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(width, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """One decoder block. ``forward(hidden [b, s, h], ctx, kv) -> hidden [b, s, h]``; ``attn`` and
    ``mlp``: other modules in those places (Phi-3's fused ones, a mixture of experts)."""

    def __init__(self, cfg: LlamaConfig, index: int, attn: nn.Module | None = None, mlp: nn.Module | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attn if attn is not None else LlamaAttention(cfg, cfg.sliding_windows[index])
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp if mlp is not None else LlamaMLP(cfg)

    def forward(self, hidden: torch.Tensor, ctx: StepContext, kv) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), ctx, kv)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaHead(nn.Module):
    """The client's part: token embeddings, the final norm and the LM head (tied or not)."""

    def __init__(self, cfg: LlamaConfig, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.embed_tokens = nn.Embedding.from_pretrained(tensors["model.embed_tokens.weight"], freeze=True)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm.weight.data = tensors["model.norm.weight"]
        lm = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
        self.lm_head = _frozen_linear(lm)
        self.max_positions = cfg.max_positions

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding table's rows for ``input_ids`` (what a prompt-tuning ``prefix`` stands in for)."""
        return self.embed_tokens(input_ids)

    def embed(self, input_ids: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids: [batch, seq]`` → ``hidden: [batch, seq, hidden]``; a ``prefix`` ``[n, hidden]``
        of virtual token embeddings (prompt tuning) comes first: ``[batch, n + seq, hidden]``."""
        hidden = self.embed_tokens(input_ids)
        return hidden if prefix is None else _prepend(prefix, hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden: [batch, seq, hidden]`` → ``logits: [batch, seq, vocab]`` in float32."""
        return self.lm_head(self.norm(hidden)).float()


def _prepend(prefix: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    return torch.cat([prefix.to(hidden.dtype).expand(hidden.shape[0], -1, -1), hidden], dim=1)


def head_keys(cfg: LlamaConfig, available: set[str]) -> list[str]:
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    if "lm_head.weight" in available and not cfg.tie_word_embeddings:
        keys.append("lm_head.weight")
    elif not cfg.tie_word_embeddings:
        check_keys(["lm_head.weight"], available)
    return keys


def rotary_dim(cfg: LlamaConfig) -> int:
    """How much of each head RoPE rotates (``partial_rotary_factor``: Phi-3 and Phi-4-mini)."""
    return int(cfg.head_dim * (cfg.rope_scaling or {}).get("partial_rotary_factor", 1.0))


def prepare_step(cfg: LlamaConfig, ctx: StepContext, dtype: torch.dtype, batch: int) -> None:
    positions = torch.arange(ctx.past, ctx.past + ctx.seq)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") != "longrope":
        ctx.extra["rope"] = rope_cos_sin(*rope_inv_freq(rotary_dim(cfg), cfg.rope_theta, scaling), positions, dtype)
        return
    # LongRoPE by position: the short factors within the original context, the long ones past it,
    # so a position's rotation is the same however the sequence is stepped, chunked or replayed
    original = scaling["original_max_position_embeddings"]
    short, long = (rope_cos_sin(*rope_inv_freq(rotary_dim(cfg), cfg.rope_theta, scaling, n), positions, dtype)
                   for n in (0, original + 1))
    past = (positions >= original)[:, None]
    ctx.extra["rope"] = tuple(torch.where(past, b, a) for a, b in zip(short, long))


def make_family(name: str, parse, **overrides) -> Family:
    """A family written like Llama's (its names, head and RoPE), with ``overrides`` of
    :class:`~swarm.engine.families.base.Family`'s fields (its block, say)."""
    fields = dict(
        name=name,
        parse_config=parse,
        block=LlamaBlock,
        block_prefix=lambda cfg, i: f"model.layers.{i}.",
        head=LlamaHead,
        head_keys=head_keys,
        prepare_step=prepare_step,
        kv_heads=lambda cfg: (cfg.num_kv_heads, cfg.head_dim),
    )
    return Family(**{**fields, **overrides})


FAMILY = make_family("llama", LlamaConfig.from_dict)
