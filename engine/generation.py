"""Token generation over any chain of blocks: greedy, sampling, repetition penalty, beam search.

The loop only needs the client's head (embeddings and LM head) and a way to open an inference
session over all blocks: ``open_session(batch, max_length)`` returning an object with
``step(hidden [batch, seq, hidden], hypo_ids=None) -> hidden`` and ``close()``. Locally that is a
:class:`LocalSession` over a :class:`~swarm.engine.checkpoint.BlockRange`; over the swarm it is a
chain of remote servers. The same loop drives both, which is what makes swarm output equal local
output token for token.

Speculative decoding (``draft``, greedy and sampling): sessions also take ``step(hidden,
per_position=True)`` (each position computed as its own decode step) and ``rewind(position)``
(forget the positions from there on); see :mod:`swarm.engine.speculative`.

Adapters: the session applies LoRA and deep prompts to its blocks (a :class:`LocalSession` given
the tensors, or servers given them when the session opens); a prompt adapter's embeddings are a
``prefix`` that the loop prepends to the prompt's embeddings at the first step (virtual positions
``0..nv-1``, then the prompt's tokens), so they count toward the context like tokens.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from swarm.cache.kv import SessionKV
from swarm.engine.adapters import AdapterSpec, applied
from swarm.engine.checkpoint import BlockRange
from swarm.engine.context import check_prompt_length  # noqa: F401  (part of this module's API)
from swarm.engine.speculative import DRAFTS, MAX_DRAFT, DraftAhead, Drafter, DraftLength, NgramDrafter, SpecStats


class InferenceSession(Protocol):
    def step(self, hidden: torch.Tensor, hypo_ids: torch.Tensor | None = None, per_position: bool = False) -> torch.Tensor: ...

    def rewind(self, position: int) -> None: ...

    def close(self) -> None: ...


OpenSession = Callable[[int, int], InferenceSession]


class Rewound(Exception):
    """Raised by a session's step: the positions from ``position`` on were computed wrong (a server
    caught lying, see :mod:`swarm.p2p.checking`) and are forgotten, the step's own included; the
    session is ready to take them again from there, through honest servers. ``liar``: who lied."""

    def __init__(self, position: int, liar: str = ""):
        super().__init__(f"positions from {position} on are computed again ({liar or 'a server'} lied)")
        self.position, self.liar = position, liar


class LocalSession:
    """An inference session over blocks held in this process; with adapter ``tensors`` (keyed by
    global block, see :mod:`swarm.engine.adapters`) every step runs with them applied, which
    needs the blocks :func:`~swarm.engine.adapters.attach`-ed."""

    def __init__(
        self,
        blocks: BlockRange,
        batch: int,
        max_length: int,
        tensors: Mapping[str, torch.Tensor] | None = None,
        spec: AdapterSpec | None = None,
    ):
        self.blocks, self.tensors, self.spec = blocks, tensors, spec
        self.kv: SessionKV = blocks.open_session(batch=batch, max_length=max_length)

    def step(self, hidden: torch.Tensor, hypo_ids: torch.Tensor | None = None, per_position: bool = False) -> torch.Tensor:
        """A step; ``per_position``: each position as its own decode step (speculative
        verification), batched where the blocks allow it exactly, else one after another."""
        with torch.no_grad(), applied(self.blocks, self.tensors, self.spec):
            if not per_position or hidden.shape[1] == 1:
                return self.blocks(hidden, self.kv, hypo_ids)
            if hypo_ids is not None:
                raise ValueError("a per-position step reorders no rows")
            if hidden.shape[0] == 1 and not self.tensors:
                return self.blocks.run_batch([(hidden, self.kv)], per_position=[True])[0]
            return torch.cat([self.blocks(hidden[:, j : j + 1], self.kv) for j in range(hidden.shape[1])], dim=1)

    def rewind(self, position: int) -> None:
        """Forget the cached positions from ``position`` on."""
        self.kv.rewind(position)

    def close(self) -> None:
        self.kv.close()


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick tokens. Greedy unless ``do_sample`` or ``num_beams > 1``."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    num_beams: int = 1
    length_penalty: float = 1.0
    seed: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    draft: str = "none"  # speculative decoding: none, ngram or auto (see swarm.engine.speculative)
    draft_tokens: int = 0  # tokens drafted per step; 0: as many as pay, measured step by step

    def __post_init__(self):
        """Raises ``ValueError`` naming the CLI flag of a value out of range (NaN and infinities too)."""
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(
                f"--temperature must be a finite number > 0, got {self.temperature} "
                f"(for deterministic output drop the sampling flags)"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be ≥ 0 (0 turns it off), got {self.top_k}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(
                f"--repetition-penalty must be a finite number > 0 (1.0 turns it off), got {self.repetition_penalty}"
            )
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"--length-penalty must be a finite number, got {self.length_penalty}")
        if self.num_beams < 1:
            raise ValueError(f"--num-beams must be at least 1, got {self.num_beams}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"--seed must be between 0 and 2**64 - 1, got {self.seed}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam search is deterministic: use either --num-beams or sampling flags, not both")
        if not 0 <= self.draft_tokens <= MAX_DRAFT:
            raise ValueError(f"--draft-tokens must be 0 (adaptive) to {MAX_DRAFT}, got {self.draft_tokens}")
        if self.draft not in DRAFTS:
            raise ValueError(f"--draft must be one of {', '.join(DRAFTS)}, got {self.draft!r}")
        if self.num_beams > 1 and self.draft not in ("none", "auto"):
            raise ValueError(f"--draft {self.draft} does not apply to beam search: drop --draft or --num-beams")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """Penalise every token in ``seen`` ([batch, n]): divide positive logits, multiply negative ones."""
    if penalty == 1.0:
        return logits
    picked = logits.gather(1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(1, seen, picked)


def sample_token(logits: torch.Tensor, cfg: GenerationConfig, seed: int = 0, position: int = 0) -> torch.Tensor:
    """Pick one token per row of ``logits`` ([batch, vocab], after the repetition penalty):
    greedy, or sampled by the Gumbel-max trick (the argmax of the filtered, tempered logits plus
    Gumbel noise drawn from ``seed`` and the token's ``position``: exactly a draw from the
    softmax). The noise depends on nothing but the seed and the position, so speculative
    decoding, which picks a position's token while checking a draft, picks what plain sampling
    picks there: the same tokens for the same seed, whatever was drafted."""
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (always keep the first)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= cfg.top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    key = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9) % 2**64
    generator = torch.Generator().manual_seed((key ^ (key >> 32)) & 0xFFFFFFFF)  # its generator keeps 32 bits
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float64).clamp_(min=1e-300)
    gumbel = -torch.log(-torch.log(uniform))
    return (logits.double() + gumbel).argmax(dim=-1)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (log-softmax of its raw logits: before any
    repetition penalty, temperature, top-k or top-p), and the ``top`` most likely tokens there
    with theirs, most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class Scores(Protocol):
    """What :func:`generate` reports besides tokens: ``top`` alternatives per position;
    ``on_token(lp)`` for each new token (before ``on_token`` of :func:`generate`);
    ``on_prompt(lps)`` once, for the prompt's tokens after the first (``echo``), when set."""

    top: int

    def on_token(self, logprob: TokenLogprob) -> None: ...

    on_prompt: Callable[[list[TokenLogprob]], None] | None


