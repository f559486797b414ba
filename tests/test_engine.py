"""The engine against transformers (the oracle), per family, in float32."""

from __future__ import annotations

import pytest
import torch
import transformers

from swarm.cache import CacheFullError, KVCacheBudget
from swarm.engine.checkpoint import Checkpoint
from swarm.engine.families import UnsupportedModelError, get_family

from conftest import write_tiny_checkpoint

TOL = 1e-4
# prefill, three single-token steps, then a multi-token chunk after the cache, then one more step
STEPS = [7, 1, 1, 1, 4, 1]


def _tokens(total: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (2, total), generator=g)


def _engine_logits(ckpt: Checkpoint, ids: torch.Tensor, ranges) -> list[torch.Tensor]:
    head = ckpt.load_head()
    parts = [ckpt.load_blocks(a, b) for a, b in ranges]
    sessions = [p.open_session(batch=ids.shape[0], max_length=ids.shape[1]) for p in parts]
    out, pos = [], 0
    with torch.no_grad():
        for n in STEPS:
            hidden = head.embed(ids[:, pos : pos + n])
            for part, session in zip(parts, sessions):
                hidden = part(hidden, session)
            out.append(head.logits(hidden))
            pos += n
    return out


def test_logits_match_transformers(tiny_checkpoint):
    ckpt = Checkpoint(tiny_checkpoint)
    ids = _tokens(sum(STEPS))
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    expected, pos, past = [], 0, transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        for n in STEPS:
            result = model(ids[:, pos : pos + n], past_key_values=past, use_cache=True)
            expected.append(result.logits.float())
            past, pos = result.past_key_values, pos + n
    got = _engine_logits(ckpt, ids, [(0, ckpt.num_blocks)])
    for step, (a, b) in enumerate(zip(got, expected)):
        diff = (a - b).abs().max().item()
        assert diff <= TOL, f"step {step} ({STEPS[step]} tokens): max abs diff {diff}"


def test_split_ranges_equal_whole(tiny_checkpoint):
    ckpt = Checkpoint(tiny_checkpoint)
    ids = _tokens(sum(STEPS), seed=2)
    whole = _engine_logits(ckpt, ids, [(0, 4)])
    for ranges in ([(0, 1), (1, 4)], [(0, 2), (2, 4)], [(0, 1), (1, 2), (2, 3), (3, 4)]):
        split = _engine_logits(Checkpoint(tiny_checkpoint), ids, ranges)
        for a, b in zip(whole, split):
            assert torch.equal(a, b), f"ranges {ranges} differ from [0, 4)"


def test_stateless_forward_equals_cached_prefill(tiny_checkpoint):
    ckpt = Checkpoint(tiny_checkpoint)
    blocks = ckpt.load_blocks(0, ckpt.num_blocks)
    hidden = ckpt.load_head().embed(_tokens(9))
    with torch.no_grad():
        stateless = blocks(hidden)
        cached = blocks(hidden, blocks.open_session(batch=2, max_length=9))
    assert torch.equal(stateless, cached)


def test_stateless_forward_of_many_rows_runs_in_groups_with_the_same_result(tiny_checkpoint, monkeypatch):
    ckpt = Checkpoint(tiny_checkpoint)
    blocks = ckpt.load_blocks(0, ckpt.num_blocks)
    hidden = torch.randn(5, 6, ckpt.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = blocks(hidden)
        monkeypatch.setattr("swarm.engine.checkpoint.PREFILL_CHUNK", 12)  # groups of 2 rows: 2 + 2 + 1
        calls = []
        monkeypatch.setattr(blocks, "_run", lambda x, *a, run=blocks._run: calls.append(len(x)) or run(x, *a))
        grouped = blocks(hidden)
    assert calls == [2, 2, 1]
    torch.testing.assert_close(grouped, whole, rtol=1e-4, atol=1e-4)  # other matrix shapes: other rounding


def test_range_loader_reads_only_its_tensors(tiny_checkpoint):
    ckpt = Checkpoint(tiny_checkpoint)
    prefix = ckpt.family.block_prefix
    ckpt.load_blocks(1, 3)
    assert ckpt.keys_read, "nothing was read"
    assert all(k.startswith((prefix(ckpt.config, 1), prefix(ckpt.config, 2))) for k in ckpt.keys_read), ckpt.keys_read
    expected_blocks = {prefix(ckpt.config, 1), prefix(ckpt.config, 2)}
    assert {p for p in expected_blocks if any(k.startswith(p) for k in ckpt.keys_read)} == expected_blocks

    client = Checkpoint(tiny_checkpoint)
    client.load_head()
    assert client.keys_read
    assert not any(".h." in k or "layers." in k or k.startswith("h.") for k in client.keys_read), client.keys_read


def test_sharded_checkpoint_loads_same_tensors(tmp_path):
    path = tmp_path / "sharded"
    write_tiny_checkpoint(path, "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    model.save_pretrained(tmp_path / "sharded2", max_shard_size="100KB")
    sharded = Checkpoint(tmp_path / "sharded2")
    assert (tmp_path / "sharded2" / "model.safetensors.index.json").exists()
    single = Checkpoint(path)
    a, b = single.load_blocks(2, 4), sharded.load_blocks(2, 4)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_bad_range_and_shapes_are_clear_errors(tiny_checkpoints):
    ckpt = Checkpoint(tiny_checkpoints["llama"])
    with pytest.raises(ValueError, match=r"block range 3:9 is not within this model's 4 blocks"):
        ckpt.load_blocks(3, 9)
    blocks = ckpt.load_blocks(0, 2)
    with pytest.raises(ValueError, match=r"hidden states must have shape \[batch, seq ≥ 1, 64\]"):
        blocks(torch.zeros(1, 3, 65))
    session = blocks.open_session(batch=1, max_length=4)
    with pytest.raises(ValueError, match="max_length 4"):
        blocks(torch.zeros(1, 5, 64), session)
    with pytest.raises(ValueError, match="batch 1"):
        blocks(torch.zeros(2, 1, 64), session)


def test_unsupported_model_type_lists_supported():
    with pytest.raises(UnsupportedModelError, match="supported model types: bloom, falcon, gemma2, gemma3, gemma3_text, llama, mistral, mixtral, phi3, qwen2, qwen3, qwen3_moe"):
        get_family("gpt2")


def test_kv_budget_exhaustion_and_release(tiny_checkpoints):
    blocks = Checkpoint(tiny_checkpoints["llama"]).load_blocks(0, 2)
    budget = KVCacheBudget(max_tokens=100)
    first = blocks.open_session(batch=2, max_length=40, budget=budget)
    assert budget.tokens_left == 20
    with pytest.raises(CacheFullError, match=r"needs 32 tokens .* only 20 of 100 are free.*--cache-tokens"):
        blocks.open_session(batch=1, max_length=32, budget=budget)
    assert budget.tokens_left == 20, "a refused session must take nothing"
    first.close()
    first.close()  # idempotent
    assert budget.tokens_left == 100
    with blocks.open_session(batch=1, max_length=100, budget=budget):
        assert budget.tokens_left == 0
    assert budget.tokens_left == 100


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 500000.0,
    }
    path = write_tiny_checkpoint(tmp_path / "l3", "llama", rope_parameters=scaling, tie_word_embeddings=True)
    ckpt = Checkpoint(path)
    assert ckpt.config.rope_scaling["rope_type"] == "llama3"
    ids = _tokens(20)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        expected = model(ids).logits
        head, blocks = ckpt.load_head(), ckpt.load_blocks(0, 4)
        got = head.logits(blocks(head.embed(ids)))
    assert (got - expected).abs().max().item() <= TOL
