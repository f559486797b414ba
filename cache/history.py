"""The client's half of the dual cache: what it sent to each server, to rebuild a lost KV cache.

For every span of blocks in a chain the client keeps the hidden states it sent that span, in
global token order, and the length of every step. When the span's server fails, a replacement
receives the whole history in one frame with those step lengths and runs it step by step, so its
cache ends up exactly as the failed server's was (same shapes per step, hence the same numbers),
and generation continues as if nothing had happened.

Beam search reorders a session's cache rows by hypothesis before a step; the history is reordered
the same way, so row ``r`` of the history is always the input sequence of the hypothesis now in
row ``r``. Batch rows are computed independently, so replaying the reordered history gives the
reordered cache.
"""

from __future__ import annotations

import torch


class SpanHistory:
    """Inputs sent to one span: ``inputs: [batch, positions, hidden]`` and the step lengths."""

    def __init__(self) -> None:
        self.inputs: torch.Tensor | None = None
        self.step_lengths: list[int] = []

    @property
    def length(self) -> int:
        return sum(self.step_lengths)

    def record(self, hidden: torch.Tensor, hypo_ids: torch.Tensor | None = None, per_position: bool = False) -> None:
        """Add a step's input ``hidden: [batch, seq, hidden]`` (after reordering past rows by
        ``hypo_ids`` when the step carried them); ``per_position``: a speculative verification,
        whose positions were each computed as a step of their own, recorded so."""
        if self.inputs is None:
            self.inputs = hidden.detach().clone()
        else:
            past = self.inputs if hypo_ids is None else self.inputs.index_select(0, hypo_ids)
            self.inputs = torch.cat([past, hidden.detach()], dim=1)
        self.step_lengths.extend(_lengths(hidden, per_position))

    def replay(
        self, hidden: torch.Tensor, hypo_ids: torch.Tensor | None = None, per_position: bool = False
    ) -> tuple[torch.Tensor, list[int]]:
        """What a fresh server must run to catch up and then do the current step ``hidden``:
        the reordered history followed by ``hidden``, and the step lengths to split it by."""
        if self.inputs is None:
            return hidden, _lengths(hidden, per_position)
        past = self.inputs if hypo_ids is None else self.inputs.index_select(0, hypo_ids)
        return torch.cat([past, hidden], dim=1), [*self.step_lengths, *_lengths(hidden, per_position)]

    def truncate(self, positions: int) -> None:
        """Forget the inputs from position ``positions`` on (drafted tokens not kept); a step
        that straddles it keeps its first part."""
        lengths, total = [], 0
        for n in self.step_lengths:
            if total >= positions:
                break
            lengths.append(min(n, positions - total))
            total += lengths[-1]
        self.step_lengths = lengths
        if self.inputs is not None:
            self.inputs = self.inputs[:, :total] if total else None

    def prefix(self, positions: int) -> SpanHistory:
        """A copy of the history of its first ``positions`` positions (whole steps: ``ValueError``
        where a step straddles them)."""
        lengths, total = [], 0
        for n in self.step_lengths:
            if total >= positions:
                break
            lengths.append(n)
            total += n
        if total != positions or self.inputs is None:
            raise ValueError(f"no history ends at position {positions} (steps of {self.step_lengths})")
        return SpanHistory.from_replay(self.inputs[:, :positions], lengths)

    @classmethod
    def from_replay(cls, inputs: torch.Tensor, step_lengths: list[int]) -> SpanHistory:
        """The history of a span that was just rebuilt from ``inputs`` split into ``step_lengths``."""
        history = cls()
        history.inputs = inputs.detach().clone()
        history.step_lengths = list(step_lengths)
        return history


def _lengths(hidden: torch.Tensor, per_position: bool) -> list[int]:
    return [1] * hidden.shape[1] if per_position else [hidden.shape[1]]
