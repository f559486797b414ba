"""Qwen3: the Llama block with an RMSNorm over each head's queries and keys (before RoPE), an
explicit head size, and Qwen2's optional per-layer sliding windows."""

from __future__ import annotations

from swarm.engine.families.llama import LlamaConfig, make_family
from swarm.engine.families.qwen2 import parse_config as parse_qwen2


def parse_config(raw: dict) -> LlamaConfig:
    bias = raw.get("attention_bias", False)
    cfg = parse_qwen2(raw)
    return LlamaConfig.from_dict(raw, qkv_bias=bias, o_bias=bias, sliding_windows=cfg.sliding_windows, qk_norm=True)


FAMILY = make_family("qwen3", parse_config)
