"""The client's side of a model: where its checkpoint is, its tokenizer, its head, its stop tokens.

``--model`` names a checkpoint in one of three ways: the default model's name (fetched and
converted once, see :mod:`swarm.engine.default_model`), a local checkpoint directory, or a Hugging
Face Hub repo id (downloaded with ``huggingface_hub`` where there is Internet; on an offline
machine this fails fast with a message that says what to do instead).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Container
from dataclasses import dataclass
from pathlib import Path

import torch

from swarm.engine import default_model
from swarm.engine.adapter_io import Adapter
from swarm.engine.adapters import attach
from swarm.engine.checkpoint import CPU, BlockRange, Checkpoint, fix_hint, read_json
from swarm.engine.families import CheckpointError
from swarm.engine.generation import GenerationConfig, LocalSession, OpenSession, generate

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model", "*.txt"]
# the files a tokenizer is built from: a fast tokenizer, a sentencepiece model, or a BPE vocabulary
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class ModelNotAvailableError(RuntimeError):
    """``--model`` names nothing this machine can load."""


def resolve_model(spec: str | None, quiet: bool = False) -> Path:
    """The checkpoint directory for ``--model`` (default: the default model)."""
    spec = spec or default_model.DEFAULT_MODEL
    if spec in default_model.ALIASES:
        return default_model.ensure_default_model(quiet=quiet)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if spec.startswith((".", "/", "~")) or path.exists() or spec.count("/") != 1:
        raise ModelNotAvailableError(
            f"--model {spec}: no such checkpoint directory (give a directory with config.json and "
            f"safetensors weights, a Hugging Face repo id like org/name, or {default_model.DEFAULT_MODEL})"
        )
    return _from_hub(spec)


def _from_hub(repo_id: str) -> Path:
    import huggingface_hub

    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated repo: all end the same way for the user
        raise ModelNotAvailableError(
            f"--model {repo_id}: could not fetch it from the Hugging Face Hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}). If this machine is offline, download "
            f"the checkpoint elsewhere and pass its directory with --model DIR, or use the default model "
            f"({default_model.DEFAULT_MODEL})"
        ) from exc


@dataclass
class ClientModel:
    """What a client holds: the tokenizer and the head (embeddings, final norm, LM head)."""

    path: Path
    checkpoint: Checkpoint
    tokenizer: object
    head: torch.nn.Module
    eos_token_ids: tuple[int, ...]

    @classmethod
    def load(cls, path: Path, dtype: torch.dtype = torch.float32, device: torch.device = CPU) -> ClientModel:
        """The head computes on ``device`` (token ids, hidden states and logits stay on the CPU).
        Raises :class:`CheckpointError` naming the file or directory when the checkpoint or its
        tokenizer files are missing or damaged."""
        checkpoint = Checkpoint(path)
        tokenizer = _load_tokenizer(path)
        return cls(path, checkpoint, tokenizer, checkpoint.load_head(dtype, device=device), _eos_ids(path, tokenizer))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        """Token ids of ``prompt``; with ``chat``, wrapped as one user turn by the chat template."""
        if chat:
            if not self.has_chat_template:
                raise ValueError(f"--chat: the model at {self.path} has no chat template; drop --chat")
            return self.encode_chat([{"role": "user", "content": prompt}])
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation (``[{"role": ..., "content": ...}]``) by the model's chat
        template, ending where the assistant's answer starts. Raises ``ValueError`` when the model
        has no chat template, and whatever the template raises for a conversation it refuses
        (jinja2's ``TemplateError``: roles out of order, say)."""
        if not self.has_chat_template:
            raise ValueError(f"the model at {self.path} has no chat template")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging

    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{path} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}, with tokenizer_config.json): "
            f"copy them from the model's original release into that directory, or {fix_hint(path)}"
        )
    logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (ValueError, OSError) as exc:  # transformers' word for unreadable or inconsistent files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"the tokenizer files in {path} could not be loaded ({first_line}): {fix_hint(path)}"
        ) from None
    processor = path / "chat_template.json"  # a multimodal model's processor may hold the only template
    if not getattr(tokenizer, "chat_template", None) and processor.is_file():
        template = read_json(processor).get("chat_template")
        if isinstance(template, str) and template:
            tokenizer.chat_template = template
    return tokenizer


def _eos_ids(path: Path, tokenizer) -> tuple[int, ...]:
    """Stop tokens: generation_config.json's eos_token_id, else config.json's, else the tokenizer's."""
    for name in ("generation_config.json", "config.json"):
        file = path / name
        if file.is_file():
            raw = read_json(file)
            value = raw.get("eos_token_id")
            if value is None and isinstance(raw.get("text_config"), dict):  # a multimodal model's language model
                value = raw["text_config"].get("eos_token_id")
            if value is not None:
                return tuple(value) if isinstance(value, list) else (value,)
    return () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)


class TextStream:
    """Turns tokens into text deltas as they come, holding back incomplete UTF-8 sequences."""

    def __init__(self, client: ClientModel, write: Callable[[str], None]):
        self.client, self.write = client, write
        self.tokens: list[int] = []
        self.printed = 0

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        text = self.client.decode(self.tokens)
        if text.endswith("\ufffd"):
            return
        self.write(text[self.printed :])
        self.printed = len(text)

    def rewind(self, kept: int) -> str:
        """Forget the tokens from ``kept`` on (they were replaced); returns the text of the
        tokens kept, which the caller shows again (what was written cannot be taken back), and
        counts it as printed."""
        del self.tokens[kept:]
        text = self.client.decode(self.tokens)
        if text.endswith("\ufffd"):
            text = text[: len(text.rstrip("\ufffd"))]
        self.printed = len(text)
        return text


def generate_local(
    client: ClientModel,
    prompt_ids: list[int],
    cfg: GenerationConfig,
    dtype: torch.dtype = torch.float32,
    on_token: Callable[[int], None] | None = None,
    adapter: Adapter | None = None,
    quant: str = "none",
    quantized: Container[int] | None = None,
    devices: tuple[torch.device, ...] = (CPU,),
) -> list[int]:
    """Generate with every block held in this process (the reference the swarm must equal), with
    ``adapter`` (from :func:`~swarm.engine.adapter_io.load_adapter`) applied if given: its LoRA and
    deep-prompt tensors on the blocks, its shallow prompt before the prompt's embeddings. With
    ``quant``, the blocks in ``quantized`` (all when None) have quantized linears, as a swarm's
    servers with ``--quant`` would. ``devices``: where the blocks compute (split over several)."""
    blocks = client.checkpoint.load_blocks(0, client.checkpoint.num_blocks, dtype, quant=quant, quantized=quantized,
                                           devices=devices)
    prefix = adapter.prompt if adapter is not None else None
    return generate(client.head, local_sessions(blocks, adapter), prompt_ids, cfg, on_token, prefix=prefix)


def local_sessions(blocks: BlockRange, adapter: Adapter | None = None) -> OpenSession:
    """``open_session`` for :func:`~swarm.engine.generation.generate` over blocks held here, with
    ``adapter``'s LoRA and deep-prompt tensors applied (its shallow prompt is the caller's prefix)."""
    tensors = spec = None
    if adapter is not None and adapter.tensors:
        tensors, spec = adapter.tensors, adapter.spec
        attach(blocks)

    def open_session(batch: int, max_length: int) -> LocalSession:
        return LocalSession(blocks, batch, max_length, tensors, spec)

    return open_session
