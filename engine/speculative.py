"""Speculative decoding: more than one token per round trip through the chain, exactly.

A drafter proposes the next ``k`` tokens cheaply (here, with no model: :func:`ngram_draft`
looks the last tokens up in the prompt and the output so far); one *verification* step feeds the
last chosen token and the ``k`` drafted ones through the chain, each position computed exactly as
its own decode step would be (``per_position``, see
:meth:`~swarm.engine.checkpoint.BlockRange.run_batch`), and the client picks, position by
position, the token plain decoding would have picked there. Drafted tokens are kept while they
equal those picks; at the first that does not, the picked token replaces it and the rest is
dropped (the session's caches are cut back). So greedy output is token for token the output of
plain decoding, whatever the drafter proposes: a bad draft costs time, never a token.

How many tokens to draft is decided each step by :func:`best_draft_length` from what was
measured: the drafter's acceptance rate and the chain's time per step and per extra position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

DRAFTS = ("none", "auto", "ngram")  # the --draft choices (auto: n-gram lookup, each step only where it pays)
MAX_DRAFT = 16  # drafted tokens per verification step at most (the server takes up to 64 positions)
NGRAM_MAX = 4  # longest suffix looked up
NGRAM_MIN = 1  # shortest suffix looked up (1: a single repeated token already proposes)
PROBE_EVERY = 8  # steps without drafting before one drafted token is tried again


def ngram_draft(tokens: Sequence[int], k: int, max_n: int = NGRAM_MAX, min_n: int = NGRAM_MIN) -> list[int]:
    """Prompt lookup: the ``k`` tokens that followed the latest earlier occurrence of the longest
    suffix of ``tokens`` (``max_n`` down to ``min_n`` tokens) found earlier in ``tokens``; [] when
    none is found. Pure; O(len(tokens)) per suffix length."""
    n_tokens = len(tokens)
    if k <= 0 or n_tokens < 2:
        return []
    for n in range(min(max_n, n_tokens - 1), min_n - 1, -1):
        suffix = list(tokens[n_tokens - n :])
        for start in range(n_tokens - n - 1, -1, -1):  # the latest earlier occurrence first
            if list(tokens[start : start + n]) == suffix:
                follow = list(tokens[start + n : start + n + k])
                if follow:
                    return follow
    return []


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens one verification step yields with ``k`` drafted tokens, each accepted with
    probability ``acceptance`` until the first rejection: 1 + α + … + α^k."""
    if k <= 0:
        return 1.0
    if acceptance >= 1.0:
        return float(k + 1)
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


def best_draft_length(
    acceptance: float, step_time: float, position_time: float, draft_time: float, k_max: int = MAX_DRAFT,
    free: float = 0.0,
) -> int:
    """The number of tokens to draft that maximises expected tokens per second: a step of ``k``
    drafted tokens takes ``step_time + k·position_time`` plus ``draft_time`` for each drafted token
    beyond the ``free`` ones (those expected to come ready, drafted while the step before was in
    flight), and yields :func:`expected_tokens` (``acceptance`` per drafted token). 0 when no
    drafting beats plain decoding (one token per ``step_time``). Pure."""
    best_k, best_rate = 0, 1.0 / max(step_time, 1e-9)
    for k in range(1, max(0, k_max) + 1):
        cost = step_time + k * position_time + draft_time * max(0.0, k - free)
        rate = expected_tokens(acceptance, k) / max(cost, 1e-9)
        if rate > best_rate * (1 + 1e-9):
            best_k, best_rate = k, rate
    return best_k


class Drafter(Protocol):
    """Proposes the next tokens: ``propose(tokens, k)`` returns at most ``k`` (maybe none) to
    follow ``tokens`` (the prompt and the output so far), or fewer once ``until()`` is true
    (checked between drafted tokens, when given); ``draft_time``: seconds per drafted token, for
    :func:`best_draft_length`."""

    name: str
    draft_time: float

    def propose(self, tokens: Sequence[int], k: int, until: Callable[[], bool] | None = None) -> list[int]: ...


class NgramDrafter:
    """Prompt lookup (:func:`ngram_draft`): no model, no cost; strong where the output quotes its
    input or itself (code, extraction, summaries, chat about a given text)."""

    name = "ngram"
    draft_time = 0.0

    def propose(self, tokens: Sequence[int], k: int, until: Callable[[], bool] | None = None) -> list[int]:
        return ngram_draft(tokens, k)


