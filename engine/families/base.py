"""What a model family provides to the engine: config parsing, its block, its client head."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from swarm.engine.layers import StepContext


class CheckpointError(ValueError):
    """A checkpoint is missing a file or tensor the engine needs, or holds an unexpected one."""


def frozen_linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free ``nn.Linear`` around an existing ``[out, in]`` weight (e.g. a tied LM head)."""
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def check_keys(wanted: Iterable[str], available: set[str]) -> None:
    missing = [k for k in wanted if k not in available]
    if missing:
        raise CheckpointError(f"the checkpoint has no tensor(s) {', '.join(missing)}")


@dataclass(frozen=True)
class Family:
    """A model family, written against its checkpoint format.

    - ``parse_config(config.json dict) -> cfg``; ``cfg.num_layers``, ``cfg.hidden_size``, ``cfg.vocab_size``,
      ``cfg.max_positions`` (the context length: prompt and generated tokens together; None for no
      fixed limit).
    - ``block(cfg, index) -> nn.Module`` whose ``state_dict`` names equal the checkpoint's names
      after ``block_prefix(cfg, index)``; ``forward(hidden, ctx, kv) -> hidden``.
    - ``head(cfg, tensors) -> nn.Module`` with ``embed(ids, prefix=None)`` (``prefix``: prompt-tuning
      embeddings put before the tokens, where peft puts them), ``token_embeddings(ids)`` (the
      embedding table's rows, before any norm), ``logits(hidden)`` and
      ``max_positions`` (the config's), built from the tensors named by ``head_keys(cfg, available_keys)``.
    - ``prepare_step(cfg, ctx, dtype, batch)`` fills ``ctx.extra`` once per step for all blocks.
    - ``kv_heads(cfg) -> (num_kv_heads, head_dim)`` sizes the KV cache of one block.
    - ``fit_to_keys(cfg, available_keys) -> cfg`` adapts the config to the checkpoint's naming.
    - ``lora_default``, ``adapter_prefix(cfg, index)``: what adapters (see :mod:`swarm.engine.adapters`)
      need to know: peft's default LoRA targets and the module path of a block in transformers' model.
    """

    name: str
    parse_config: Callable[[dict], Any]
    block: Callable[[Any, int], nn.Module]
    block_prefix: Callable[[Any, int], str]
    head: Callable[[Any, dict[str, torch.Tensor]], nn.Module]
    head_keys: Callable[[Any, set[str]], list[str]]
    prepare_step: Callable[[Any, StepContext, torch.dtype, int], None]
    kv_heads: Callable[[Any], tuple[int, int]]
    # adjust the parsed config to the checkpoint's key names (e.g. BLOOM's optional "transformer." prefix)
    fit_to_keys: Callable[[Any, set[str]], Any] = lambda cfg, keys: cfg
    # LoRA: the linears peft targets by default for this family, and the name transformers'
    # *ForCausalLM gives block ``i`` (the prefix of an adapter's keys; None: ``block_prefix``)
    lora_default: tuple[str, ...] = ("q_proj", "v_proj")
    adapter_prefix: Callable[[Any, int], str] | None = None
    # module paths in transformers' model of parts swarm never runs (a vision tower): a peft
    # adapter's tensors there are left out, which changes no output swarm computes
    adapter_ignored: tuple[str, ...] = ()
