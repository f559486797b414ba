"""Generation: the CLI's greedy output equals transformers' generate; sampling and beams are deterministic."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import transformers

from swarm.engine.client import ClientModel, generate_local
from swarm.engine.generation import GenerationConfig, apply_repetition_penalty, sample_token
from swarm_utils import cli, local_json

PROMPT = "The capital of France is"


def _swarm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`swarm ARGS` in a process of its own (:func:`swarm_utils.cli` runs a command in this one)."""
    cmd = [sys.executable, "-m", "swarm.cli.main", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _hf_generate(path, prompt_ids: list[int], **kwargs) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long), **kwargs)
    new = out[0, len(prompt_ids) :].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for i, t in enumerate(new):  # transformers pads after EOS; we stop there
        if t in eos:
            return new[: i + 1]
    return new


@pytest.mark.slow
def test_cli_local_greedy_equals_transformers(tiny_checkpoint):
    result = local_json(["--model", str(tiny_checkpoint), "--max-new-tokens", "12", PROMPT])
    expected = _hf_generate(tiny_checkpoint, result["prompt_ids"], max_new_tokens=12, do_sample=False)
    assert result["token_ids"] == expected
    assert len(expected) > 1


@pytest.mark.slow
def test_cli_streams_plain_text(tiny_checkpoints):
    """A `swarm generate` process's stdout: the streamed text, as --json gives it."""
    path = tiny_checkpoints["llama"]
    plain = _swarm("generate", "--local", "--model", str(path), "--max-new-tokens", "12", PROMPT)
    data = local_json(["--model", str(path), "--max-new-tokens", "12", PROMPT])
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == data["text"] + "\n"


def test_beam_search_equals_transformers(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    client = ClientModel.load(path)
    prompt = client.encode(PROMPT)
    cfg = GenerationConfig(max_new_tokens=10, num_beams=3, eos_token_ids=client.eos_token_ids)
    ours = generate_local(client, prompt, cfg)
    expected = _hf_generate(path, prompt, max_new_tokens=10, num_beams=3, do_sample=False, early_stopping=False)
    assert ours == expected
    assert generate_local(client, prompt, cfg) == ours


def test_repetition_penalty_greedy_equals_transformers(tiny_checkpoints):
    path = tiny_checkpoints["qwen2"]
    client = ClientModel.load(path)
    prompt = client.encode(PROMPT)
    cfg = GenerationConfig(max_new_tokens=12, repetition_penalty=1.5, eos_token_ids=client.eos_token_ids)
    expected = _hf_generate(path, prompt, max_new_tokens=12, do_sample=False, repetition_penalty=1.5)
    assert generate_local(client, prompt, cfg) == expected


def test_sampling_is_deterministic_with_seed(tiny_checkpoints):
    client = ClientModel.load(tiny_checkpoints["bloom"])
    prompt = client.encode(PROMPT)
    runs = {}
    for seed in (1, 1, 2):
        cfg = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=seed)
        runs.setdefault(seed, []).append(generate_local(client, prompt, cfg))
    assert runs[1][0] == runs[1][1]
    assert runs[1][0] != runs[2][0], "different seeds should (almost surely) sample differently"


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    picks = {int(sample_token(logits, GenerationConfig(do_sample=True, top_k=2), 0, p)[0]) for p in range(200)}
    assert picks == {0, 1}
    # softmax mass: 0.636, 0.234, 0.086, ...; top_p 0.8 keeps the first two tokens
    picks = {int(sample_token(logits, GenerationConfig(do_sample=True, top_p=0.8), 0, p)[0]) for p in range(200)}
    assert picks == {0, 1}


def test_repetition_penalty_formula():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_bad_generation_flags_are_clear(tiny_checkpoints):
    proc = cli(["generate", "--local", "--model", str(tiny_checkpoints["llama"]), "--top-p", "1.5", PROMPT])
    assert proc.exit_code == 1 and "--top-p must be in (0, 1]" in proc.stderr
    with pytest.raises(ValueError, match="--num-beams or sampling"):
        GenerationConfig(num_beams=2, do_sample=True)


@pytest.mark.slow
def test_missing_model_and_offline_hub_fail_fast(tmp_path):
    proc = cli(["generate", "--local", "--model", str(tmp_path / "nope"), PROMPT])
    assert proc.exit_code == 1 and "no such checkpoint directory" in proc.stderr
    # a process of its own: the hub client reads HF_HUB_OFFLINE when it is imported
    proc = _swarm("generate", "--local", "--model", "some-org/some-model", PROMPT, timeout=60)
    assert proc.returncode == 1
    assert "could not fetch it from the Hugging Face Hub" in proc.stderr and "--model DIR" in proc.stderr


@pytest.mark.slow
def test_swarm_commands_without_peers_say_what_to_pass(tiny_checkpoints, tmp_path):
    proc = cli(["serve", "--model", str(tiny_checkpoints["llama"]), "--blocks", "0:2"], tmp_path)
    assert proc.exit_code == 1 and "--initial-peers" in proc.stderr and "--new-swarm" in proc.stderr
    proc = cli(["status"], tmp_path)
    assert proc.exit_code == 1 and "--initial-peers" in proc.stderr
    proc = cli(["serve", "--model", str(tiny_checkpoints["llama"]), "--blocks", "3:9", "--new-swarm"], tmp_path)
    assert proc.exit_code == 1 and "--blocks 3:9: this model has blocks 0:4" in proc.stderr


def test_scores_are_the_models_log_probabilities(tiny_checkpoints, monkeypatch):
    """``generate(scores=...)``: each new token's log-probability (and the prompt's, after a
    prompt adapter's virtual tokens) is the whole model's log-softmax at that position, the top
    alternatives in order; the tokens are those of a run without scores."""
    from swarm.engine import generation
    from swarm.engine.checkpoint import Checkpoint
    from swarm.engine.generation import LocalSession, generate, score_prompt

    monkeypatch.setattr(generation, "PROMPT_SCORE_ROWS", 2)  # the prompt scored over several LM-head calls
    checkpoint = Checkpoint(tiny_checkpoints["llama"])
    head, blocks = checkpoint.load_head(torch.float32), checkpoint.load_blocks(0, checkpoint.num_blocks)
    prefix = torch.randn(3, checkpoint.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ids = [5, 17, 42, 8, 99, 23]
    cfg = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.7, seed=3)

    class Scores:
        top = 4

        def __init__(self):
            self.tokens, self.prompt = [], None

        def on_token(self, lp):
            self.tokens.append(lp)

        def on_prompt(self, lps):
            self.prompt = lps

    def open_session(batch, max_length):
        return LocalSession(blocks, batch, max_length)

    scores = Scores()
    new = generate(head, open_session, ids, cfg, prefix=prefix, scores=scores)
    assert new == generate(head, open_session, ids, cfg, prefix=prefix)
    assert [lp.token for lp in scores.prompt] == ids[1:] and [lp.token for lp in scores.tokens] == new
    assert score_prompt(head, open_session, ids, 4, prefix) == scores.prompt  # the prompt alone, nothing generated
    with torch.no_grad():
        whole = head.logits(blocks(head.embed(torch.tensor([ids + new]), prefix=prefix)))[0].log_softmax(-1)[3:]
    for i, lp in enumerate(scores.prompt + scores.tokens):
        assert lp.logprob == pytest.approx(whole[i, lp.token].item(), abs=1e-4)
        values, top_ids = whole[i].topk(4)
        assert [t for t, _ in lp.top] == top_ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)
