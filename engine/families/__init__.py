"""The registry of model families: ``config.json``'s ``model_type`` → the family's module."""

from __future__ import annotations

import importlib

from swarm.engine.families.base import CheckpointError, Family

# model_type -> module under swarm.engine.families
REGISTRY: dict[str, str] = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3_multimodal",
    "mixtral": "mixtral",
    "qwen3_moe": "qwen3_moe",
    "bloom": "bloom",
    "falcon": "falcon",
}


class UnsupportedModelError(ValueError):
    pass


def get_family(model_type: str) -> Family:
    """The family for ``model_type``; an unknown type raises with the list of supported ones."""
    module = REGISTRY.get(model_type)
    if module is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported model types: {', '.join(sorted(REGISTRY))}"
        )
    return importlib.import_module(f"swarm.engine.families.{module}").FAMILY


__all__ = ["CheckpointError", "Family", "REGISTRY", "UnsupportedModelError", "get_family"]
