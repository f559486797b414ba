"""The model's context limit, and a check of it cheap enough to run before anything heavy loads.

A prompt longer than the context must be refused at once, with nothing sent anywhere. The full
check (:func:`check_prompt_length`) runs on the real token ids; :func:`quick_prompt_check` runs
first, on the checkpoint's ``tokenizer.json`` and ``config.json`` alone (the ``tokenizers``
library, no torch or transformers: about 0.1 s), so an oversized prompt is refused before the
model, its tokenizer wrapper or the network start. Its count is a lower bound of the real one
(a chat template only adds tokens), so it never refuses a prompt that fits.
"""

from __future__ import annotations

import json
from pathlib import Path


def check_prompt_length(num_tokens: int, max_positions: int | None, virtual_tokens: int = 0) -> None:
    """Raise ``ValueError`` unless a prompt of ``num_tokens`` (after a prompt adapter's
    ``virtual_tokens``) leaves room for a new token in a context of ``max_positions`` (None: no
    fixed limit)."""
    if max_positions is not None and virtual_tokens + num_tokens >= max_positions:
        adapter = f" after the adapter's {virtual_tokens} virtual tokens" if virtual_tokens else ""
        raise ValueError(
            f"the prompt is {num_tokens} tokens{adapter}, but this model's context holds {max_positions} "
            f"(prompt and new tokens together): shorten the prompt to at most "
            f"{max(0, max_positions - 1 - virtual_tokens)} tokens"
        )


def quick_prompt_check(model_dir: Path, prompt: str) -> None:
    """``ValueError`` (as :func:`check_prompt_length`) if ``prompt`` alone exceeds the context of the
    checkpoint at ``model_dir``. Does nothing when the directory lacks a readable ``config.json``
    with ``max_position_embeddings`` or a ``tokenizer.json``: the full check runs later anyway."""
    try:
        limit = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")
        # byte-level tokenizers give at most one token per byte (plus a few special ones): skip short prompts
        if not isinstance(limit, int) or len(prompt.encode()) + 16 < limit:
            return
        from tokenizers import Tokenizer

        count = len(Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")).encode(prompt).ids)
    except Exception:  # an unreadable file, a tokenizer this library cannot load: the full check decides
        return
    check_prompt_length(count, limit)
