"""What a fine-tuning run keeps on disk besides its final adapter: the checkpoint it resumes from,
``metrics.jsonl``, and the best adapter so far by eval loss (``OUTPUT/best``).

Every write is atomic, so an interrupt at any moment leaves something whole: the checkpoint is a
file replaced by a rename; the best adapter is a directory written beside its place and renamed
into it (:func:`replace_dir`). The checkpoint records the best eval loss and its step, so a
resumed run keeps the best exactly as an uninterrupted one: a best saved after the last
checkpoint is found again when the resumed run redoes those steps.

Checkpoint versions: 2 records the best so far (``"best"``: ``{"step", "eval_loss"}`` or None);
1 (before best-keeping) still resumes, keeping the best from the resumed step on.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

CHECKPOINT = "checkpoint/state.pt"
METRICS = "metrics.jsonl"
BEST = "best"
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def _step_of(line: str) -> float:
    """The step of one metrics line; a blank, torn (the run was killed mid-write) or foreign line
    is dropped when a resumed run rewrites the file."""
    try:
        record = json.loads(line)
        step = record.get("step", 0) if isinstance(record, dict) else None
    except ValueError:
        step = None
    return step if isinstance(step, (int, float)) else float("inf")


class Metrics:
    """``metrics.jsonl``: one JSON object per line, flushed as written. ``keep_until``: a resumed
    run's step (the lines of later steps, which it redoes, are dropped); None: a new file."""

    def __init__(self, path: Path, keep_until: int | None):
        self.path = path
        if keep_until is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= keep_until]
            path.write_text("".join(line + "\n" for line in kept))
        elif keep_until is None:
            path.write_text("")
        self.file = open(path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (a reader sees the old file or the new one, never a
    part: an interrupt while saving loses only this save)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({**state, "version": CHECKPOINT_VERSION}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """The state saved at ``path``, in the current version's form (an older version upgraded:
    ``"version"`` still says which it was). ``ValueError`` naming it when missing or unreadable."""
    if not path.is_file():
        raise ValueError(f"--resume: no checkpoint at {path}; start without --resume")
    try:
        state = torch.load(path, weights_only=True)
        readable = isinstance(state, dict) and state.get("version") in READABLE_VERSIONS
    except Exception:  # a damaged or foreign file: all end the same way for the user
        readable = False
    if not readable:
        raise ValueError(f"--resume: {path} is damaged or not a swarm finetune checkpoint; start a new --output")
    state.setdefault("best", None)  # version 1 kept no best
    return state


def _shown(value) -> str:
    return "not given" if value is None else str(value)


def check_resume(saved: dict, current: dict, path: Path) -> None:
    """``ValueError`` naming the first flag (or the model, or the data) whose value in ``current``
    differs from the run ``saved`` at ``path``."""
    for key, value in current.items():
        if saved.get(key) != value:
            if key in ("model", "data"):
                what = "--model" if key == "model" else "the training data"
                raise ValueError(f"--resume: {what} differs from the run saved in {path}; resume with the same one")
            raise ValueError(
                f"--resume: --{key.replace('_', '-')} is {_shown(value)} but the run saved in {path} used "
                f"{_shown(saved.get(key))}; resume with the same flags or start a new --output"
            )


@dataclass
class Best:
    """The lowest eval loss seen so far and the step that gave it (None before any eval)."""

    step: int | None = None
    eval_loss: float | None = None

    @classmethod
    def from_state(cls, saved: dict | None) -> Best:
        return cls() if saved is None else cls(int(saved["step"]), float(saved["eval_loss"]))

    def state(self) -> dict | None:
        """What the checkpoint records (None before any eval)."""
        return None if self.step is None else {"step": self.step, "eval_loss": self.eval_loss}

    def improves(self, eval_loss: float) -> bool:
        """Whether ``eval_loss`` is lower than every one before (a tie keeps the earlier step)."""
        return self.eval_loss is None or eval_loss < self.eval_loss


def replace_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Put at ``target`` a directory written by ``write(directory)``: it writes into ``TARGET.tmp``,
    which replaces ``target`` by two renames (the old one to ``TARGET.old``, the new one into place).
    An interrupt leaves ``target`` whole, old or new; only between the two renames is it at
    ``TARGET.old``, where :func:`restore_dir` finds it."""
    tmp, old = _beside(target, "tmp"), _beside(target, "old")
    restore_dir(target)
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def restore_dir(target: Path) -> None:
    """Undo what an interrupted :func:`replace_dir` left: ``TARGET.old`` back in place when
    ``target`` is missing, removed when ``target`` is whole."""
    old = _beside(target, "old")
    if old.exists():
        if target.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, target)


def _beside(target: Path, suffix: str) -> Path:
    return target.with_name(f"{target.name}.{suffix}")
