"""Mistral: the Llama block with a sliding attention window on every layer (when set)."""

from __future__ import annotations

from swarm.engine.families.llama import LlamaConfig, make_family


def parse_config(raw: dict) -> LlamaConfig:
    window = raw.get("sliding_window")
    return LlamaConfig.from_dict(raw, sliding_windows=(window,) * raw["num_hidden_layers"])


FAMILY = make_family("mistral", parse_config)
