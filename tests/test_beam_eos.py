"""Beam search with several end-of-sequence ids (Llama-3-Instruct has three) equals transformers'
beam search and never runs out of live rows; so does beam search with a repetition penalty (which
transformers applies to log-probs there, not logits)."""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from swarm.engine.checkpoint import Checkpoint
from swarm.engine.generation import GenerationConfig, LocalSession, generate


@pytest.fixture(scope="module")
def llama(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    ckpt = Checkpoint(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ckpt.load_head(), ckpt.load_blocks(0, ckpt.num_blocks), hf


def _ours(llama, prompt: list[int], cfg: GenerationConfig) -> list[int]:
    head, blocks, _ = llama
    return generate(head, lambda batch, n: LocalSession(blocks, batch, n), prompt, cfg)


def _theirs(llama, prompt: list[int], cfg: GenerationConfig) -> list[int]:
    hf = llama[2]
    out = hf.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=cfg.max_new_tokens,
        num_beams=cfg.num_beams,
        do_sample=False,
        eos_token_id=list(cfg.eos_token_ids),
        pad_token_id=cfg.eos_token_ids[0],
        length_penalty=cfg.length_penalty,
        repetition_penalty=cfg.repetition_penalty,
        early_stopping=False,
    )
    new = out[0, len(prompt) :].tolist()
    for i, token in enumerate(new):  # transformers pads after EOS; we stop there
        if token in cfg.eos_token_ids:
            return new[: i + 1]
    return new


def _likeliest_next(llama, prompt: list[int], k: int) -> list[int]:
    with torch.no_grad():
        logits = llama[2](torch.tensor([prompt])).logits[0, -1]
    return logits.topk(k).indices.tolist()


def test_three_eos_ids_among_the_first_candidates(llama):
    # with 2 beams and EOS as the 2nd, 3rd and 4th likeliest first tokens, keeping only 2 × 2
    # candidates leaves one live row (and one finished hypothesis): the next step used to fail
    prompt = [5, 17, 42, 9]
    eos = tuple(_likeliest_next(llama, prompt, 4)[1:])
    cfg = GenerationConfig(max_new_tokens=6, num_beams=2, eos_token_ids=eos)
    assert _ours(llama, prompt, cfg) == _theirs(llama, prompt, cfg)


def test_random_runs_with_three_eos_ids_equal_transformers(llama):
    rng = random.Random(0)
    for run in range(40):
        prompt = [rng.randrange(3, 300) for _ in range(rng.randint(1, 6))]
        # EOS among the likeliest first tokens, so hypotheses end often and early
        eos = tuple(rng.sample(_likeliest_next(llama, prompt, 6), 3))
        cfg = GenerationConfig(
            max_new_tokens=rng.randint(2, 8),
            num_beams=rng.choice([2, 3, 4]),
            length_penalty=rng.choice([1.0, 0.0, 2.0, -0.5]),
            repetition_penalty=rng.choice([1.0, 1.0, 1.5, 0.7]),
            eos_token_ids=eos,
        )
        assert _ours(llama, prompt, cfg) == _theirs(llama, prompt, cfg), f"run {run}: {prompt} {cfg}"
