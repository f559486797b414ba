"""Falcon (7B, 40B, 180B, Falcon2-11B): rotary decoder blocks with the query, key and value in one
fused linear, multi-query or grouped-query attention, a GELU MLP, LayerNorms with biases, and
attention and MLP side by side on the same normed input (``parallel_attn``; the 40B/180B layout,
``new_decoder_architecture``, norms them separately with ``ln_attn`` and ``ln_mlp``).

Written against the checkpoint format: a block's parameters carry their names under
``transformer.h.{i}.``. Falcon's ALiBi variants (``alibi: true``, the RW models) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from swarm.engine.families.base import Family, check_keys
from swarm.engine.families.base import frozen_linear as _frozen_linear
from swarm.engine.layers import (
    FIXED_ROPE_TYPES,
    StepContext,
    apply_rope,
    attend,
    read_rope,
    rope_cos_sin,
    rope_inv_freq,
)

PREFIX = "transformer."


@dataclass(frozen=True)
class FalconConfig:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int  # 1 for multi-query attention
    vocab_size: int
    ffn_hidden_size: int
    layer_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    new_decoder_architecture: bool  # queries, key and value grouped per KV head in the fused linear
    parallel_attn: bool  # attention and MLP on the same normed input, added together
    two_norms: bool  # ln_attn and ln_mlp (the new architecture's default) instead of input_layernorm
    bias: bool
    tie_word_embeddings: bool
    max_positions: int | None
    model_type: str = "falcon"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, raw: dict) -> FalconConfig:
        if raw.get("alibi"):
            raise ValueError("Falcon with ALiBi (alibi: true, the RW models) is not supported; the rotary Falcons are")
        activation = raw.get("activation", "gelu")
        if activation != "gelu":
            raise ValueError(f"falcon: unsupported activation {activation!r} (only gelu)")
        layers = raw.get("num_hidden_layers", raw.get("n_layer"))
        heads = raw.get("num_attention_heads", raw.get("n_head"))
        hidden = raw.get("hidden_size", raw.get("n_embed"))
        if layers is None or heads is None or hidden is None:
            raise KeyError("num_hidden_layers" if layers is None else "num_attention_heads" if heads is None else "hidden_size")
        new = bool(raw.get("new_decoder_architecture", False))
        multi_query = raw.get("multi_query", True)
        kv = raw.get("num_kv_heads", raw.get("n_head_kv")) or heads
        theta, rope = read_rope(raw, FIXED_ROPE_TYPES)
        norms = raw.get("num_ln_in_parallel_attn") or (2 if new else 1)
        return cls(
            num_layers=layers,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=kv if new else 1 if multi_query else heads,  # the old layout: one key per head, or one
            vocab_size=raw["vocab_size"],
            ffn_hidden_size=raw.get("ffn_hidden_size") or 4 * hidden,
            layer_norm_eps=raw.get("layer_norm_epsilon", 1e-5),
            rope_theta=theta,
            rope_scaling=rope,
            new_decoder_architecture=new,
            parallel_attn=bool(raw.get("parallel_attn", True)),
            two_norms=new and norms == 2,
            bias=bool(raw.get("bias", False)),
            tie_word_embeddings=raw.get("tie_word_embeddings", True),
            max_positions=raw.get("max_position_embeddings", 2048),  # transformers' default: what 7B/40B/180B were trained on
        )


class FalconAttention(nn.Module):
    def __init__(self, cfg: FalconConfig):
        super().__init__()
        self.cfg = cfg
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        fused = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, fused, bias=cfg.bias)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.bias)

    def _split(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused projection's queries, keys and values, each ``[b, heads, s, head_dim]``."""
        b, s, _ = fused.shape
        d = self.head_dim
        if self.cfg.new_decoder_architecture:  # per KV head: its group's queries, then its key and value
            grouped = fused.view(b, s, self.num_kv_heads, -1, d)
            q, k, v = grouped[..., :-2, :].flatten(2, 3), grouped[..., -2, :], grouped[..., -1, :]
        elif self.num_kv_heads == 1:  # multi-query: every head's query, then the one key and value
            q, k, v = fused.view(b, s, -1, d).split([self.num_heads, 1, 1], dim=2)
        else:  # per head: its query, key and value
            q, k, v = fused.view(b, s, self.num_heads, 3, d).unbind(3)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx: StepContext, kv) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self._split(self.query_key_value(x))
        cos, sin = ctx.extra["rope"]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(q, k.contiguous(), v.contiguous(), ctx, kv, mask=ctx.bool_mask())
        return self.dense(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class FalconBlock(nn.Module):
    """One decoder block. ``forward(hidden [b, s, h], ctx, kv) -> hidden [b, s, h]``."""

    def __init__(self, cfg: FalconConfig, index: int):
        super().__init__()
        self.cfg = cfg
        if cfg.two_norms:
            self.ln_attn = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
            self.ln_mlp = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        else:
            self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
            if not cfg.parallel_attn and not cfg.new_decoder_architecture:
                self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attention = FalconAttention(cfg)
        self.mlp = nn.ModuleDict({
            "dense_h_to_4h": nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=cfg.bias),
            "dense_4h_to_h": nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=cfg.bias),
        })

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp["dense_4h_to_h"](F.gelu(self.mlp["dense_h_to_4h"](x)))

    def forward(self, hidden: torch.Tensor, ctx: StepContext, kv) -> torch.Tensor:
        if self.cfg.two_norms:
            attention = self.self_attention(self.ln_attn(hidden), ctx, kv)
            return hidden + (self._mlp(self.ln_mlp(hidden)) + attention)
        normed = self.input_layernorm(hidden)
        attention = self.self_attention(normed, ctx, kv)
        if self.cfg.parallel_attn or self.cfg.new_decoder_architecture:
            return hidden + (self._mlp(normed) + attention)
        hidden = hidden + attention
        return hidden + self._mlp(self.post_attention_layernorm(hidden))


