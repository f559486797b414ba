"""Speculative decoding (issue 23): drafted tokens verified in one step, each position computed as
its own decode step, so greedy output is plain greedy output token for token, locally and through
real servers, after a failover too; the drafter and the draft length are pure functions."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from conftest import FAMILIES, write_tiny_checkpoint
from swarm.cache.history import SpanHistory
from swarm.engine.adapters import attach
from swarm.engine.checkpoint import Checkpoint
from swarm.engine.client import ClientModel, generate_local
from swarm.engine.fast import measure_pooling
from swarm.engine.generation import GenerationConfig
from swarm.engine.speculative import (
    DraftAhead,
    DraftLength,
    SpecStats,
    best_draft_length,
    expected_tokens,
    ngram_draft,
)
from swarm_utils import cli, cli_json, local_json, running_swarm, swarm_generate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits (conftest.py)


@pytest.mark.parametrize(
    ("tokens", "k", "draft"),
    [
        ([1, 2, 3, 9, 1, 2, 3], 2, [9, 1]),  # the suffix 1 2 3 seen before: what followed it
        ([1, 2, 3, 4, 5, 1, 2], 5, [3, 4, 5, 1, 2]),  # capped by what there is
        ([5, 1, 7, 1, 8, 1], 1, [8]),  # the latest earlier occurrence wins
        ([1, 2, 3, 4], 3, []),  # nothing repeats
        ([7, 7], 4, [7]),  # one token long suffix
        ([1, 2, 3, 1, 2, 3], 0, []),  # k = 0
        ([], 3, []),
        ([4, 5, 6, 1, 5, 6], 2, [1, 5]),  # the longest suffix (5 6) first
    ],
)
def test_ngram_draft(tokens, k, draft):
    assert ngram_draft(tokens, k) == draft


@pytest.mark.parametrize(
    ("acceptance", "step", "position", "draft", "k_max", "free", "k"),
    [
        (0.9, 0.100, 0.002, 0.0, 16, 0, 16),  # far away, cheap positions, good drafts: draft all
        (0.0, 0.100, 0.002, 0.0, 16, 0, 0),  # drafts never accepted: never draft
        (0.5, 0.010, 0.010, 0.0, 16, 0, 0),  # an extra position costs a whole step: plain wins
        (0.8, 0.050, 0.005, 0.0, 4, 0, 4),  # capped by k_max
        (0.6, 0.100, 0.002, 0.020, 16, 0, 2),  # a costly drafter drafts less
        (0.6, 0.100, 0.002, 0.020, 16, 3, 3),  # ... unless drafts come ready (drafted ahead)
        (0.0, 0.100, 0.002, 0.020, 16, 3, 0),  # free drafts never accepted still cost positions
    ],
)
def test_best_draft_length(acceptance, step, position, draft, k_max, free, k):
    assert best_draft_length(acceptance, step, position, draft, k_max, free) == k


def test_expected_tokens():
    assert expected_tokens(0.5, 0) == 1
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(1.0, 3) == 4


def test_draft_length_fits_the_time_of_a_step_and_of_each_position():
    length = DraftLength()
    for n in (1, 3, 5, 1, 3, 5):
        length.observe(n, 0.100 + 0.004 * (n - 1), drafted=n - 1, accepted=n - 1)
    a, b = length.fit()
    assert a == pytest.approx(0.100) and b == pytest.approx(0.004)
    assert length.choose(limit=6) == 6
    assert length.choose(limit=0) == 0


def test_draft_length_probes_again_after_steps_without_drafting():
    length = DraftLength()
    length.observe(2, 0.01, drafted=20, accepted=0)  # all rejected, positions expensive
    length.observe(1, 0.005, drafted=0, accepted=0)
    assert [length.choose() for _ in range(8)] == [0] * 7 + [1]


class Counting:
    """A drafter proposing ``tokens[-1] + 1, + 2, ...`` (fewer once ``until()``), counting its calls."""

    name, draft_time, costly = "counting", 0.01, True

    def __init__(self):
        self.calls = 0

    def propose(self, tokens, k, until=None):
        self.calls += 1
        out = []
        for i in range(1, k + 1):
            out.append(tokens[-1] + i)
            if until is not None and until():
                break
        return out


def test_drafting_ahead_is_used_only_when_its_guess_came_true():
    drafter = Counting()
    ahead = DraftAhead(True)
    assert ahead.free == 1.0 and ahead.take([1, 2], True, 3) is None  # nothing drafted ahead yet: the prior
    ahead.draft(drafter, [1, 2, 3, 4], 3)  # guesses 5, then drafts 6 7 8
    assert ahead.take([1, 2, 3, 4, 5], True, 2) == [6, 7]  # all accepted, the guess came true
    ahead.draft(drafter, [1, 2, 3], 2)
    assert ahead.take([1, 2, 3, 9], True, 2) is None  # another token came after the drafts
    ahead.draft(drafter, [1, 2, 3], 2)
    assert ahead.take([1, 2, 3, 4], False, 2) is None  # a draft was rejected
    answers = iter([False, True])  # the verification's answer comes after the guess and one draft
    ahead.draft(drafter, [1, 2, 3], 3, until=lambda: next(answers))
    assert ahead.take([1, 2, 3, 4], True, 3) == [5]  # fewer than asked: the rest is drafted then
    assert ahead.free == pytest.approx((3 + 1 + 1) / (4 + 1))  # drafts found ready per step that looked
    assert DraftAhead(False).free == 0.0


def test_history_truncate_keeps_whole_positions():
    history = SpanHistory()
    history.record(torch.arange(5.0).reshape(1, 5, 1))
    history.record(torch.arange(5.0, 9.0).reshape(1, 4, 1), per_position=True)
    assert history.step_lengths == [5, 1, 1, 1, 1]
    history.truncate(6)
    assert history.step_lengths == [5, 1] and history.inputs.flatten().tolist() == [0, 1, 2, 3, 4, 5]
    history.truncate(3)
    assert history.step_lengths == [3] and history.length == 3
    inputs, chunks = history.replay(torch.zeros(1, 2, 1), per_position=True)
    assert chunks == [3, 1, 1] and inputs.shape[1] == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_per_position_step_equals_one_step_per_position(tmp_path, family, dtype):
    """Bit for bit, with the linears pooled (attached) and without, across a decode bucket's
    edge; Mistral with a sliding window the positions cross."""
    overrides = {"sliding_window": 64} if family == "mistral" else {}
    ckpt = Checkpoint(write_tiny_checkpoint(tmp_path, family, **overrides))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, 61, ckpt.config.hidden_size, generator=g)
    tokens = torch.randn(1, 7, ckpt.config.hidden_size, generator=g)
    for pooled in (False, True):
        blocks = ckpt.load_blocks(0, ckpt.num_blocks, dtype)
        if pooled:
            attach(blocks)
            measure_pooling(blocks, dtype)
        alone, verified = blocks.open_session(1, 80), blocks.open_session(1, 80)
        with torch.no_grad():
            blocks(prompt, alone)
            blocks(prompt, verified)
            expected = torch.cat([blocks(tokens[:, j : j + 1], alone) for j in range(tokens.shape[1])], dim=1)
            got = blocks.run_batch([(tokens, verified)], per_position=[True])[0]
            # batched beside another session's plain step: the same bits
            other = blocks.open_session(1, 80)
            blocks(prompt[:, :9], other)
            verified.rewind(61)
            beside = blocks.run_batch([(prompt[:, 9:10], other), (tokens, verified)], per_position=[False, True])[1]
        assert torch.equal(got, expected), (family, dtype, pooled)
        assert torch.equal(beside, expected), (family, dtype, pooled)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("spec"), "llama", num_hidden_layers=6, max_position_embeddings=4096)


REPETITIVE = "one two three one two three one two"


class Oracle:
    """A drafter that knows the plain output and gets every third drafted token wrong: most
    drafts accepted, some rejected mid-way (the cache cut back), whatever the model."""

    name, draft_time = "oracle", 0.0
    costly = True  # drafts ahead while a verification is in flight, where the session can

    def __init__(self, tokens: list[int], miss: int = 3):
        self.tokens, self.calls, self.miss = tokens, 0, miss

    def propose(self, tokens, k, until=None):
        self.calls += 1
        draft = list(self.tokens[len(tokens) : len(tokens) + k])
        return [(t - 1 if t else 1) if (i + self.calls) % self.miss == self.miss - 1 else t for i, t in enumerate(draft)]


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_speculative_greedy_is_plain_greedy_locally(tiny, penalty):
    client = ClientModel.load(tiny)
    for prompt in (REPETITIVE, "The capital of France is", "a b a b a b a"):
        ids = client.encode(prompt)
        plain = GenerationConfig(max_new_tokens=40, eos_token_ids=(), repetition_penalty=penalty)
        stats = SpecStats()
        from swarm.engine.client import local_sessions
        from swarm.engine.generation import generate
        from swarm.engine.speculative import NgramDrafter

        blocks = attach(Checkpoint(tiny).load_blocks(0, 6))
        expected = generate_local(client, ids, plain)
        spec = generate(client.head, local_sessions(blocks), ids, plain, draft=NgramDrafter(), stats=stats)
        assert spec == expected, prompt
        assert stats.tokens == 40 and stats.steps <= 40
        stats = SpecStats()
        fixed = GenerationConfig(max_new_tokens=40, eos_token_ids=(), repetition_penalty=penalty, draft_tokens=4)
        oracle = generate(client.head, local_sessions(blocks), ids, fixed, draft=Oracle(ids + expected), stats=stats)
        assert oracle == expected, prompt
        assert stats.accepted > 10 and stats.accepted < stats.drafted and stats.steps < 30, stats


def test_drafting_ahead_during_a_step_changes_no_token(tiny):
    """A session that steps asynchronously (as a swarm chain does): the drafter drafts the next
    step while one is in flight; the tokens are plain decoding's and some steps use drafts
    drafted ahead."""
    from swarm.engine.client import local_sessions
    from swarm.engine.generation import generate

    client = ClientModel.load(tiny)
    ids = client.encode(REPETITIVE)
    blocks = attach(Checkpoint(tiny).load_blocks(0, 6))
    cfg = GenerationConfig(max_new_tokens=40, eos_token_ids=(), draft_tokens=3)
    expected = generate_local(client, ids, replace(cfg, draft_tokens=0))

    def open_session(batch, max_length):
        session = local_sessions(blocks)(batch, max_length)

        def step_async(hidden, per_position=False):
            out = session.step(hidden, per_position=per_position)
            polls = iter(range(stats.steps % 4))  # the answer comes after 0-3 drafts

            class Pending:
                arrived = None

                def done(self):
                    return next(polls, None) is None

                def __call__(self):
                    return out

            return Pending()

        session.step_async = step_async
        return session

    stats = SpecStats()
    assert generate(client.head, open_session, ids, cfg, draft=Oracle(ids + expected, miss=11), stats=stats) == expected
    assert stats.ahead > 0 and stats.accepted < stats.drafted, stats


def test_the_context_limit_stops_speculation_where_plain_decoding_stops(tmp_path):
    model = write_tiny_checkpoint(tmp_path, "llama", max_position_embeddings=24)
    client = ClientModel.load(model)
    ids = client.encode(REPETITIVE)
    plain = generate_local(client, ids, GenerationConfig(max_new_tokens=40, eos_token_ids=()))
    spec = generate_local(client, ids, GenerationConfig(max_new_tokens=40, eos_token_ids=(), draft="ngram"))
    assert spec == plain and len(ids) + len(plain) == 24


def test_draft_flags_are_checked():
    with pytest.raises(ValueError, match="--draft must be one of"):
        GenerationConfig(draft="bigram")
    with pytest.raises(ValueError, match="does not apply to beam search"):
        GenerationConfig(draft="ngram", num_beams=2)


@pytest.mark.slow
def test_swarm_speculation_gives_the_tokens_of_plain_and_local_decoding(tiny, tmp_path):
    """Three real servers: `swarm generate --draft ngram` (the default, auto, drafts the same way)
    equals plain decoding with `--local --draft none`, for a short and a longer prompt (swarm
    equals `--local` without drafts in tests/test_swarm.py)."""
    with running_swarm(tiny, ["0:2", "2:4", "4:6"], tmp_path) as servers:
        peer = servers[0].maddr
        for prompt in (REPETITIVE, " ".join([REPETITIVE] * 80) + " four"):  # ~1,900 tokens
            args = [prompt, "--model", str(tiny), "--max-new-tokens", "30", "--initial-peers", peer]
            ngram = cli_json([*args, "--draft", "ngram"], tmp_path)  # auto is the same drafter
            local = local_json([prompt, "--model", str(tiny), "--max-new-tokens", "30", "--local", "--draft", "none"])
            assert ngram["token_ids"] == local["token_ids"], prompt


@pytest.mark.slow
def test_a_server_killed_during_speculation_changes_no_token(tiny, tmp_path, monkeypatch):
    """Servers of the middle blocks killed between verification steps: the chain replays their
    history (verified positions as steps of one) on a replacement; the tokens stay."""
    cfg = GenerationConfig(max_new_tokens=40, eos_token_ids=(), draft="ngram", draft_tokens=4)
    client = ClientModel.load(tiny)
    ids = client.encode(REPETITIVE)
    expected = generate_local(client, ids, GenerationConfig(max_new_tokens=40, eos_token_ids=()))
    oracle = Oracle(ids + expected)  # drafts that are mostly right, so verification steps carry several
    monkeypatch.setattr("swarm.engine.generation.NgramDrafter", lambda: oracle)
    with running_swarm(tiny, ["0:2", "2:4", "4:6", "2:4", "2:4"], tmp_path) as servers:
        by_peer = {s.maddr.rsplit("/p2p/", 1)[1]: s for s in servers}
        killed = []

        def on_token(i, chain):
            if i in (9, 21):
                peer = next(s.span.peer_id for s in chain.sessions if s.span.start <= 2 < s.span.end)
                by_peer[peer].proc.kill()
                by_peer[peer].proc.wait()
                killed.append(peer)

        tokens = swarm_generate(tiny, servers[0].maddr, cfg, on_token, prompt=REPETITIVE, step_timeout=5.0,
                                wait_timeout=20.0)
    assert len(killed) == 2 and oracle.calls > 3
    assert tokens == expected


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--draft", "ngram", "--num-beams", "2"], "--draft ngram does not apply to beam search"),
        (["--draft", "bigram"], "give auto, ngram, none or a draft model's directory"),
        (["--draft-tokens", "99"], "--draft-tokens must be 0 (adaptive) to 16"),
        (["--draft", "/nonexistent/draft-model"], "is not a directory"),
        (["--draft", "OTHER"], "has another tokenizer than"),
    ],
)
def test_bad_draft_flags_are_one_line_errors(tiny, tmp_path, flags, message):
    """The command in this process (:func:`swarm_utils.cli`: an exception other than its exit fails
    the test), and for the draft model of another tokenizer, the one case that loads a second
    model before it fails, a `swarm generate` process of its own: one line on its stderr."""
    from swarm_utils import run_swarm

    if flags == ["--draft", "OTHER"]:  # a draft model whose tokenizer maps two tokens the other way
        other = tmp_path / "other"
        shutil.copytree(tiny, other)
        data = json.loads((other / "tokenizer.json").read_text())
        vocab = data["model"]["vocab"]
        a, b = list(vocab)[10:12]
        vocab[a], vocab[b] = vocab[b], vocab[a]
        (other / "tokenizer.json").write_text(json.dumps(data))
        proc = run_swarm(["generate", "--local", "--model", str(tiny), "--draft", str(other), "one two"], tmp_path,
                         timeout=60)
        code, stderr = proc.returncode, proc.stderr
    else:
        result = cli(["generate", "--local", "--model", str(tiny), *flags, "one two"], tmp_path)
        code, stderr = result.exit_code, result.stderr
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], stderr


def test_the_gumbel_sampler_draws_from_the_filtered_softmax():
    """sample_token's draws over many positions: the frequencies of the tempered, top-p filtered
    distribution (a chi-square test at p < 0.001 would fail 1 run in 1,000; 8 categories)."""
    from swarm.engine.generation import sample_token

    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    cfg = GenerationConfig(do_sample=True, temperature=0.8, top_p=0.95)
    probs = (logits / 0.8).softmax(-1)[0]
    keep = (probs.sort(descending=True).values.cumsum(0) - probs.sort(descending=True).values) < 0.95
    kept = probs.sort(descending=True).indices[keep]
    target = torch.zeros_like(probs)
    target[kept] = probs[kept] / probs[kept].sum()
    n = 20_000
    counts = torch.bincount(torch.cat([sample_token(logits, cfg, 7, p) for p in range(n)]), minlength=8).double()
    assert counts[target == 0].sum() == 0  # filtered tokens are never drawn
    expected = target[target > 0].double() * n
    chi2 = float(((counts[target > 0] - expected) ** 2 / expected).sum())
    assert chi2 < 24.3, (chi2, counts.tolist(), expected.tolist())  # chi-square, 6 dof, p = 0.0005


def test_speculative_sampling_gives_the_tokens_of_plain_sampling(tiny):
    """For every seed the tokens of plain sampling, whatever was drafted (a position's draw
    depends only on the seed and the position): the distribution is plain sampling's."""
    from swarm.engine.client import local_sessions
    from swarm.engine.generation import generate

    client = ClientModel.load(tiny)
    ids = client.encode(REPETITIVE)
    blocks = attach(Checkpoint(tiny).load_blocks(0, 6))
    drafted = accepted = 0
    for seed in range(12):
        cfg = GenerationConfig(max_new_tokens=16, eos_token_ids=(), do_sample=True, temperature=0.9, top_k=50, seed=seed)
        plain = generate(client.head, local_sessions(blocks), ids, cfg)
        stats = SpecStats()
        spec = generate(client.head, local_sessions(blocks), ids, replace(cfg, draft_tokens=3),
                        draft=Oracle(ids + plain), stats=stats)
        assert spec == plain, seed
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    assert 0 < accepted < drafted


