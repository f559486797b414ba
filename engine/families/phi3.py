"""Phi-3 (and Phi-4-mini): the Llama block with the query, key and value projections fused into
one ``qkv_proj`` and the gate and up projections into one ``gate_up_proj``, rotary embeddings on
the first ``partial_rotary_factor`` of each head, LongRoPE scaling (the 128k checkpoints: the
short factors for positions within the original context, the long ones past it), and one sliding
window for every layer."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from swarm.engine.families.llama import LlamaBlock, LlamaConfig, make_family, rotary_dim
from swarm.engine.layers import StepContext, apply_rope, attend


def parse_config(raw: dict) -> LlamaConfig:
    window = raw.get("sliding_window")
    cfg = LlamaConfig.from_dict(raw, qkv_bias=False, o_bias=False, sliding_windows=(window,) * raw["num_hidden_layers"])
    rope = dict(cfg.rope_scaling or {})
    if "partial_rotary_factor" in raw:  # Phi-4-mini states it at the top level
        rope.setdefault("partial_rotary_factor", raw["partial_rotary_factor"])
    if rope.get("rope_type", rope.get("type")) in ("longrope", "su", "yarn"):  # Phi-3's names for its LongRoPE
        rope["rope_type"] = "longrope"
        rope.pop("type", None)
        # as transformers: the top level's original context first, then the scaling's, else 4096
        stated = raw.get("rope_parameters") or raw.get("rope_scaling") or {}  # not rope_defaults' filling
        original = raw.get("original_max_position_embeddings") or stated.get("original_max_position_embeddings") or 4096
        rope["original_max_position_embeddings"] = original
        rope.setdefault("max_position_embeddings", raw["max_position_embeddings"])
    return replace(cfg, rope_scaling=rope or None)


class Phi3Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, sliding_window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.rotary_dim = rotary_dim(cfg)
        self.sliding_window = sliding_window
        self.qkv_proj = nn.Linear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rotary_dim == self.head_dim:
            return apply_rope(x, cos, sin)
        return torch.cat([apply_rope(x[..., : self.rotary_dim], cos, sin), x[..., self.rotary_dim :]], dim=-1)

    def forward(self, x: torch.Tensor, ctx: StepContext, kv) -> torch.Tensor:
        b, s, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = ctx.extra["rope"]
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        out = attend(q, k, v, ctx, kv, mask=ctx.bool_mask(self.sliding_window))
        return self.o_proj(out.transpose(1, 2).reshape(b, s, q_size))


class Phi3MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


FAMILY = make_family(
    "phi3", parse_config,
    block=lambda cfg, i: LlamaBlock(cfg, i, attn=Phi3Attention(cfg, cfg.sliding_windows[i]), mlp=Phi3MLP(cfg)),
    lora_default=("qkv_proj",),  # peft names no default for phi3; its attention is one linear
)
