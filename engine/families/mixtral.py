"""Mixtral: the Llama attention (optionally windowed) and a sparse mixture of experts in place of
the MLP: a router picks the ``num_experts_per_tok`` experts of highest probability for each token,
their SwiGLU outputs are summed weighted by those probabilities (renormalized). The experts live
in their block (counted in its memory, quantized with it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from swarm.engine.families.llama import LlamaAttention, LlamaConfig, make_family
from swarm.engine.fast import SEGMENTS
from swarm.engine.layers import RMSNorm, StepContext


@dataclass(frozen=True)
class MixtralConfig(LlamaConfig):
    num_experts: int = 8
    top_k: int = 2


def parse_config(raw: dict) -> MixtralConfig:
    window = raw.get("sliding_window")
    return MixtralConfig.from_dict(raw, sliding_windows=(window,) * raw["num_hidden_layers"],
                                   num_experts=raw["num_local_experts"], top_k=raw["num_experts_per_tok"])


class MixtralExpert(nn.Module):
    def __init__(self, cfg: MixtralConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)  # gate
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)  # down
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MixtralMoE(nn.Module):
    """The router (``gate``) and the experts. ``expert()``: a new expert module; ``normalize``:
    renormalize the chosen experts' probabilities; ``model_dtype_weights``: those weights cast to
    the hidden states' dtype before they scale the experts' outputs (Qwen3-MoE) rather than kept
    in float32 (Mixtral)."""

    def __init__(self, cfg, expert=None, normalize: bool = True, model_dtype_weights: bool = False):
        super().__init__()
        self.top_k, self.normalize, self.model_dtype_weights = cfg.top_k, normalize, model_dtype_weights
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList((expert or (lambda: MixtralExpert(cfg)))() for _ in range(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        segments = SEGMENTS.get()
        if segments is None or len(segments) == 1:
            return self._route(x)
        # a batched step of several sessions: each session's tokens routed and computed as its step
        # alone would be (the experts' matmuls then see the same rows), so its result is the same
        token = SEGMENTS.set(None)
        try:
            return torch.cat([self._route(part) for part in x.split(list(segments), dim=1)], dim=1)
        finally:
            SEGMENTS.reset(token)

    def _route(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(flat).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.model_dtype_weights:
            weights = weights.to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):  # in order: every token's sum in the same order
            tokens, slot = torch.where(chosen == e)
            if tokens.numel():
                out.index_add_(0, tokens, (expert(flat[tokens]) * weights[tokens, slot, None]).to(out.dtype))
        return out.view(shape)


class MixtralBlock(nn.Module):
    """One decoder block. ``forward(hidden [b, s, h], ctx, kv) -> hidden [b, s, h]``."""

    def __init__(self, cfg: MixtralConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, cfg.sliding_windows[index])
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.block_sparse_moe = MixtralMoE(cfg)

    def forward(self, hidden: torch.Tensor, ctx: StepContext, kv) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), ctx, kv)
        return hidden + self.block_sparse_moe(self.post_attention_layernorm(hidden))


FAMILY = make_family("mixtral", parse_config, block=MixtralBlock)
