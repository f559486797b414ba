"""Adapters on disk: peft's formats for LoRA and prompt tuning, our own for deep prompts.

- LoRA: a peft directory (``adapter_config.json`` with ``peft_type: LORA``, and
  ``adapter_model.safetensors`` with peft's key names such as
  ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), which
  ``peft.PeftModel.from_pretrained`` loads on the transformers model of the same checkpoint; any
  such directory made by peft loads here too.
- Prompt tuning: peft's ``PROMPT_TUNING`` (one tensor ``prompt_embeddings [num_virtual, hidden]``).
- Deep prompts (peft has no equivalent): ``adapter_config.json`` with ``peft_type:
  SWARM_DEEP_PROMPT``, ``num_virtual_tokens``, ``token_dim``, ``num_layers``,
  ``base_model_name_or_path``; and ``adapter_model.safetensors`` with ``prompt_embeddings
  [num_virtual, hidden]`` (prepended to the embeddings) and ``deep_prompts [num_layers,
  num_virtual, hidden]`` (added to the first positions of each block's input).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from swarm.engine.adapters import PROMPT_KEY, AdapterSpec, block_linears
from swarm.engine.checkpoint import Checkpoint

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
DEEP_PROMPT = "SWARM_DEEP_PROMPT"


class AdapterError(ValueError):
    """An adapter directory that cannot be used with this model; the message names the file."""


@dataclass
class Adapter:
    """An adapter in the engine's naming (see :mod:`swarm.engine.adapters`).

    ``kind``: ``lora``, ``prompt`` or ``deep-prompt``. ``tensors``: what servers apply (LoRA and
    deep prompts, keyed by block); ``prompt``: the shallow prompt the client prepends, or None."""

    kind: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    prompt: torch.Tensor | None = None
    spec: AdapterSpec = field(default_factory=AdapterSpec)
    config: dict = field(default_factory=dict)

    @property
    def num_virtual_tokens(self) -> int:
        return 0 if self.prompt is None else self.prompt.shape[0]


def lora_scale(rank: int, alpha: float, rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _peft_key(checkpoint: Checkpoint, index: int, path: str, which: str) -> str:
    family = checkpoint.family
    prefix = (family.adapter_prefix or family.block_prefix)(checkpoint.config, index)
    return f"base_model.model.{prefix}{path}.lora_{which}.weight"


def save_lora(
    directory: Path,
    checkpoint: Checkpoint,
    tensors: dict[str, torch.Tensor],
    *,
    rank: int,
    alpha: float,
    dropout: float,
    targets: list[str],
    base_model: str,
) -> None:
    """Write ``tensors`` (engine naming) as a peft LoRA directory."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, value in tensors.items():
        index, rest = key.split(".", 1)
        path, which = rest.rsplit(".lora_", 1)
        out[_peft_key(checkpoint, int(index), path, which)] = value.detach().float().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted({t.rsplit(".", 1)[-1] for t in targets}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "modules_to_save": None,
    }
    save_file(out, directory / WEIGHTS, metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def save_prompt(directory: Path, checkpoint: Checkpoint, prompt: torch.Tensor, base_model: str) -> None:
    """Write a shallow prompt as peft's PROMPT_TUNING directory."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = checkpoint.config
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": prompt.shape[0],
        "token_dim": cfg.hidden_size,
        "num_transformer_submodules": 1,
        "num_attention_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "prompt_tuning_init": "RANDOM",
        "base_model_name_or_path": base_model,
        "inference_mode": True,
    }
    save_file({PROMPT_KEY: prompt.detach().float().contiguous()}, directory / WEIGHTS, metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def save_deep_prompt(
    directory: Path, checkpoint: Checkpoint, prompt: torch.Tensor, tensors: dict[str, torch.Tensor], base_model: str
) -> None:
    """Write a deep prompt in our format (see the module's docstring)."""
    directory.mkdir(parents=True, exist_ok=True)
    layers = checkpoint.num_blocks
    deep = torch.stack([tensors[f"{i}.prompt"].detach().float() for i in range(layers)])
    config = {
        "peft_type": DEEP_PROMPT,
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": prompt.shape[0],
        "token_dim": checkpoint.config.hidden_size,
        "num_layers": layers,
        "base_model_name_or_path": base_model,
    }
    save_file(
        {PROMPT_KEY: prompt.detach().float().contiguous(), "deep_prompts": deep.contiguous()},
        directory / WEIGHTS,
        metadata={"format": "pt"},
    )
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_adapter(directory: str | Path, checkpoint: Checkpoint) -> Adapter:
    """Read an adapter directory for ``checkpoint``'s model. Raises :class:`AdapterError` naming
    the file when it is missing, damaged, of a kind we do not run, or made for another model."""
    directory = Path(directory)
    config_file, weights_file = directory / CONFIG, directory / WEIGHTS
    if not config_file.is_file():
        raise AdapterError(f"--adapter {directory}: no {CONFIG} there; give a directory saved by swarm finetune or peft")
    try:
        config = json.loads(config_file.read_text())
        assert isinstance(config, dict)
    except (ValueError, OSError, AssertionError):
        raise AdapterError(f"{config_file} is not a JSON object; re-save the adapter") from None
    if not weights_file.is_file():
        raise AdapterError(f"--adapter {directory}: no {WEIGHTS} there (only safetensors adapters are supported)")
    try:
        weights = load_file(weights_file)
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{weights_file} is damaged or not safetensors ({exc}); re-save the adapter") from None
    kind = config.get("peft_type")
    hidden = checkpoint.config.hidden_size
    if kind == "LORA":
        return _load_lora(config_file, config, weights, checkpoint)
    if kind in ("PROMPT_TUNING", DEEP_PROMPT):
        prompt = weights.get(PROMPT_KEY)
        if prompt is None or prompt.dim() != 2 or prompt.shape[1] != hidden:
            raise AdapterError(f"{weights_file}: needs {PROMPT_KEY} of shape [num_virtual_tokens, {hidden}]")
        if kind == "PROMPT_TUNING":
            return Adapter("prompt", {}, prompt.float(), config=config)
        deep = weights.get("deep_prompts")
        want = [checkpoint.num_blocks, prompt.shape[0], hidden]
        if deep is None or list(deep.shape) != want:
            raise AdapterError(f"{weights_file}: needs deep_prompts of shape {want} for this model")
        tensors = {f"{i}.prompt": deep[i].float() for i in range(checkpoint.num_blocks)}
        return Adapter("deep-prompt", tensors, prompt.float(), config=config)
    raise AdapterError(
        f"{config_file}: peft_type {kind!r} is not supported; supported: LORA, PROMPT_TUNING, {DEEP_PROMPT}"
    )


def _load_lora(config_file: Path, config: dict, weights: dict, checkpoint: Checkpoint) -> Adapter:
    for flag, fine in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if config.get(flag, fine) != fine:
            raise AdapterError(f"{config_file}: {flag}={config[flag]!r} is not supported (only {flag}={fine!r})")
    if config.get("target_parameters"):  # peft's LoRA of parameters (fused MoE experts: its all-linear there)
        raise AdapterError(
            f"{config_file}: LoRA on parameters (target_parameters {', '.join(config['target_parameters'])}, as peft "
            "makes for a mixture of experts' fused weights) is not supported, only on linear modules: give peft "
            "target_modules naming linears, or train with swarm finetune --target-modules (all-linear there takes "
            "the router and each expert's linears)"
        )
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterError(f"{config_file}: per-layer rank_pattern/alpha_pattern are not supported")
    try:
        rank, alpha = int(config["r"]), float(config.get("lora_alpha", 8))
        assert rank >= 1 and math.isfinite(alpha)
    except (KeyError, TypeError, ValueError, AssertionError):
        raise AdapterError(f"{config_file}: needs an integer r ≥ 1 and a finite lora_alpha") from None
    family, cfg = checkpoint.family, checkpoint.config
    prefixes = {(family.adapter_prefix or family.block_prefix)(cfg, i): i for i in range(checkpoint.num_blocks)}
    prefixes.update({family.block_prefix(cfg, i): i for i in range(checkpoint.num_blocks)})
    pattern = re.compile(r"^base_model\.model\.(.+?)((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
    tensors, shapes = {}, {}
    ignored = tuple(f"base_model.model.{p}" for p in family.adapter_ignored)
    for key, value in weights.items():
        if ignored and key.startswith(ignored):
            continue
        index = path = which = None
        match = pattern.match(key)
        if match:
            for prefix, i in prefixes.items():
                rest = key[len("base_model.model.") :]
                if rest.startswith(prefix):
                    index, tail = i, rest[len(prefix) :]
                    path, which = tail.split(".lora_")[0], match.group(3)
                    break
        if index is None:
            raise AdapterError(f"{config_file.parent / WEIGHTS}: tensor {key!r} is not a LoRA weight of this model's blocks")
        if index not in shapes:
            shapes[index] = block_linears(checkpoint, index)
        if path not in shapes[index]:
            raise AdapterError(f"{config_file.parent / WEIGHTS}: {key!r}: block {index} has no linear {path!r}")
        out_features, in_features = shapes[index][path]
        want = [rank, in_features] if which == "A" else [out_features, rank]
        if list(value.shape) != want:
            raise AdapterError(f"{config_file.parent / WEIGHTS}: {key!r} has shape {list(value.shape)}, not {want}")
        tensors[f"{index}.{path}.lora_{which}"] = value.float()
    stems = {k.rsplit(".lora_", 1)[0] for k in tensors}
    unpaired = [s for s in stems if f"{s}.lora_A" not in tensors or f"{s}.lora_B" not in tensors]
    if unpaired or not tensors:
        raise AdapterError(f"{config_file.parent / WEIGHTS}: no LoRA weights, or lora_A without lora_B ({unpaired[:3]})")
    spec = AdapterSpec(scale=lora_scale(rank, alpha, bool(config.get("use_rslora"))))
    return Adapter("lora", tensors, None, spec, config)