def test_a_server_cuts_its_cache_only_for_steps_that_move_on(tiny):
    """Raw frames to an in-process server: a verification step, a step that cuts the cache back
    to the accepted positions (its output equals the same step after plain steps), then a late
    copy of an older step, refused rather than cutting the cache again."""
    from server_utils import peer, served

    from swarm.engine.generation import LocalSession
    from swarm.p2p import protocols
    from swarm.p2p.loop import run
    from swarm.p2p.wire import Frame, expect, read_frame, write_frame

    ckpt = Checkpoint(tiny)
    g = torch.Generator().manual_seed(5)
    prompt, verify, after = (torch.randn(1, n, ckpt.config.hidden_size, generator=g) for n in (5, 4, 1))
    local = LocalSession(ckpt.load_blocks(0, 3), 1, 32)
    local.step(prompt)
    for j in range(2):  # what is kept of the verification: its first 2 positions, each a decode step
        local.step(verify[:, j : j + 1])
    expected = local.step(after)

    async def scenario():
        async with served(tiny, blocks="0:3") as (server, maddr), peer(maddr) as (host, sp):
            stream = await host.open_stream(sp, protocols.INFERENCE, timeout=10)
            await write_frame(stream, Frame("open", {"start": 0, "end": 3, "batch": 1, "max_length": 32}), 10)
            expect(await read_frame(stream, timeout=10), "opened")
            replies = []
            for step_id, position, hidden, extra in (("a", 0, prompt, {}), ("b", 5, verify, {"per_position": True}),
                                                     ("c", 7, after, {}), ("d", 5, after, {})):
                fields = {"step_id": step_id, "position": position, **extra}
                await write_frame(stream, Frame("step", fields, [hidden]), 10)
                replies.append(await read_frame(stream, timeout=30))
                if replies[-1].kind == "error":
                    break
            return replies

    replies = run(scenario())
    assert [r.kind for r in replies] == ["output", "output", "output", "error"]
    assert torch.equal(replies[2].tensors[0], expected)
    assert "steps only move on" in replies[3]["message"]
