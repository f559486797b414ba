"""Quantized blocks (engine/quant.py): the layers' math, gradients after inference (bitsandbytes'
repack trap), per-block quantization, routing that avoids quantized servers, and a mixed swarm
(one nf4 server, two bfloat16 ones) that equals local blocks with the same precisions, for
inference and for LoRA gradients (also after the nf4 server has served inference)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import write_tiny_checkpoint
from server_utils import eventually
from swarm.engine.adapters import AdapterSpec, LocalBlocks, attach, init_lora, resolve_targets
from swarm.engine.checkpoint import Checkpoint
from swarm.engine.generation import LocalSession
from swarm.engine.memory import block_bytes
from swarm.engine.quant import Int8Linear, NF4Linear, QuantLinear, quantize_linears, weight_bytes
from swarm.p2p.client import ClientConfig, SwarmClient
from swarm.p2p.loop import BackgroundLoop
from swarm.p2p.remote_blocks import RemoteBlocks
from swarm.p2p.routing import NoRouteError, QuantizedOnlyError, find_chain
from swarm.p2p.server import BlockServer, ServerConfig
from swarm.p2p.table import ServerInfo, model_id

pytest.importorskip("bitsandbytes")

# relative error of one layer's output against float32, by precision (REFERENCE §8: 1.2e-2, 9.3e-2)
LAYER_ERROR = {Int8Linear: 0.03, NF4Linear: 0.12}


@pytest.mark.parametrize("cls", [Int8Linear, NF4Linear])
def test_quantized_linear_math_and_gradients(cls):
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 128, generator=g) * 0.05, torch.randn(96, generator=g)
    layer = cls(weight, bias)
    x = torch.randn(2, 5, 128, generator=g)
    want = F.linear(x, weight, bias)
    with torch.no_grad():
        out = layer(x)
    assert out.shape == want.shape and out.dtype == x.dtype
    assert (out - want).norm() / want.norm() < LAYER_ERROR[cls]
    # a pass with gradients computes the same output, and its input gradient goes through the
    # dequantized weight; also after inference ran first (bitsandbytes' Linear4bit gives none then)
    xg = x.clone().requires_grad_(True)
    out_g = layer(xg)
    assert torch.equal(out_g.detach(), out)
    grad = torch.randn(out_g.shape, generator=g)
    out_g.backward(grad)
    assert xg.grad is not None
    torch.testing.assert_close(xg.grad, grad @ layer.dequantize(torch.float32), rtol=1e-5, atol=1e-5)
    assert (layer.dequantize(torch.float32) - weight).norm() / weight.norm() < LAYER_ERROR[cls]
    # bfloat16 activations and a lone decode row; no rows at all (nf4's kernel divides by the count)
    with torch.no_grad():
        row = layer(x[:1, :1].to(torch.bfloat16))
        assert layer(x[:0]).shape == (0, 5, 96)
        # a row's output never depends on the other rows of the call (batches split differently
        # on a server's forward and its backward's recomputation), also with an outlier elsewhere
        spiked = x.clone()
        spiked[1, :, 3] = 30.0
        assert torch.equal(layer(spiked)[0], out[0])
    assert row.dtype == torch.bfloat16 and torch.isfinite(row).all()


def test_int8_keeps_outlier_features_in_float():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 128, generator=g) * 0.05
    x = torch.randn(3, 128, generator=g)
    x[:, 7] = 40.0  # one huge feature would crush every other value of its row to 0 in int8
    layer = Int8Linear(weight, None)
    with torch.no_grad():
        out = layer(x)
    want = x @ weight.T
    assert (out - want).norm() / want.norm() < 0.02


def test_zero_rows_and_inputs_stay_finite():
    weight = torch.zeros(32, 64)
    weight[1] = 0.3
    for cls in (Int8Linear, NF4Linear):
        with torch.no_grad():
            out = cls(weight, None)(torch.zeros(2, 64))
        assert torch.equal(out, torch.zeros(2, 32)), cls


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("quant") / "model", "llama", num_hidden_layers=6)


def test_load_blocks_quantizes_the_chosen_blocks_only(tiny):
    checkpoint = Checkpoint(tiny)
    plain = checkpoint.load_blocks(0, 6, torch.bfloat16)
    mixed = checkpoint.load_blocks(0, 6, torch.bfloat16, quant="nf4", quantized=range(2, 4))
    kinds = [{type(m) for m in block.modules() if isinstance(m, QuantLinear)} for block in mixed.blocks]
    assert kinds == [set(), set(), {NF4Linear}, {NF4Linear}, set(), set()]
    assert weight_bytes(mixed) < weight_bytes(plain)
    # the estimate used to size a server (from the files' headers) matches what loading takes
    for quant in ("none", "int8", "nf4"):
        held = weight_bytes(checkpoint.load_blocks(1, 2, torch.bfloat16, quant=quant))
        assert abs(block_bytes(checkpoint, 1, torch.bfloat16, quant) - held) <= 0.02 * held, quant
    # adapters wrap quantized linears like any other; a linear nf4's layout cannot hold stays as it is
    assert quantize_linears(torch.nn.Sequential(torch.nn.Linear(64, 32)), "int8") == 1
    odd = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(48, 40))
    assert quantize_linears(odd, "nf4") == 1 and isinstance(odd[1], torch.nn.Linear)
    attach(mixed)


def _info(peer: str, start: int, end: int, quant: str = "none") -> ServerInfo:
    return ServerInfo(peer_id=peer, addrs=(), model="m", start=start, end=end, throughput=10.0, quant=quant)


def test_full_precision_routes_avoid_quantized_servers():
    fast_nf4 = _info("a", 0, 6, "nf4")
    servers = {"a": fast_nf4, "b": _info("b", 0, 3), "c": _info("c", 3, 6)}
    servers["a"] = ServerInfo(**{**fast_nf4.__dict__, "throughput": 1000.0})
    assert [s.peer_id for s in find_chain(servers, 6)] == ["a"]
    assert [s.peer_id for s in find_chain(servers, 6, full_precision=True)] == ["b", "c"]
    del servers["c"]
    with pytest.raises(QuantizedOnlyError, match=r"block\(s\) 3:6 .* only by nf4 servers.*--no-quant-servers"):
        find_chain(servers, 6, full_precision=True)
    assert [s.peer_id for s in find_chain(servers, 6)] == ["a"]
    # a true gap is an ordinary NoRouteError, not a precision one
    gap = {"b": _info("b", 0, 3), "d": _info("d", 4, 6, "int8")}
    with pytest.raises(NoRouteError) as caught:
        find_chain(gap, 6, full_precision=True)
    assert not isinstance(caught.value, QuantizedOnlyError)


def test_announcements_carry_the_quantization():
    info = ServerInfo.from_wire({**_info("a", 0, 3, "int8").to_wire(), "weight_bytes": 1234})
    assert (info.quant, info.weight_bytes) == ("int8", 1234)
    for bad in ({"quant": "fp3"}, {"quant": 4}, {"weight_bytes": -1}, {"weight_bytes": "12"}, {"weight_bytes": 1.5},
                {"weight_bytes": True}, {"dtype": "int3"}, {"dtype": "x" * 10_000}):
        with pytest.raises(ValueError, match="malformed"):
            ServerInfo.from_wire({**_info("a", 0, 3).to_wire(), **bad})


PRECISIONS = [("0:2", "none"), ("2:4", "nf4"), ("4:6", "none")]


@pytest.fixture(scope="module")
def mixed_swarm(tiny):
    """Three in-process servers on their own loop: blocks 2:4 in nf4, the rest bfloat16."""
    loop = BackgroundLoop()
    servers: list[BlockServer] = []
    try:
        for blocks, quant in PRECISIONS:
            peers = [servers[0].host.addrs[0]] if servers else []
            cfg = ServerConfig(model_dir=tiny, blocks=blocks, dtype="bfloat16", quant=quant, announce_period=1.0,
                               new_swarm=not peers, initial_peers=peers, throughput=100.0, bandwidth=1000.0)
            servers.append(loop.call(BlockServer.start(cfg), timeout=60))
        yield loop, servers
    finally:
        for server in servers:
            loop.call(server.stop(), timeout=30)
        loop.close()


def _local_mixed(tiny) -> tuple[Checkpoint, object]:
    checkpoint = Checkpoint(tiny)
    return checkpoint, checkpoint.load_blocks(0, 6, torch.bfloat16, quant="nf4", quantized=range(2, 4))


def test_mixed_swarm_equals_local_blocks_of_the_same_precisions(tiny, mixed_swarm):
    loop, servers = mixed_swarm
    assert [s.info().quant for s in servers] == ["none", "nf4", "none"]
    assert servers[1].info().weight_bytes < servers[0].info().weight_bytes
    checkpoint, blocks = _local_mixed(tiny)
    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(1, 5, 64, generator=g), torch.randn(1, 1, 64, generator=g), torch.randn(1, 1, 64, generator=g)]
    local = LocalSession(blocks, 1, 16)
    expected = [local.step(x) for x in steps]

    async def scenario(full_precision: bool):
        await eventually(lambda: len(servers[0].table.snapshot()) == 3, what="all servers in the table")
        # the refusal comes after wait_timeout, the last of the retries (on a loaded machine one may find a
        # server unreachable for a moment: a gap, not the refusal); a route that exists may need a ping
        # retried; pings get time (a loaded machine's first ping may be slow, and one that times out leaves a gap)
        cfg = ClientConfig(initial_peers=[servers[0].host.addrs[0]], push=False, full_precision=full_precision,
                           wait_timeout=3.0 if full_precision else 20.0, ping_timeout=10.0)
        client = await SwarmClient.start(model_id(checkpoint), 6, cfg)
        try:
            await eventually(lambda: len(client.table.snapshot()) == 3, what="the client's table")
            chain = await client.open_chain(1, 16)
            try:
                return [await chain.step(x) for x in steps]
            finally:
                await chain.close()
        finally:
            await client.close()

    outputs = loop.call(scenario(False), timeout=60)
    for out, want in zip(outputs, expected):
        assert torch.equal(out.to(want.dtype), want)
    with pytest.raises(QuantizedOnlyError, match="2:4"):
        loop.call(scenario(True), timeout=60)


def test_lora_gradients_through_an_nf4_server_equal_local_autograd(tiny, mixed_swarm):
    """Also after the nf4 server has run inference on the same blocks (the previous test)."""
    loop, servers = mixed_swarm
    checkpoint, blocks = _local_mixed(tiny)
    local = LocalBlocks(attach(blocks))
    head = checkpoint.load_head()
    spec = AdapterSpec(scale=2.0)
    g = torch.Generator().manual_seed(3)
    tensors = init_lora(checkpoint, resolve_targets(checkpoint, "all-linear"), rank=2, seed=0)
    for key, value in tensors.items():
        if key.endswith("lora_B"):
            value.normal_(0, 0.2, generator=g)
    ids = torch.randint(3, 300, (2, 7), generator=g)
    with torch.no_grad():  # inference through the nf4 blocks first, here and on the server
        local(head.embed(ids), {}, spec)

    def grads(run):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}
        logits = head.logits(run(head.embed(ids), leaves, spec).float())
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        return {k: v.grad for k, v in leaves.items()}

    want = grads(local)
    cfg = ClientConfig(request_timeout=10, step_timeout=20, wait_timeout=20)
    with RemoteBlocks.connect(tiny, [servers[0].host.addrs[0]], cfg) as remote:
        got = grads(remote)
    quantized = [k for k in want if k.split(".")[0] in ("2", "3")]
    assert quantized and all(want[k].abs().max() > 0 for k in quantized)
    for key in want:
        scale = want[key].abs().max().item()
        assert (got[key] - want[key]).abs().max().item() <= 1e-4 * scale, key
