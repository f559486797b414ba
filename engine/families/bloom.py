"""BLOOM (the paper's model): LayerNorm blocks with a fused per-head q/k/v, ALiBi and GeLU.

Checkpoints name blocks ``transformer.h.{i}.`` (saved from ``BloomForCausalLM``) or ``h.{i}.``
(saved from ``BloomModel``, as the original BigScience repositories are); both load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from swarm.engine.families.base import Family
from swarm.engine.families.base import frozen_linear as _frozen_linear
from swarm.engine.layers import StepContext, attend, causal_mask


@dataclass(frozen=True)
class BloomConfig:
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    layer_norm_eps: float
    residual_post_layernorm: bool
    tie_word_embeddings: bool
    prefix: str = "transformer."  # set by the loader from the checkpoint's key names
    # ALiBi has no learned or precomputed positions, so no fixed context length
    max_positions: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, raw: dict) -> BloomConfig:
        return cls(
            model_type="bloom",
            num_layers=raw.get("n_layer") or raw["num_hidden_layers"],
            hidden_size=raw.get("hidden_size") or raw["n_embed"],
            num_heads=raw.get("n_head") or raw["num_attention_heads"],
            vocab_size=raw["vocab_size"],
            layer_norm_eps=raw.get("layer_norm_epsilon", 1e-5),
            residual_post_layernorm=raw.get("apply_residual_connection_post_layernorm", False),
            tie_word_embeddings=raw.get("tie_word_embeddings", True),
        )


def gelu(x: torch.Tensor) -> torch.Tensor:
    """BLOOM's tanh GeLU, with its constants (so outputs match the checkpoints' reference code)."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """One ALiBi slope per head: ``[num_heads]`` float32 (geometric, with interleaved extras when
    ``num_heads`` is not a power of two)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        slopes = torch.cat([slopes, torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))])
    return slopes


class BloomAttention(nn.Module):
    def __init__(self, cfg: BloomConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, ctx: StepContext, kv) -> torch.Tensor:
        b, s, _ = x.shape
        # fused: [b, s, heads, 3, head_dim]; q/k/v: [b, heads, s, head_dim]
        fused = self.query_key_value(x).view(b, s, self.num_heads, 3, self.head_dim)
        q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))
        out = attend(q, k, v, ctx, kv, mask=ctx.extra["alibi_mask"])
        return self.dense(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class BloomBlock(nn.Module):
    """One BLOOM block. ``forward(hidden [b, s, h], ctx, kv) -> hidden [b, s, h]``."""

    def __init__(self, cfg: BloomConfig, index: int):
        super().__init__()
        self.residual_post_layernorm = cfg.residual_post_layernorm
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attention = BloomAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = nn.ModuleDict(
            {
                "dense_h_to_4h": nn.Linear(cfg.hidden_size, 4 * cfg.hidden_size),
                "dense_4h_to_h": nn.Linear(4 * cfg.hidden_size, cfg.hidden_size),
            }
        )

    def forward(self, hidden: torch.Tensor, ctx: StepContext, kv) -> torch.Tensor:
        normed = self.input_layernorm(hidden)
        residual = normed if self.residual_post_layernorm else hidden
        hidden = residual + self.self_attention(normed, ctx, kv)
        normed = self.post_attention_layernorm(hidden)
        residual = normed if self.residual_post_layernorm else hidden
        return residual + self.mlp["dense_4h_to_h"](gelu(self.mlp["dense_h_to_4h"](normed)))


class BloomHead(nn.Module):
    """The client's part: embeddings with their LayerNorm, the final LayerNorm, the tied LM head."""

    def __init__(self, cfg: BloomConfig, tensors: dict[str, torch.Tensor]):
        super().__init__()
        p = cfg.prefix
        self.word_embeddings = nn.Embedding.from_pretrained(tensors[f"{p}word_embeddings.weight"], freeze=True)
        self.embed_norm = _layer_norm(tensors, f"{p}word_embeddings_layernorm", cfg.layer_norm_eps)
        self.ln_f = _layer_norm(tensors, f"{p}ln_f", cfg.layer_norm_eps)
        lm = tensors.get("lm_head.weight", tensors[f"{p}word_embeddings.weight"])
        self.lm_head = _frozen_linear(lm)
        self.max_positions = cfg.max_positions

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding table's rows for ``input_ids`` (what a prompt-tuning ``prefix`` stands in for)."""
        return self.word_embeddings(input_ids)

    def embed(self, input_ids: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids: [batch, seq]`` → ``hidden: [batch, seq, hidden]``; a ``prefix`` ``[n, hidden]``
        of virtual token embeddings (prompt tuning) comes first, before the embedding LayerNorm as
        in peft: ``[batch, n + seq, hidden]``."""
        hidden = self.word_embeddings(input_ids)
        if prefix is not None:
            hidden = torch.cat([prefix.to(hidden.dtype).expand(hidden.shape[0], -1, -1), hidden], dim=1)
        return self.embed_norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden: [batch, seq, hidden]`` → ``logits: [batch, seq, vocab]`` in float32."""
        return self.lm_head(self.ln_f(hidden)).float()


def _layer_norm(tensors: dict[str, torch.Tensor], name: str, eps: float) -> nn.LayerNorm:
    weight = tensors[f"{name}.weight"]
    norm = nn.LayerNorm(weight.shape[0], eps=eps, dtype=weight.dtype)
    norm.weight.data, norm.bias.data = weight, tensors[f"{name}.bias"]
    norm.requires_grad_(False)
    return norm


def head_keys(cfg: BloomConfig, available: set[str]) -> list[str]:
    p = cfg.prefix
    keys = [f"{p}word_embeddings.weight", f"{p}ln_f.weight", f"{p}ln_f.bias"]
    keys += [f"{p}word_embeddings_layernorm.weight", f"{p}word_embeddings_layernorm.bias"]
    if "lm_head.weight" in available and not cfg.tie_word_embeddings:
        keys.append("lm_head.weight")
    return keys


def prepare_step(cfg: BloomConfig, ctx: StepContext, dtype: torch.dtype, batch: int) -> None:
    """ALiBi as an additive mask ``[1, heads, seq, past + seq]``: slope × key position, and -inf
    where the causal mask hides a key (softmax is shift-invariant, so only key positions matter)."""
    total = ctx.past + ctx.seq
    bias = alibi_slopes(cfg.num_heads)[:, None, None] * torch.arange(total, dtype=torch.float32)[None, None, :]
    bias = bias.expand(cfg.num_heads, ctx.seq, total).to(dtype)
    if ctx.seq > 1:
        bias = bias.masked_fill(~causal_mask(ctx.past, ctx.seq), float("-inf"))
    ctx.extra["alibi_mask"] = bias[None]


def fit_to_keys(cfg: BloomConfig, keys: set[str]) -> BloomConfig:
    return replace(cfg, prefix="" if "word_embeddings.weight" in keys else "transformer.")


def _block_prefix(cfg: BloomConfig, index: int) -> str:
    return f"{cfg.prefix}h.{index}."


FAMILY = Family(
    name="bloom",
    parse_config=BloomConfig.from_dict,
    block=BloomBlock,
    block_prefix=_block_prefix,
    head=BloomHead,
    head_keys=head_keys,
    prepare_step=prepare_step,
    kv_heads=lambda cfg: (cfg.num_heads, cfg.head_dim),
    fit_to_keys=fit_to_keys,
    lora_default=("query_key_value",),
    adapter_prefix=lambda cfg, i: f"transformer.h.{i}.",
)