class DraftAhead:
    """Drafting the next step while a verification is in flight (pipelined speculation, as in
    PipeInfer): the drafter continues past its own drafts, guessing the token the verification
    will add after them, until the verification's answer comes; when every draft is accepted and
    that token is the guess, the next step's drafts are (partly) ready, and their cost was hidden
    behind the round trip. ``free``: the drafts a step can expect to find ready so (a running
    mean over the steps, with a prior of one token over one step)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.guess: tuple[list[int], int, list[int]] | None = None  # (the tokens it followed, guessed token, drafts)
        self.ready, self.tries = 0, 0  # drafts found ready, over the steps that looked

    @property
    def free(self) -> float:
        return (self.ready + 1) / (self.tries + 1) if self.enabled else 0.0

    def draft(self, drafter: Drafter, tokens: list[int], k: int, until: Callable[[], bool] | None = None) -> None:
        """Guess the token after ``tokens`` and draft up to ``k`` after it, stopping once ``until()``."""
        proposed = drafter.propose(tokens, k + 1, until)
        self.guess = (tokens, proposed[0], proposed[1:]) if proposed else None

    def take(self, tokens: list[int], all_accepted: bool, k: int) -> list[int] | None:
        """The drafts for the step after ``tokens`` if the guess was right (at most ``k``, maybe
        fewer than ``k`` or none when the answer came early), else None."""
        guess, self.guess = self.guess, None
        if guess is None or k <= 0:
            return None
        self.tries += 1
        followed, token, drafts = guess
        if not (all_accepted and tokens[:-1] == followed and tokens[-1] == token):
            return None
        self.ready += len(drafts)  # all it had ready: a longer step could have used them
        return drafts[:k]


@dataclass
class SpecStats:
    """What speculation did in one generation: verification steps and plain steps (``steps``:
    round trips through the chain after the prompt's), tokens drafted and accepted, tokens
    produced."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0
    ahead: int = 0  # steps whose drafts were drafted ahead, during the step before (DraftAhead)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    def line(self) -> str:
        ahead = f"; {self.ahead} steps drafted ahead" if self.ahead else ""
        return (f"speculation: {self.drafted} tokens drafted, {self.accepted} accepted ({self.acceptance:.0%}); "
                f"{self.tokens} tokens in {self.steps} round trips ({self.tokens_per_step:.2f} per round trip){ahead}")


@dataclass
class DraftLength:
    """Chooses each step's draft length (:func:`best_draft_length`) from measurements: the
    acceptance rate (a running ratio with a prior of ``prior`` over ``weight`` tokens) and the
    chain's time per step of ``n`` positions, fitted as ``a + b·(n-1)`` by least squares over the
    recent steps (``b`` starts at ``a``/8 until two step lengths were seen)."""

    k_max: int = MAX_DRAFT
    prior: float = 0.6
    weight: float = 4.0
    window: int = 32
    drafted: float = 0.0
    accepted: float = 0.0
    times: list[tuple[int, float]] = field(default_factory=list)  # (positions, seconds) of recent steps
    idle: int = 0  # steps in a row chosen without drafting

    @property
    def acceptance(self) -> float:
        return (self.accepted + self.prior * self.weight) / (self.drafted + self.weight)

    def observe(self, positions: int, seconds: float, drafted: int, accepted: int) -> None:
        self.times.append((positions, seconds))
        del self.times[: -self.window]
        self.drafted += drafted
        self.accepted += accepted

    def fit(self) -> tuple[float, float]:
        """(time of a step of one position, time of each extra position), in seconds."""
        if not self.times:
            return 0.05, 0.05 / 8
        xs = [n - 1 for n, _ in self.times]
        ys = [t for _, t in self.times]
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mean_x) ** 2 for x in xs)
        if var == 0:
            a = mean_y / (1 + mean_x / 8)  # one length seen: split it with the prior slope
            return a, a / 8
        b = max(0.0, sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var)
        return max(1e-6, mean_y - b * mean_x), b

    def choose(self, draft_time: float = 0.0, limit: int | None = None, free: float = 0.0) -> int:
        """Tokens to draft for the next step (at most ``limit``; ``free``: drafts expected to come
        ready, see :class:`DraftAhead`): the best for what was measured,
        and 1 every :data:`PROBE_EVERY` steps without drafting, so a text that turns repetitive
        later is noticed."""
        a, b = self.fit()
        k_max = self.k_max if limit is None else max(0, min(self.k_max, limit))
        k = best_draft_length(self.acceptance, a, b, draft_time, k_max, free)
        if k == 0 and k_max > 0:
            self.idle += 1
            if self.idle >= PROBE_EVERY:
                self.idle = 0
                return 1
        return k
