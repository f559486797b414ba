"""Qwen3-MoE: Qwen3's attention (per-head query/key norms) and a sparse mixture of SwiGLU experts
(``moe_intermediate_size``) in the blocks ``decoder_sparse_step`` and ``mlp_only_layers`` pick (a
dense MLP in the others); the chosen experts' probabilities renormalized when
``norm_topk_prob``, and cast to the model's dtype before they weigh the experts' outputs."""

from __future__ import annotations

from dataclasses import dataclass

from swarm.engine.families.llama import LlamaBlock, LlamaConfig, LlamaMLP, make_family
from swarm.engine.families.mixtral import MixtralMoE


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
    # one window for every layer where use_sliding_window is set (transformers' Qwen3-MoE has no
    # max_window_layers, unlike Qwen2 and Qwen3)
    window = raw.get("sliding_window") if raw.get("use_sliding_window", False) else None
    return Qwen3MoeConfig.from_dict(
        raw, qkv_bias=bias, o_bias=bias, sliding_windows=(window,) * n, qk_norm=True,
        num_experts=experts, top_k=raw["num_experts_per_tok"], moe_intermediate_size=raw["moe_intermediate_size"],
        normalize=raw.get("norm_topk_prob", False),
        sparse=tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(n)),
    )


def block(cfg: Qwen3MoeConfig, index: int) -> LlamaBlock:
    if not cfg.sparse[index]:
        return LlamaBlock(cfg, index)
    experts = MixtralMoE(cfg, lambda: LlamaMLP(cfg, cfg.moe_intermediate_size), normalize=cfg.normalize,
                         model_dtype_weights=True)
    return LlamaBlock(cfg, index, mlp=experts)


FAMILY = make_family("qwen3_moe", parse_config, block=block)
