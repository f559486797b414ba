"""A draft model for speculative decoding: a small checkpoint with the target's tokenizer, held
whole by the client (``swarm generate --draft PATH``).

It drafts greedily with its own KV cache, which follows the text: at each proposal the cache is
cut back to where it agrees with the tokens so far (the target's picks replace rejected drafts),
the tokens it has not seen are fed as one step, and ``k`` tokens are decoded one by one. Its time
per drafted token is measured, so the draft length weighs it (see
:func:`~swarm.engine.speculative.best_draft_length`). Which drafts make sense: a model of the same
family and tokenizer, several times smaller (a 1B model for a 70B swarm model); for the default
model, its own copy (bfloat16, or ``--draft-quant int8``/``nf4``) drafts well, as it agrees with the
swarm nearly always.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from swarm.engine.checkpoint import Checkpoint, CheckpointError
from swarm.engine.generation import LocalSession

DRAFT_CONTEXT = 4096  # positions the draft's cache holds at most (a longer text restarts it from its tail)
FEED_TIMED = 4  # new tokens fed at most for a proposal's time to count the feeding (more: a prefill)


def _vocabulary(path: Path) -> dict | None:
    """The tokenizer's vocabulary as tokenizer.json holds it (model type and token → id), or None."""
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        model = json.loads(file.read_text()).get("model", {})
    except (OSError, ValueError):
        return None
    return {"type": model.get("type"), "vocab": model.get("vocab"), "merges": model.get("merges")}


def check_same_tokenizer(target: Path, draft: Path) -> None:
    """``ValueError`` naming both directories unless ``draft`` tokenizes as ``target`` does (the
    same vocabulary and merges in tokenizer.json)."""
    mine, theirs = _vocabulary(draft), _vocabulary(target)
    if mine is None or theirs is None:
        missing = draft if mine is None else target
        raise ValueError(f"--draft: {missing} has no readable tokenizer.json to compare tokenizers with")
    if mine != theirs:
        raise ValueError(f"--draft: the model at {draft} has another tokenizer than {target}; "
                         "a draft model must share the target's tokenizer")


class ModelDrafter:
    """Greedy drafts from a small model held here (see the module's docstring)."""

    name = "model"
    costly = True  # worth drafting ahead while a verification is in flight (see DraftAhead)

    def __init__(self, path: Path, dtype: torch.dtype = torch.bfloat16, quant: str = "none"):
        self.path = Path(path)
        checkpoint = Checkpoint(self.path)
        self.head = checkpoint.load_head(torch.float32)
        self.blocks = checkpoint.load_blocks(0, checkpoint.num_blocks, dtype, quant=quant)
        self.max_positions = min(DRAFT_CONTEXT, self.head.max_positions or DRAFT_CONTEXT)
        self.session: LocalSession | None = None
        self.seen: list[int] = []  # the tokens in the draft's cache (of the text from offset on)
        self.offset = 0  # where in the text the draft's window starts
        self.draft_time = 0.0  # seconds per drafted token, measured (moving average)

    @classmethod
    def load(cls, path: str | Path, target: Path, dtype: torch.dtype = torch.bfloat16, quant: str = "none") -> ModelDrafter:
        """The draft model at ``path`` for the target model at ``target``. ``ValueError`` (a
        one-line message naming the directory) when it is missing, not a checkpoint, or tokenizes
        differently."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise ValueError(f"--draft: {path} is not a directory (give auto, ngram, none or a draft model's directory)")
        check_same_tokenizer(Path(target), path)
        try:
            return cls(path, dtype, quant)
        except CheckpointError as exc:
            raise ValueError(f"--draft: {exc}") from None

    def propose(self, tokens: Sequence[int], k: int, until: Callable[[], bool] | None = None) -> list[int]:
        if k <= 0:
            return []
        began = time.monotonic()
        tokens = list(tokens)
        if len(tokens) - self.offset + k > self.max_positions:  # a window over the text's tail, moved rarely
            self.offset = max(0, len(tokens) - self.max_positions // 2)
            self._restart()
        tokens = tokens[self.offset :]
        same = 0
        for a, b in zip(self.seen, tokens):
            if a != b:
                break
            same += 1
        same = min(same, len(tokens) - 1)  # at least the last token is fed: its output is the first draft
        if self.session is None:
            self._restart()
        self.session.rewind(same)
        self.seen = tokens[:same]
        threads = torch.get_num_threads()
        if until is None:
            return self._draft(tokens, same, k, None, began)
        # beside a step in flight (drafting ahead): half the cores, the rest left to servers that
        # may share this machine; its time is not what a drafted token costs the next step
        torch.set_num_threads(max(1, threads // 2))
        try:
            return self._draft(tokens, same, k, until, None)
        finally:
            torch.set_num_threads(threads)

    def _draft(self, tokens: list[int], same: int, k: int, until: Callable[[], bool] | None,
               began: float | None) -> list[int]:
        """Feed ``tokens[same:]`` and decode up to ``k`` drafts (fewer once ``until()``); with
        ``began``, the time per drafted token since then updates :attr:`draft_time`."""
        out = []
        with torch.no_grad():
            hidden = self.session.step(self.head.embed(torch.tensor([tokens[same:]])))
            self.seen = list(tokens)
            if began is not None and len(tokens) - same > FEED_TIMED:  # a prefill: not a drafted token's cost
                began = time.monotonic()
            for i in range(k):
                token = int(self.head.logits(hidden[:, -1]).argmax(dim=-1)[0])
                out.append(token)
                if i + 1 < k and not (until is not None and until()):
                    hidden = self.session.step(self.head.embed(torch.tensor([[token]])))
                    self.seen.append(token)
                else:
                    break
        if began is not None:
            per_token = (time.monotonic() - began) / len(out)
            self.draft_time = per_token if not self.draft_time else 0.8 * self.draft_time + 0.2 * per_token
        return out

    def _restart(self) -> None:
        if self.session is not None:
            self.session.close()
        self.session = LocalSession(self.blocks, 1, self.max_positions)
        self.seen = []

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
