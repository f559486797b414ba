"""Devices without a GPU: the choices (``--device`` parsing, a range split over GPUs) table-tested;
placement checked on PyTorch's ``meta`` device standing in for a GPU (an op mixing a CPU tensor
with a meta one fails, as it would with a CUDA one, so every tensor a step makes must be made
where its block is: masks, RoPE tables, ALiBi biases, caches, LoRA tensors, decode padding);
bitsandbytes' own layers, which a GPU server uses, built and run on bitsandbytes' CPU backend;
the float16 guard; and the one-line errors of ``--device cuda`` where there is no GPU."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, NEW_FAMILIES, write_tiny_checkpoint
from swarm.engine import fast
from swarm.engine.adapters import AdapterSpec, LocalBlocks, attach, init_lora, resolve_targets
from swarm.engine.checkpoint import FLOAT16_LIMIT, Checkpoint, DeviceHead, _guard
from swarm.engine.devices import block_devices, gpu_count, parse_device, split_range
from swarm.engine.memory import device_capacities
from swarm.engine.quant import gpu_linear, quantization
from swarm_utils import cli

CPU, META = torch.device("cpu"), torch.device("meta")
C0, C1, C2 = (torch.device("cuda", i) for i in range(3))


@pytest.mark.parametrize(
    ("spec", "gpus", "expected"),
    [
        ("auto", 0, (CPU,)),
        ("auto", 2, (C0,)),
        ("cpu", 2, (CPU,)),
        ("cuda", 1, (C0,)),
        ("cuda:1", 2, (C1,)),
        ("CUDA:0, cuda:2", 3, (C0, C2)),
        ("cuda:2,cuda:0", 3, (C2, C0)),
    ],
)
def test_parse_device(spec, gpus, expected):
    assert parse_device(spec, gpus) == expected


@pytest.mark.parametrize(
    ("spec", "gpus", "words"),
    [
        ("cuda", 0, "no GPU"),
        ("cuda:0,cuda:1", 0, "no GPU"),
        ("cuda:1", 1, "no cuda:1 here"),
        ("cuda:0,cuda:0", 2, "twice"),
        ("gpu", 1, "must be auto, cpu"),
        ("cpu,cuda:0", 1, "must be auto, cpu"),
        ("cuda:x", 1, "must be auto, cpu"),
        ("", 1, "must be auto, cpu"),
    ],
)
def test_parse_device_refuses_in_one_line(spec, gpus, words):
    with pytest.raises(ValueError, match="--device") as info:
        parse_device(spec, gpus)
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("count", "capacities", "shares"),
    [
        (4, [4], [4]),
        (4, [10, 10], [2, 2]),
        (5, [10, 10], [3, 2]),  # the rounding's block to the first of equals
        (6, [2, 10], [1, 5]),
        (6, [1, 100], [0, 6]),  # a device with little room may get none
        (12, [4, 8], [4, 8]),  # full: each its capacity
        (7, [3, 3, 3], [3, 2, 2]),
        (0, [3, 3], [0, 0]),
    ],
)
def test_split_range(count, capacities, shares):
    got = split_range(count, capacities)
    assert got == shares and sum(got) == count
    assert all(s <= c for s, c in zip(got, capacities))


def test_split_range_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        split_range(9, [4, 4])


def test_block_devices_are_consecutive_runs():
    assert block_devices(3, (CPU,)) == [CPU] * 3
    assert block_devices(5, (C0, C1), [10, 10]) == [C0, C0, C0, C1, C1]
    assert block_devices(4, (C0, C1)) == [C0, C0, C1, C1]


def test_device_capacities_share_memory_among_devices(tiny_checkpoints):
    ckpt = Checkpoint(tiny_checkpoints["llama"])
    one = device_capacities(ckpt, torch.float32, (CPU,), 0.75, 64)
    two = device_capacities(ckpt, torch.float32, (CPU, CPU), 1.5, 64)  # 1.5 GB over two: 0.75 each
    assert two == one * 2 and one[0] >= 1


def _on_meta(checkpoint, devices):
    ckpt = Checkpoint(checkpoint)
    capacities = [1, ckpt.num_blocks - 1] if len(devices) > 1 else None  # split: the first block on the first
    blocks = ckpt.load_blocks(0, ckpt.num_blocks, torch.float32, devices=devices, capacities=capacities)
    blocks.io_device = META
    return ckpt, blocks


@pytest.fixture
def meta_ops(monkeypatch):
    """What meta tensors cannot do: compare values (batch invariance is measured, on a real
    device, by comparing outputs) and find routed tokens (a mixture of experts' ``where``)."""
    import torch.fx.experimental._config as fx_config

    monkeypatch.setattr(fast, "_measure_invariance", lambda linear, dtype: 4)
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        yield


@pytest.mark.parametrize("family", FAMILIES + NEW_FAMILIES)
@pytest.mark.parametrize("split", [False, True], ids=["one-device", "cpu-then-meta"])
def test_a_step_runs_where_its_blocks_are(family, split, meta_ops, tmp_path):
    """Every path of a step (prefill, decode, chunks after the cache, a beam reorder, a batched
    pass of several sessions, a stateless pass, a LoRA and a deep prompt lent from the CPU)
    runs with the blocks on another device; split: the first block on the CPU, the rest there
    (a pipeline inside a server)."""
    ckpt, blocks = _on_meta(write_tiny_checkpoint(tmp_path, family), (CPU, META) if split else (META,))
    assert blocks.block_devices == ([CPU] + [META] * (ckpt.num_blocks - 1) if split else [META] * ckpt.num_blocks)
    hidden = torch.randn(2, 6, ckpt.config.hidden_size)
    tensors = init_lora(ckpt, resolve_targets(ckpt, None), rank=2, seed=0)
    tensors["1.prompt"] = torch.zeros(2, ckpt.config.hidden_size)
    tensors = {k: v.requires_grad_(True) for k, v in tensors.items()}
    with torch.no_grad():
        session = blocks.open_session(batch=2, max_length=32)
        assert {k.device for k in session.keys} == set(blocks.block_devices)
        assert blocks(hidden[:, :5], session).device == META
        assert blocks(hidden[:, 5:], session, hypo_ids=torch.tensor([1, 0])).device == META
        assert blocks(hidden[:, :3], session).shape == (2, 3, ckpt.config.hidden_size)
        assert blocks(hidden).device == META
        attach(blocks)
        a, b = blocks.open_session(batch=1, max_length=16), blocks.open_session(batch=1, max_length=16)
        outs = blocks.run_batch([(hidden[:1, :4], a), (hidden[1:, :1], b)])
        outs += blocks.run_batch([(hidden[:1, :1], a), (hidden[1:, :1], b)], per_position=[False, False])
        outs += blocks.run_batch([(hidden[:1, :3], a)], per_position=[True])
        assert all(o.device == META for o in outs)
    out = LocalBlocks(blocks)(hidden, tensors, AdapterSpec(dropout=0.1, seed=3))
    assert out.device == META and out.requires_grad


def test_a_head_on_a_device_takes_and_gives_cpu_tensors(tiny_checkpoints):
    ckpt = Checkpoint(tiny_checkpoints["llama"])
    plain = ckpt.load_head(torch.float32, fast=False)
    moved = DeviceHead(ckpt.load_head(torch.float32, fast=False), CPU)  # the wrapper a GPU client's head has
    ids = torch.tensor([[5, 6, 7]])
    prefix = torch.randn(2, ckpt.config.hidden_size, requires_grad=True)
    hidden = moved.embed(ids, prefix)
    assert torch.equal(hidden, plain.embed(ids, prefix)) and hidden.device == CPU
    assert torch.equal(moved.logits(hidden), plain.logits(hidden))
    moved.logits(hidden).sum().backward()
    assert prefix.grad is not None and moved.max_positions == plain.max_positions


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_bitsandbytes_layers_of_a_gpu_server(quant, tiny_checkpoints):
    """The layers a GPU server's ``--quant`` gives (bitsandbytes' ``Linear8bitLt``/``Linear4bit``),
    run here on bitsandbytes' CPU backend: close to the float layer, gradients to the input,
    recognised as quantized, and int8's never pooled across sessions (its outlier columns
    depend on every row of a call)."""
    torch.manual_seed(0)
    weight, bias = torch.randn(128, 64) * 0.05, torch.randn(128)
    layer = gpu_linear(quant, weight, bias, CPU)
    x = torch.randn(2, 5, 64, requires_grad=True)
    out = layer(x)
    ref = torch.nn.functional.linear(x, weight, bias)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < (0.02 if quant == "int8" else 0.1)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    module = torch.nn.Sequential(layer)
    assert quantization(module) == quant
    assert fast.invariant_rows(layer, torch.float32) == (1 if quant == "int8" else fast.invariant_rows(layer, torch.float32))


def test_float16_hidden_states_stay_finite(tiny_checkpoints):
    """A block output that outgrows float16 becomes the largest finite values, not inf (which
    would turn the rest of the chain into NaN); finite values, and other dtypes, stay as they are."""
    ckpt = Checkpoint(tiny_checkpoints["llama"])
    blocks = ckpt.load_blocks(0, ckpt.num_blocks, torch.float16, fast=False)
    first = blocks.blocks[0]
    first.register_forward_hook(lambda module, args, out: out * 1e6 if module.overflow else out)
    hidden = torch.randn(1, 4, ckpt.config.hidden_size)
    with torch.no_grad():
        first.overflow = False
        calm = blocks(hidden)
        first.overflow = True
        loud = blocks(hidden)
    assert torch.isfinite(calm).all() and torch.isfinite(loud).all()
    assert loud.abs().max() >= 60000 and calm.abs().max() < 1000
    ramp = torch.tensor([float("inf"), -float("inf"), 3.0, -70000.0, 65000.0])
    assert _guard(ramp.half()).tolist() == [FLOAT16_LIMIT, -FLOAT16_LIMIT, 3.0, -FLOAT16_LIMIT, 64992.0]
    assert _guard(ramp).tolist() == ramp.tolist()
    assert _guard(torch.tensor([float("nan")]).half()).isnan().all()  # a NaN is not hidden


requires_no_gpu = pytest.mark.skipif(gpu_count() > 0, reason="this machine has a GPU")


@requires_no_gpu
@pytest.mark.parametrize(
    "args",
    [
        ["generate", "hi", "--local", "--device", "cuda"],
        ["generate", "hi", "--device", "cuda:0", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"],
        ["serve", "--new-swarm", "--device", "cuda"],
        ["finetune", "data.jsonl", "--output", "out", "--local", "--device", "cuda"],
        ["api", "--local", "--device", "cuda"],
    ],
    ids=["generate-local", "generate", "serve", "finetune", "api"],
)
def test_cuda_without_a_gpu_is_one_line(args, tmp_path):
    (tmp_path / "data.jsonl").write_text('{"text": "a b c"}\n')
    args = [str(tmp_path / a) if a in ("data.jsonl", "out") else a for a in args]
    result = cli(args, tmp_path)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device" in lines[0] and "no GPU" in lines[0], result.stderr


def test_a_server_announces_its_device_and_status_shows_it():
    from swarm.cli.render import _weights
    from swarm.engine.devices import devices_label
    from swarm.p2p.table import MAX_NAME, ServerInfo

    assert devices_label((CPU,)) == "cpu"
    base = ServerInfo("12D3KooWpeer", ("/ip4/1.2.3.4/tcp/1",), "m", 0, 2).to_wire()
    assert ServerInfo.from_wire(base).device == "cpu"
    assert ServerInfo.from_wire({**base, "device": "NVIDIA L4"}).device == "NVIDIA L4"
    assert len(ServerInfo.from_wire({**base, "device": "x" * 1000}).device) <= MAX_NAME
    assert ServerInfo.from_wire({k: v for k, v in base.items() if k != "device"}).device == ""  # an older server
    assert _weights({"dtype": "bfloat16", "weight_bytes": 2**30, "device": "NVIDIA L4"}) == "bfloat16 1.00 GB on NVIDIA L4"
    assert _weights({"dtype": "float32", "weight_bytes": 2**30, "device": "cpu"}) == "float32 1.00 GB"


def test_a_move_reuses_the_blocks_both_ranges_hold(tiny_checkpoints):
    """A server moving on one device loads only the blocks its new range adds (the old range's
    draining sessions share the rest), so a server sized to its GPU's memory can move at all."""
    from types import SimpleNamespace

    from swarm.p2p.placement import load_range
    from swarm.p2p.server_config import ServerConfig

    path = tiny_checkpoints["llama"]
    server = SimpleNamespace(cfg=ServerConfig(model_dir=path, device="cpu"), checkpoint=Checkpoint(path), blocks=None)
    server.blocks = load_range(server, 0, 3)
    read = len(server.checkpoint.keys_read)
    moved = load_range(server, 1, 4)
    assert (moved.start, moved.end) == (1, 4) and moved.block_devices == [CPU] * 3
    assert [id(b) for b in moved.blocks[:2]] == [id(b) for b in server.blocks.blocks[1:]]
    # sessions are drained by the range they opened on, not by their blocks (which both ranges hold)
    assert server.blocks.sub(1, 3).root is server.blocks and moved.sub(1, 3).root is moved
    new_keys = server.checkpoint.keys_read[read:]
    assert new_keys and all(k.startswith("model.layers.3.") for k in new_keys)
    fresh = Checkpoint(path).load_blocks(1, 4)
    x = torch.randn(1, 5, fresh.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(moved(x), fresh(x))
    server.blocks = moved
    back = load_range(server, 0, 3)  # and back: block 0 anew, 1 and 2 shared
    assert [id(b) for b in back.blocks[1:]] == [id(b) for b in moved.blocks[:2]]
    far = load_range(server, 1, 4)
    assert (far.start, far.end) == (1, 4)
