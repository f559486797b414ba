"""The model's context length (``max_position_embeddings``): a prompt that does not fit is refused at
once, locally, in the engine and before `swarm generate` touches the network; one that fits stops
generating when the context is full."""

from __future__ import annotations

import socket
import time

import pytest
import torch
import transformers

from swarm.engine.checkpoint import Checkpoint
from swarm.engine.generation import GenerationConfig, LocalSession, generate
from swarm_utils import run_swarm

CONTEXT = 256  # the tiny checkpoints' max_position_embeddings
# a peer id that nobody holds: the client would have to dial it to learn so
BOGUS_PEER = "12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"


def _engine(path):
    ckpt = Checkpoint(path)
    blocks = ckpt.load_blocks(0, ckpt.num_blocks)
    opened = []

    def open_session(batch: int, max_length: int) -> LocalSession:
        opened.append(max_length)
        return LocalSession(blocks, batch, max_length)

    return ckpt.load_head(), open_session, opened


def _transformers(path, prompt: list[int], **kwargs) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # as ours: no stop token
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_config_states_the_context(family, tiny_checkpoints):
    assert Checkpoint(tiny_checkpoints[family]).config.max_positions == CONTEXT


@pytest.mark.parametrize("num_beams", [1, 3])
def test_engine_refuses_a_prompt_that_fills_the_context(num_beams, tiny_checkpoints):
    head, open_session, opened = _engine(tiny_checkpoints["llama"])
    cfg = GenerationConfig(max_new_tokens=4, num_beams=num_beams)
    for length in (CONTEXT, CONTEXT + 50):
        with pytest.raises(ValueError, match=f"the prompt is {length} tokens.*holds {CONTEXT}.*at most {CONTEXT - 1}"):
            generate(head, open_session, [5] * length, cfg)
    assert opened == []


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_stops_when_the_context_is_full(num_beams, tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    head, open_session, opened = _engine(path)
    prompt = [(7 * i) % 300 + 3 for i in range(CONTEXT - 5)]
    # no EOS, so only the context can stop it before max_new_tokens
    ours = generate(head, open_session, prompt, GenerationConfig(max_new_tokens=20, num_beams=num_beams))
    assert opened == [CONTEXT]
    assert ours == _transformers(path, prompt, max_new_tokens=5, num_beams=num_beams, early_stopping=False)


def test_bloom_has_no_fixed_context(tiny_checkpoints):
    head, open_session, _ = _engine(tiny_checkpoints["bloom"])
    assert head.max_positions is None
    assert len(generate(head, open_session, [5] * (CONTEXT + 10), GenerationConfig(max_new_tokens=3))) == 3


def test_cli_refuses_a_long_prompt_before_any_network(tmp_path, tiny_checkpoints):
    model = str(tiny_checkpoints["llama"])
    prompt = "Paris " * (2 * CONTEXT)
    # a peer that accepts TCP connections and never answers: any dial would show up here
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        peer = f"/ip4/127.0.0.1/tcp/{listener.getsockname()[1]}/p2p/{BOGUS_PEER}"
        for mode in (["--local"], ["--initial-peers", peer, "--timeout", "60"]):
            start = time.monotonic()
            proc = run_swarm(["generate", "--model", model, *mode, prompt], tmp_path, timeout=60)
            elapsed = time.monotonic() - start
            assert proc.returncode == 1, proc.stderr
            assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
            assert f"this model's context holds {CONTEXT}" in proc.stderr and "shorten the prompt" in proc.stderr
            assert elapsed < 30, elapsed  # the process's start-up only, far below --timeout
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_a_long_prompt_is_refused_before_the_model_loads(tmp_path, tiny_checkpoints):
    """The first check needs only config.json and tokenizer.json (no torch, no weights, no
    network): a directory holding just those refuses the prompt with the context error, not with
    an error about the missing weights."""
    import shutil

    source = tiny_checkpoints["llama"]
    bare = tmp_path / "config-and-tokenizer-only"
    bare.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(source / name, bare / name)
    proc = run_swarm(["generate", "--model", str(bare), "--local", "Paris " * (2 * CONTEXT)], tmp_path, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert f"this model's context holds {CONTEXT}" in proc.stderr, proc.stderr
    short = run_swarm(["generate", "--model", str(bare), "--local", "Paris"], tmp_path, timeout=60)
    assert short.returncode == 1 and "context" not in short.stderr, short.stderr  # a prompt that fits goes on