class FalconHead(nn.Module):
    """The client's part: token embeddings, the final LayerNorm and the LM head (tied or not)."""

    def __init__(self, cfg: FalconConfig, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.word_embeddings = nn.Embedding.from_pretrained(tensors[f"{PREFIX}word_embeddings.weight"], freeze=True)
        weight = tensors[f"{PREFIX}ln_f.weight"]
        self.ln_f = nn.LayerNorm(weight.shape[0], eps=cfg.layer_norm_eps, dtype=weight.dtype)
        self.ln_f.weight.data, self.ln_f.bias.data = weight, tensors[f"{PREFIX}ln_f.bias"]
        self.ln_f.requires_grad_(False)
        self.lm_head = _frozen_linear(tensors.get("lm_head.weight", tensors[f"{PREFIX}word_embeddings.weight"]))
        self.max_positions = cfg.max_positions

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding table's rows for ``input_ids`` (what a prompt-tuning ``prefix`` stands in for)."""
        return self.word_embeddings(input_ids)

    def embed(self, input_ids: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids: [batch, seq]`` → ``hidden: [batch, seq, hidden]``, after a ``prefix``
        ``[n, hidden]`` of virtual token embeddings (prompt tuning) when one is given."""
        hidden = self.word_embeddings(input_ids)
        if prefix is None:
            return hidden
        return torch.cat([prefix.to(hidden.dtype).expand(hidden.shape[0], -1, -1), hidden], dim=1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden: [batch, seq, hidden]`` → ``logits: [batch, seq, vocab]`` in float32."""
        return self.lm_head(self.ln_f(hidden)).float()


def head_keys(cfg: FalconConfig, available: set[str]) -> list[str]:
    keys = [f"{PREFIX}word_embeddings.weight", f"{PREFIX}ln_f.weight", f"{PREFIX}ln_f.bias"]
    if "lm_head.weight" in available and not cfg.tie_word_embeddings:
        keys.append("lm_head.weight")
    elif not cfg.tie_word_embeddings:
        check_keys(["lm_head.weight"], available)
    return keys


def prepare_step(cfg: FalconConfig, ctx: StepContext, dtype: torch.dtype, batch: int) -> None:
    inv_freq, factor = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    ctx.extra["rope"] = rope_cos_sin(inv_freq, factor, torch.arange(ctx.past, ctx.past + ctx.seq), dtype)


FAMILY = Family(
    name="falcon",
    parse_config=FalconConfig.from_dict,
    block=FalconBlock,
    block_prefix=lambda cfg, i: f"{PREFIX}h.{i}.",
    head=FalconHead,
    head_keys=head_keys,
    prepare_step=prepare_step,
    kv_heads=lambda cfg: (cfg.num_kv_heads, cfg.head_dim),
    lora_default=("query_key_value",),
)
