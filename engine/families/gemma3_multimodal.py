"""Gemma 3's multimodal checkpoints (``model_type`` ``gemma3``: 4B, 12B, 27B): their language
model, the text family of :mod:`swarm.engine.families.gemma3`, read from ``text_config`` and the
``language_model`` tensors; the vision tower and its projector are never loaded (text in, text
out)."""

from __future__ import annotations

from dataclasses import replace

from swarm.engine.families import gemma3
from swarm.engine.families.base import CheckpointError
from swarm.engine.families.gemma2 import Gemma2Config

# the language model's tensors: as the Hub's checkpoints name them, and as transformers' current
# Gemma3ForConditionalGeneration does
PREFIXES = ("language_model.model.", "model.language_model.")
LM_HEADS = ("language_model.lm_head.weight", "lm_head.weight")


def parse_config(raw: dict) -> Gemma2Config:
    """``text_config`` with transformers' defaults for what it leaves out (the Hub's configs state
    only what differs from them), and the top level's tying of the embeddings."""
    from transformers import Gemma3TextConfig

    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise KeyError("text_config")
    filled = Gemma3TextConfig(**text).to_dict()
    tied = raw.get("tie_word_embeddings", filled.get("tie_word_embeddings", True))
    # the multimodal model's logits are never soft-capped (transformers' Gemma3ForConditionalGeneration
    # does not read the cap; Gemma 3's releases set none)
    return gemma3.parse_config({**filled, "tie_word_embeddings": tied, "final_logit_softcapping": None})


def fit_to_keys(cfg: Gemma2Config, keys: set[str]) -> Gemma2Config:
    for prefix in PREFIXES:
        if f"{prefix}embed_tokens.weight" in keys:
            head = next((k for k in LM_HEADS if k in keys), LM_HEADS[0])
            return replace(cfg, prefix=prefix, lm_head_key=head)
    raise CheckpointError(f"the checkpoint has no language model tensors ({' or '.join(p + 'embed_tokens.weight' for p in PREFIXES)})")


FAMILY = replace(
    gemma3.FAMILY,
    name="gemma3",
    parse_config=parse_config,
    fit_to_keys=fit_to_keys,
    # peft's module path of a block in transformers' Gemma3ForConditionalGeneration
    adapter_prefix=lambda cfg, i: f"model.language_model.layers.{i}.",
    adapter_ignored=("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector."),
)
