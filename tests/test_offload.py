"""The offloading baseline (scripts/offload.py) computes what the blocks held in memory compute:
its logits equal an in-memory run's over a chunked prefill, decode steps and a stateless forward,
while every pass reads every block from the file again, in both ways of reading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import VOCAB, write_tiny_checkpoint
from offload import OffloadedModel, StreamedCheckpoint  # scripts/offload.py (pytest's pythonpath)
from swarm.engine import checkpoint as engine_checkpoint
from swarm.engine.checkpoint import Checkpoint
from swarm.engine.client import local_sessions
from swarm.engine.generation import GenerationConfig, generate


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("offload"), "llama")


def test_streamed_reads_equal_the_memory_map(tiny_llama):
    mapped, streamed = Checkpoint(tiny_llama), StreamedCheckpoint(tiny_llama)
    keys = mapped.tensor_names()
    a, b = mapped.read(keys, torch.float32), streamed.read(keys, torch.float32)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in keys)


@pytest.mark.parametrize(
    "mode, dtype, fast, prefetch",
    [
        ("mmap", torch.float32, False, True),
        ("stream", torch.float32, False, True),
        ("stream", torch.bfloat16, True, False),
        ("mmap", torch.bfloat16, False, False),
    ],
)
def test_offloaded_logits_equal_in_memory(tiny_llama, monkeypatch, mode, dtype, fast, prefetch):
    monkeypatch.setattr(engine_checkpoint, "PREFILL_CHUNK", 4)  # the 10-token prefill runs in 3 chunks
    ckpt = Checkpoint(tiny_llama)
    # the same kernels as the offloaded blocks (packed or not: float32 packed sums in another order)
    head, blocks = ckpt.load_head(dtype), ckpt.load_blocks(0, ckpt.num_blocks, dtype, fast=fast)
    model = OffloadedModel(tiny_llama, dtype, mode, fast=fast, prefetch=prefetch)
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    ref_kv, offloaded = blocks.open_session(2, 16), model.open_session(2, 16)
    with torch.no_grad():
        ref = head.logits(blocks(head.embed(ids), ref_kv))
        got = model.head.logits(offloaded.step(model.head.embed(ids)))
        assert torch.equal(got, ref)
        for _ in range(3):
            token = ref[:, -1:].argmax(-1)
            ref = head.logits(blocks(head.embed(token), ref_kv))
            got = model.head.logits(offloaded.step(model.head.embed(token)))
            assert torch.equal(got, ref)
        assert torch.equal(model.run(model.head.embed(ids)), blocks(head.embed(ids)))  # stateless
    assert model.stats.blocks == 5 * ckpt.num_blocks  # every pass read every block again
    offloaded.close()


def test_generation_through_offloaded_sessions_equals_local(tiny_llama):
    ckpt = Checkpoint(tiny_llama)
    head, blocks = ckpt.load_head(), ckpt.load_blocks(0, ckpt.num_blocks)
    model = OffloadedModel(tiny_llama, torch.float32, "stream")
    cfg = GenerationConfig(max_new_tokens=5, num_beams=2)  # beams: the cache rows get reordered
    prompt = [5, 17, 42, 7]
    assert generate(model.head, model.open_session, prompt, cfg) == generate(head, local_sessions(blocks), prompt, cfg)
