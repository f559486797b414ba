"""Gemma 3 (text): Gemma 2's block with Gemma's RMSNorm over each head's queries and keys, one
global-attention layer in every ``sliding_window_pattern`` (6) and the rest local (sliding
window), each kind with its own rotary embeddings (global: ``rope_theta`` 1e6 and the scaling of
the larger models; local: ``rope_local_base_freq`` 1e4), and no soft cap on attention scores
(the final logits' cap where the config sets one)."""

from __future__ import annotations

from dataclasses import replace

from swarm.engine.families import gemma2
from swarm.engine.families.gemma2 import Gemma2Config
from swarm.engine.layers import FIXED_ROPE_TYPES, check_rope, rope_defaults


def parse_config(raw: dict) -> Gemma2Config:
    if raw.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention: an encoder (EmbeddingGemma's layout), not a causal language "
                         "model; swarm serves causal models only")
    n = raw["num_hidden_layers"]
    pattern = raw.get("sliding_window_pattern", 6)
    types = raw.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    ropes = raw.get("rope_parameters") or {}
    if "full_attention" in ropes:  # per layer kind, as transformers writes it now
        full, local = dict(ropes["full_attention"] or {}), dict(ropes.get("sliding_attention") or {})
    else:
        full = {**(raw.get("rope_scaling") or {}), "rope_theta": raw.get("rope_theta", 1_000_000.0)}
        local = {"rope_theta": raw.get("rope_local_base_freq", 10_000.0)}
    cfg = Gemma2Config.from_dict({**raw, "layer_types": types, "rope_parameters": full, "rope_scaling": None,
                                  # Gemma 3 has no soft cap on attention scores (its q/k norms took that
                                  # role): a value in config.json is ignored, as transformers does
                                  "attn_logit_softcapping": None,
                                  "final_logit_softcapping": raw.get("final_logit_softcapping")})
    local = rope_defaults(raw, local)
    check_rope(local, FIXED_ROPE_TYPES)
    theta = float(local.pop("rope_theta", 10_000.0))
    return replace(cfg, qk_norm=True, local_rope=(theta, local or None))


FAMILY = replace(gemma2.FAMILY, name="gemma3_text", parse_config=parse_config)
