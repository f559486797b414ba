"""Qwen2: the Llama block with biases on q/k/v (not o), and optional per-layer sliding windows."""

from __future__ import annotations

from swarm.engine.families.llama import LlamaConfig, make_family


def parse_config(raw: dict) -> LlamaConfig:
    n = raw["num_hidden_layers"]
    window = raw.get("sliding_window") if raw.get("use_sliding_window", False) else None
    layer_types = raw.get("layer_types") or [
        "sliding_attention" if window is not None and i >= raw.get("max_window_layers", 28) else "full_attention"
        for i in range(n)
    ]
    windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
    return LlamaConfig.from_dict(raw, qkv_bias=True, o_bias=False, sliding_windows=windows)


FAMILY = make_family("qwen2", parse_config)
