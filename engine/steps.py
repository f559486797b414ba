"""A step of an inference session on a server's blocks: the engine's side of it, no networking.

A client steps a session position by position; the server keeps the session's KV cache and its
last step, so that a step sent twice (the client's copy after a pushed one, or after a failover
upstream) is answered from the last step when its input is the same, or recomputed after
rewinding the cache when it is not; a replacement server rebuilding a failed one's cache replays
the history in ``chunks``, the steps as they were first computed, so its cache and outputs are
exactly the failed server's. The wire side (frames, pushes, the session's lifetime) is
:mod:`swarm.p2p.sessions`.
"""

from __future__ import annotations

import torch

from swarm.engine.adapters import AdapterSpec, applied
from swarm.engine.checkpoint import BlockRange


def check_hidden(blocks: BlockRange, hidden: torch.Tensor) -> None:
    """``ValueError`` unless ``hidden`` is floating point [batch, seq, hidden_size] for ``blocks``."""
    if not hidden.is_floating_point() or hidden.dim() != 3 or hidden.shape[-1] != blocks.config.hidden_size:
        raise ValueError(
            f"hidden states must be floating point [batch, seq, {blocks.config.hidden_size}], "
            f"got {hidden.dtype} {list(hidden.shape)}"
        )


def check_chunks(chunks, hidden: torch.Tensor) -> list[int]:
    """A step may carry ``chunks``: the lengths of the steps it replays (a replacement server
    rebuilding a failed one's cache runs the client's history step by step, exactly as it was
    first computed). Without it the step is one chunk."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden states must be [batch, seq, hidden], got shape {list(hidden.shape)}")
    if chunks is None:
        return [hidden.shape[1]]
    if not (isinstance(chunks, list) and chunks and all(isinstance(c, int) and c > 0 for c in chunks)):
        raise ValueError("chunks must be a non-empty list of positive step lengths")
    if sum(chunks) != hidden.shape[1]:
        raise ValueError(f"chunks add up to {sum(chunks)} positions but the step carries {list(hidden.shape)}")
    return chunks


def run_step(blocks: BlockRange, hidden, kv, hypo_ids, chunks: list[int], last_input, last_output, rewind_to,
              reordered: bool, should_stop, adapter=None, spec: AdapterSpec | None = None,
              cut_to: int | None = None) -> tuple[torch.Tensor, bool]:
    """On the compute thread: a step (or a replay split into ``chunks``), or the answer to a repeat
    of the last step (``rewind_to`` set): the same input gets the same output without computing,
    another input rewinds the cache to ``rewind_to`` and is computed anew. ``cut_to``: the cache
    is cut back to that many positions first (the client dropped drafted tokens). The session's
    ``adapter`` (checked when it opened) is lent to the blocks for the step. Returns the outputs
    of every position and whether they were computed now."""
    if cut_to is not None:
        kv.rewind(cut_to)
    if rewind_to is not None:
        if last_input is not None and torch.equal(hidden, last_input):
            return last_output, False
        if reordered:  # the rows were reordered for the other input: they cannot be put back
            raise ValueError("this step was already run with other inputs and reordered the cache; reopen the session")
        kv.rewind(rewind_to)
    if hypo_ids is not None:
        batch = hidden.shape[0]
        if hypo_ids.dtype != torch.int64 or hypo_ids.shape != (batch,):
            raise ValueError(f"hypo_ids must be int64 of shape [{batch}], got {hypo_ids.dtype} {list(hypo_ids.shape)}")
        if len(hypo_ids) and not (0 <= int(hypo_ids.min()) and int(hypo_ids.max()) < batch):
            raise ValueError(f"hypo_ids must index rows 0..{batch - 1}")
    kv.check_room(hidden.shape[1])
    outputs, start = [], 0
    with torch.no_grad(), applied(blocks, adapter, spec):
        for i, length in enumerate(chunks):
            part = hidden[:, start : start + length]
            outputs.append(blocks(part, kv, hypo_ids if i == 0 else None, should_stop=should_stop))
            start += length
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)), True
