"""Qwen3-MoE: Qwen3's attention (per-head query/key norms) and a sparse mixture of SwiGLU experts
(``moe_intermediate_size``) in the blocks ``decoder_sparse_step`` and ``mlp_only_layers`` pick (a
dense MLP in the others); the chosen experts' probabilities renormalized when
``norm_topk_prob``, and cast to the model's dtype before they weigh the experts' outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from swarm.engine.families.base import Family
from swarm.engine.families.llama import LlamaAttention, LlamaConfig, LlamaHead, head_keys, prepare_step
from swarm.engine.families.mixtral import MixtralMoE
from swarm.engine.families.qwen2 import parse_config as parse_qwen2
from swarm.engine.layers import RMSNorm, StepContext


@dataclass(frozen=True)
class Qwen3MoeConfig(LlamaConfig):
    num_experts: int = 8
    top_k: int = 2
    moe_intermediate_size: int = 0
    normalize: bool = False
    sparse: tuple[bool, ...] = ()  # per layer: a mixture of experts (else a dense MLP)


def parse_config(raw: dict) -> Qwen3MoeConfig:
    n, step = raw["num_hidden_layers"], raw.get("decoder_sparse_step", 1)
    dense = set(raw.get("mlp_only_layers") or [])
    experts = raw["num_experts"] if "num_experts" in raw else raw["num_local_experts"]  # the hub's, transformers 5's
    bias = raw.get("attention_bias", False)
    return Qwen3MoeConfig.from_dict(
        raw, qkv_bias=bias, o_bias=bias, sliding_windows=parse_qwen2(raw).sliding_windows, qk_norm=True,
        num_experts=experts, top_k=raw["num_experts_per_tok"], moe_intermediate_size=raw["moe_intermediate_size"],
        normalize=raw.get("norm_topk_prob", False),
        sparse=tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(n)),
    )


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3MoeBlock(nn.Module):
    """One decoder block. ``forward(hidden [b, s, h], ctx, kv) -> hidden [b, s, h]``."""

    def __init__(self, cfg: Qwen3MoeConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, cfg.sliding_windows[index])
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.sparse[index]:
            self.mlp = MixtralMoE(cfg, lambda: SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size),
                                  normalize=cfg.normalize, model_dtype_weights=True)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, hidden: torch.Tensor, ctx: StepContext, kv) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), ctx, kv)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


FAMILY = Family(
    name="qwen3_moe",
    parse_config=parse_config,
    block=Qwen3MoeBlock,
    block_prefix=lambda cfg, i: f"model.layers.{i}.",
    head=LlamaHead,
    head_keys=head_keys,
    prepare_step=prepare_step,
    kv_heads=lambda cfg: (cfg.num_kv_heads, cfg.head_dim),
)