BEAM_RESTARTS = 3  # a beam search starts over when a server is caught lying (its rows' past changes), this often at most
PROMPT_SCORE_ROWS = 64  # prompt positions scored per LM-head call (a vocabulary's float32 logits each: 64 × 128k × 4 B = 32 MB)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """``logits`` ``[n, vocab]`` → for each row the log-probability of ``tokens[i]`` and the ``top``
    most likely tokens."""
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(1, tokens.reshape(-1, 1))[:, 0].tolist()
    if top:
        values, ids = lp.topk(min(top, lp.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(chosen)
    return [TokenLogprob(t, c, tp) for t, c, tp in zip(tokens.reshape(-1).tolist(), chosen, tops)]


def _score_prompt(head: torch.nn.Module, hidden: torch.Tensor, input_ids: list[int], top: int) -> list[TokenLogprob]:
    """The log-probabilities of the prompt's tokens after the first, from the first step's
    ``hidden`` ``[1, virtual + prompt, hidden]``, :data:`PROMPT_SCORE_ROWS` positions per LM-head call."""
    out: list[TokenLogprob] = []
    ids = torch.tensor(input_ids)
    first = hidden.shape[1] - len(input_ids)  # the first prompt position (after a prompt adapter's)
    for start in range(1, len(input_ids), PROMPT_SCORE_ROWS):
        end = min(start + PROMPT_SCORE_ROWS, len(input_ids))
        logits = head.logits(hidden[:, first + start - 1 : first + end - 1])[0]
        out.extend(token_logprobs(logits, ids[start:end], top))
    return out


def score_prompt(
    head: torch.nn.Module, open_session: OpenSession, input_ids: list[int], top: int, prefix: torch.Tensor | None = None,
) -> list[TokenLogprob]:
    """The log-probabilities of the prompt's tokens after the first (and ``top`` alternatives
    each), from one step through a session that holds just the prompt (``prefix``: a prompt
    adapter's embeddings before it): what :func:`generate` reports to ``scores.on_prompt``, with
    no token generated."""
    if not input_ids:
        raise ValueError("the prompt is empty: give at least one token")
    virtual = 0 if prefix is None else prefix.shape[0]
    check_prompt_length(len(input_ids), head.max_positions, virtual)
    session = open_session(1, virtual + len(input_ids))
    try:
        with torch.no_grad():
            while True:
                try:
                    hidden = session.step(_embed(head, torch.tensor([input_ids]), prefix))
                    _settle(session)
                    return _score_prompt(head, hidden, input_ids, top)
                except Rewound as exc:  # the prompt's step again (a server lied)
                    if exc.position != 0:
                        session.rewind(0)
    finally:
        session.close()


def generate(
    head: torch.nn.Module,
    open_session: OpenSession,
    input_ids: list[int],
    cfg: GenerationConfig,
    on_token: Callable[[int], None] | None = None,
    prefix: torch.Tensor | None = None,
    scores: Scores | None = None,
    draft: Drafter | None = None,
    stats: SpecStats | None = None,
    on_rewind: Callable[[int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> list[int]:
    """Generate up to ``cfg.max_new_tokens`` tokens after ``input_ids``; returns the new tokens
    (an end-of-sequence token, if produced, is the last one). ``on_token`` is called with each token
    as soon as it is chosen (greedy and sampling; beam search knows its answer only at the end).
    ``prefix`` ``[num_virtual, hidden]``: a prompt adapter's embeddings, put before the prompt's
    (every row of a batch or beam gets them). ``scores``: log-probabilities reported as they come
    (see :class:`Scores`; not with beam search); the tokens chosen are the same with or without.
    ``draft``: a drafter for speculative decoding (greedy decoding and sampling; beam search
    decodes plainly), the tokens again the same; ``stats`` counts what it did.

    When the session forgets positions (:class:`Rewound`: a server was caught lying), the tokens
    chosen from them are chosen again: ``on_rewind(n)`` says that only the first ``n`` new tokens
    reported so far stand (``on_token`` then reports the ones that replace the rest), and so
    does ``scores.on_rewind(n)`` where the scores have one. The tokens returned are always those
    of an honest computation. ``stop()``, asked after each token is reported, ends the generation
    there (a stop string): the tokens so far are returned, checked as at any end.

    The prefix, the prompt and the new tokens together stay within the model's context
    (``head.max_positions``): a prompt that leaves no room raises ``ValueError`` before a session
    opens; otherwise generation stops when the context is full, even before ``max_new_tokens``."""
    if not input_ids:
        raise ValueError("the prompt is empty: give at least one token")
    virtual = 0 if prefix is None else prefix.shape[0]
    check_prompt_length(len(input_ids), head.max_positions, virtual)
    before = virtual + len(input_ids)  # positions before the first new token
    max_length = before + cfg.max_new_tokens
    if head.max_positions is not None:
        max_length = min(max_length, head.max_positions)
    if cfg.num_beams > 1:
        if scores is not None:
            raise ValueError("log-probabilities are reported for greedy decoding and sampling, not beam search")
        return _beam_search(head, open_session, input_ids, cfg, max_length, prefix)
    seed = cfg.seed if cfg.seed is not None else secrets.randbits(63)
    if draft is None and cfg.draft in ("ngram", "auto"):
        draft = NgramDrafter()
    rewound = _Rewinder(before, on_rewind, scores)
    stopped = stop if stop is not None else (lambda: False)
    session = open_session(1, max_length)
    if draft is not None:
        try:
            with torch.no_grad():
                return _speculative(head, session, input_ids, cfg, max_length, before, prefix, on_token, scores,
                                    draft, stats if stats is not None else SpecStats(), seed, rewound, stopped)
        finally:
            session.close()
    try:
        seen = torch.tensor([input_ids])
        step_ids, new, first = seen, [], prefix
        prompt_scored = False
        with torch.no_grad():
            while True:
                try:
                    if len(new) >= max_length - before or (new and new[-1] in cfg.eos_token_ids) or (new and stopped()):
                        _settle(session)  # the checks still under way, and of what is unchecked
                        return new
                    hidden = session.step(_embed(head, step_ids, first))
                except Rewound as exc:  # positions from exc.position on were wrong: choose their tokens again
                    kept = rewound(exc.position, session, len(new))
                    del new[kept:]
                    seen = torch.tensor([input_ids + new])
                    step_ids, first = (seen, prefix) if kept == 0 else (seen[:, -1:], None)
                    continue
                if not prompt_scored and scores is not None and scores.on_prompt is not None:  # the prompt's step
                    scores.on_prompt(_score_prompt(head, hidden, input_ids, scores.top))
                prompt_scored = True
                first = None
                raw = head.logits(hidden[:, -1])
                logits = apply_repetition_penalty(raw, seen, cfg.repetition_penalty)
                token = int(sample_token(logits, cfg, seed, len(seen[0]))[0])
                new.append(token)
                if scores is not None:
                    scores.on_token(token_logprobs(raw, torch.tensor([token]), scores.top)[0])
                if on_token is not None:
                    on_token(token)
                step_ids = torch.tensor([[token]])
                seen = torch.cat([seen, step_ids], dim=1)
    finally:
        session.close()


class _Rewinder:
    """What a generation loop does when its session forgets positions from ``position`` on
    (:class:`Rewound`): the new tokens chosen from positions before it stand (the token at
    ``position`` itself included: it was chosen from the one before), the rest are forgotten and
    the consumers told. A position within the prefix or the prompt rewinds the session to 0
    (the prompt's step is taken again whole)."""

    def __init__(self, before: int, on_rewind, scores):
        self.before, self.on_rewind, self.scores = before, on_rewind, scores

    def __call__(self, position: int, session, reported: int) -> int:
        kept = max(0, min(reported, position - self.before + 1))
        if kept == 0 and position != 0:
            session.rewind(0)
        if kept < reported:
            if self.on_rewind is not None:
                self.on_rewind(kept)
            if self.scores is not None and getattr(self.scores, "on_rewind", None) is not None:
                self.scores.on_rewind(kept)
        return kept


def _speculative(head, session, input_ids: list[int], cfg: GenerationConfig, max_length: int, before: int,
                 prefix, on_token, scores: Scores | None, draft: Drafter, stats: SpecStats, seed: int,
                 rewound: _Rewinder, stopped: Callable[[], bool]) -> list[int]:
    """Decoding with drafted tokens verified a step at a time (see
    :mod:`swarm.engine.speculative`): the tokens of plain decoding, greedy or sampled (a
    position's sample depends only on the seed and the position), in fewer steps."""
    tokens, new = list(input_ids), []
    budget = max_length - before
    while True:
        try:
            hidden = session.step(_embed(head, torch.tensor([input_ids]), prefix))
            break
        except Rewound as exc:
            rewound(exc.position, session, 0)
    if scores is not None and scores.on_prompt is not None:
        scores.on_prompt(_score_prompt(head, hidden, input_ids, scores.top))
    outs, drafted = hidden[:, -1:], []  # the outputs to pick from, and the tokens drafted for them
    position = before  # positions fed so far
    length, last = DraftLength(), None  # last: (positions, seconds) of the step just taken
    # a costly drafter drafts the next step's tokens while a verification is in flight
    ahead = DraftAhead(getattr(draft, "costly", False) and hasattr(session, "step_async"))
    while True:
        accepted, redo = 0, None
        for j in range(outs.shape[1]):
            raw = head.logits(outs[:, j])  # one row, as plain decoding computes it
            seen = torch.tensor([tokens]) if cfg.repetition_penalty != 1.0 else None  # None: not read
            logits = apply_repetition_penalty(raw, seen, cfg.repetition_penalty)
            token = int(sample_token(logits, cfg, seed, len(tokens))[0])
            new.append(token)
            tokens.append(token)
            stats.tokens += 1
            if scores is not None:
                scores.on_token(token_logprobs(raw, torch.tensor([token]), scores.top)[0])
            if on_token is not None:
                on_token(token)
            if token in cfg.eos_token_ids or len(new) >= budget or stopped():
                fed = before + len(new) - 1  # the positions of the prompt and the tokens kept
                if position > fed:  # drafted positions past them: forgotten, not checked
                    session.rewind(fed)
                    position = fed
                try:
                    _settle(session)  # the checks still under way, and of what is unchecked
                    return new
                except Rewound as exc:
                    redo = exc
                    break
            if j < len(drafted) and drafted[j] == token:
                accepted += 1
                stats.accepted += 1
                continue
            break
        if redo is None:
            if last is not None:
                length.observe(*last, len(drafted), accepted)
            if accepted < len(drafted):  # the drafted positions after the first miss are forgotten
                position -= len(drafted) - accepted
                session.rewind(position)
            # the next step: the last token picked, and what the drafter proposes after it (or
            # proposed already, while the step before was in flight, if it guessed that token)
            limit = budget - len(new) - 1
            k = min(cfg.draft_tokens, limit) if cfg.draft_tokens else length.choose(draft.draft_time, limit, ahead.free)
            drafted = ahead.take(tokens, accepted == len(drafted), k)
            if drafted is None:
                drafted = draft.propose(tokens, k)[:k] if k else []
            else:
                stats.ahead += 1
                if len(drafted) < k:  # the answer came before all were drafted ahead: the rest now
                    drafted += draft.propose(tokens + drafted, k - len(drafted))[: k - len(drafted)]
            ids = torch.tensor([[tokens[-1], *drafted]])
        while True:
            if redo is not None:  # positions from redo.position on were wrong: their tokens are chosen again
                kept = rewound(redo.position, session, len(new))
                if kept == 0:  # the prompt's own step was wrong: everything again
                    stats.tokens -= len(new)
                    return _speculative(head, session, input_ids, cfg, max_length, before, prefix, on_token, scores,
                                        draft, stats, seed, rewound, stopped)
                stats.tokens -= len(new) - kept
                del new[kept:]
                tokens = [*input_ids, *new]
                position, drafted, redo = redo.position, [], None
                ids = torch.tensor([[tokens[-1]]])
            began = time.monotonic()
            try:
                if ahead.enabled and drafted:
                    pending = session.step_async(_embed(head, ids, None), per_position=True)
                    try:  # meanwhile, until the answer comes: the guess at the next step's drafts
                        ahead.draft(draft, tokens + drafted, len(drafted) + 1, getattr(pending, "done", None))
                    finally:
                        outs = pending()  # also when drafting failed: the step ends before the session closes
                    ended = getattr(pending, "arrived", None) or time.monotonic()
                else:
                    outs = session.step(_embed(head, ids, None), per_position=bool(drafted))
                    ended = time.monotonic()
                break
            except Rewound as exc:
                redo = exc
        last = (ids.shape[1], ended - began)  # the chain's time, not the drafting's
        position += ids.shape[1]
        stats.steps += 1
        stats.drafted += len(drafted)


def _settle(session) -> None:
    """Wait for the session's checks of its servers, where it has them (raises Rewound)."""
    settle = getattr(session, "settle", None)
    if settle is not None:
        settle()


def _embed(head: torch.nn.Module, ids: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    """Embeddings of ``ids`` ``[rows, n]``, after ``prefix`` ``[num_virtual, hidden]`` in every row,
    through the head (as in training and peft: BLOOM's embedding LayerNorm covers the prefix too)."""
    return head.embed(ids) if prefix is None else head.embed(ids, prefix=prefix)  # [rows, nv + n, hidden]


def _beam_search(
    head: torch.nn.Module,
    open_session: OpenSession,
    input_ids: list[int],
    cfg: GenerationConfig,
    max_length: int,
    prefix: torch.Tensor | None = None,
) -> list[int]:
    """Beam search with ``cfg.num_beams`` hypotheses as rows of one session.

    Every row starts from the prompt; only row 0 is live at first. Each step takes the best
    ``(1 + number of EOS ids) × num_beams`` continuations of all rows (at least ``2 × num_beams``,
    as transformers does); those ending in EOS become finished hypotheses (score = sum of
    log-probs ÷ length^length_penalty) when they rank among the first ``num_beams``, the best
    others become the next rows, and the session's cache rows are reordered to match
    (``hypo_ids``). Each row has at most one continuation per EOS id, so that many candidates
    always hold ``num_beams`` that do not end: the session keeps its batch. The search stops when
    ``num_beams`` hypotheses are finished and no live row can beat the worst of them, or at
    ``max_length`` positions (prefix and prompt included).
    """
    session = open_session(cfg.num_beams, max_length)
    try:
        for attempt in range(BEAM_RESTARTS + 1):
            try:
                found = _beams(head, session, input_ids, cfg, max_length, prefix)
                _settle(session)  # the checks still under way, and of what is unchecked
                return found
            except Rewound as exc:  # a server was caught lying: the search again from the start, on honest servers
                if attempt == BEAM_RESTARTS:
                    raise RuntimeError(f"servers were caught lying {attempt + 1} times in one beam search; giving up") from exc
                session.close()
                session = open_session(cfg.num_beams, max_length)
    finally:
        session.close()


def _beams(head, session, input_ids: list[int], cfg: GenerationConfig, max_length: int, prefix) -> list[int]:
    nb = cfg.num_beams
    num_eos = len(set(cfg.eos_token_ids))
    rows = torch.tensor([input_ids] * nb)  # [nb, len]
    beam_scores = torch.full((nb,), -1e9)
    beam_scores[0] = 0.0
    step_ids, hypo_ids, first = rows, None, prefix
    finished: list[tuple[float, list[int]]] = []
    virtual = 0 if prefix is None else prefix.shape[0]
    with torch.no_grad():
        for step in range(max_length - virtual - len(input_ids)):
            hidden = session.step(_embed(head, step_ids, first), hypo_ids)
            first = None
            # the penalty applies to log-probs here, as in transformers' beam search
            log_probs = head.logits(hidden[:, -1]).log_softmax(-1)
            log_probs = apply_repetition_penalty(log_probs, rows, cfg.repetition_penalty)
            scores = log_probs + beam_scores[:, None]  # [nb, vocab]
            vocab = scores.shape[-1]
            top_scores, top_idx = scores.flatten().topk(max(2, 1 + num_eos) * nb)
            next_rows, next_tokens, next_scores = [], [], []
            for rank, (score, idx) in enumerate(zip(top_scores.tolist(), top_idx.tolist())):
                row, token = divmod(idx, vocab)
                generated = rows[row, len(input_ids) :].tolist() + [token]
                if token in cfg.eos_token_ids:
                    if rank < nb:
                        finished.append((score / len(generated) ** cfg.length_penalty, generated))
                    continue
                next_rows.append(row)
                next_tokens.append(token)
                next_scores.append(score)
                if len(next_rows) == nb:
                    break
            finished.sort(key=lambda item: -item[0])
            del finished[nb:]
            if not next_rows:  # every candidate ended: nothing left to extend
                break
            best_live = max(next_scores) / (step + 1) ** cfg.length_penalty
            if len(finished) == nb and best_live <= finished[-1][0]:
                break
            hypo_ids = torch.tensor(next_rows)
            step_ids = torch.tensor(next_tokens)[:, None]
            rows = torch.cat([rows[hypo_ids], step_ids], dim=1)
            beam_scores = torch.tensor(next_scores)
        else:
            for score, row in zip(beam_scores.tolist(), rows):
                generated = row[len(input_ids) :].tolist()
                finished.append((score / len(generated) ** cfg.length_penalty, generated))
    return max(finished, key=lambda item: item[0])[1]
