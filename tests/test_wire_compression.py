"""Wire dtypes (``--wire-dtype``): the int8 and bfloat16 forms of hidden states on the wire, what
a decoder refuses, and generation and training through in-process servers: equal to a local
simulation that applies the same round trip at every span boundary, unchanged by a failover."""

from __future__ import annotations

import struct
from dataclasses import replace

import msgpack
import pytest
import torch
import torch.nn.functional as F

from conftest import write_tiny_checkpoint
from swarm.engine.adapters import AdapterSpec, LocalBlocks, init_lora
from swarm.engine.checkpoint import Checkpoint
from swarm.engine.client import ClientModel, generate_local
from swarm.engine.generation import GenerationConfig, LocalSession, generate
from swarm.p2p import protocols
from swarm.p2p.client import ClientConfig, SwarmClient
from swarm.p2p.compression import (
    block_size_for,
    encoded_nbytes,
    pack,
    quantize,
    unpack,
)
from swarm.p2p.limits import FrameBudget
from swarm.p2p.loop import BackgroundLoop, run
from swarm.p2p.remote_blocks import RemoteBlocks
from swarm.p2p.server import BlockServer, ServerConfig
from swarm.p2p.streams import Message
from swarm.p2p.table import model_id
from swarm.p2p.wire import PROTOCOL_VERSION, Frame, WireError, decode_body, encode, read_frame, write_frame
from server_utils import eventually, peer
from swarm_utils import swarm_generate

SPEED = {"throughput": 100.0, "bandwidth": 1000.0}  # given: no measurements at start


def _wire(frame: Frame) -> bytes:
    return b"".join(bytes(b) for b in encode(frame))


# ---- the format ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 64), (1, 5, 5120), (3, 4099), (7,), (0, 4, 64)])
def test_round_trips_and_the_int8_error_bound(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    frame = Frame("result", {}, [pack(x, "float32"), pack(x, "bfloat16"), pack(x, "int8")])
    exact, half, q = decode_body(_wire(frame)[4:]).tensors
    assert torch.equal(exact, x) and torch.equal(half, x.bfloat16())
    assert q.dtype == torch.float32 and q.shape == x.shape
    # each block's values are off by at most its absmax / 254 (plus float rounding)
    b = block_size_for(shape)
    assert shape[-1] % b == 0  # blocks never straddle a row
    blocks = x.reshape(-1, b) if x.numel() else x.reshape(0, 1)
    bound = blocks.abs().amax(dim=1, keepdim=True) / 254 * (1 + 1e-5)
    assert ((q.reshape(blocks.shape) - blocks).abs() <= bound).all()
    # idempotent, and slicing commutes with quantizing: replays and forwarding change nothing
    assert torch.equal(unpack(pack(q, "int8")), q)
    if len(shape) == 3 and shape[1] > 1:
        assert torch.equal(unpack(pack(x[:, 1:], "int8")), q[:, 1:])


def test_quantizing_is_idempotent_bit_for_bit():
    """A block's largest value decodes to exactly its absmax, so quantizing what was decoded gives
    the same scales and values (with ``v * (absmax / 127)`` about one block in 200 would not)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4000, 64, generator=g) * 10 ** torch.randint(-8, 8, (1, 4000, 1), generator=g).float()
    q = quantize(x)
    again = quantize(q.dequantize())
    assert torch.equal(again.scales, q.scales) and torch.equal(again.values, q.values)


def test_blocks_of_64_within_rows_and_bytes_per_token():
    x = torch.randn(2, 576)
    q = quantize(x)
    assert q.block_size == 64 and q.scales.shape == (18,) and q.nbytes == 18 * 4 + 1152
    back = decode_body(_wire(Frame("result", {}, [q]))[4:]).tensors[0].reshape(-1)
    for i in range(18):
        part = x.reshape(-1)[64 * i : 64 * (i + 1)]
        assert (back[64 * i : 64 * (i + 1)] - part).abs().max() <= part.abs().max() / 254 * (1 + 1e-5)
    assert quantize(torch.randn(1, 4099)).block_size == 4099  # a prime row: one block
    # only the block size senders use is accepted (another could decode to hidden padding)
    other = quantize(x, block_size=32)
    with pytest.raises(WireError, match="block size 32"):
        decode_body(_wire(Frame("result", {}, [other]))[4:])
    # the default model's hidden state (576 values) per token per hop
    # in blocks of 64 (9 per row): 576 values and 9 scales
    assert [encoded_nbytes((1, 1, 576), w) for w in ("float32", "bfloat16", "int8")] == [2304, 1152, 612]
    assert encoded_nbytes((1, 1, 8192), "int8") == 8192 + 128 * 4


def _int8_body(shape, block_size, scales: list[float], values: bytes, entry=None) -> bytes:
    header = {"v": PROTOCOL_VERSION, "kind": "result", "tensors": [entry or ["int8b", shape, block_size]]}
    h = msgpack.packb(header)
    return struct.pack(">H", len(h)) + h + struct.pack(f"<{len(scales)}f", *scales) + values


@pytest.mark.parametrize(
    "body, message",
    [
        (_int8_body([4], 0, [1.0], b"\x01" * 4), "block size"),
        (_int8_body([4], -2, [1.0], b"\x01" * 4), "block size"),
        (_int8_body([4], 2**30, [1.0], b"\x01" * 4), "block size"),
        (_int8_body([4], "4", [1.0], b"\x01" * 4), "block size"),
        (_int8_body([4], 4, [1.0], b"", entry=["int8b", [4]]), "bad tensor entry"),
        (_int8_body([4], 4, [1.0], b"\x01" * 4, entry=["int8b", [4], 4, 0]), "bad tensor entry"),
        (_int8_body([4], 2, [1.0], b"\x01" * 4), "block size"),  # not the senders' block size
        (_int8_body([4], 4, [1.0], b"\x80\x01\x01\x01"), "-127"),  # -128 decodes past the absmax
        (_int8_body([4], 4, [1.0], b"\x01" * 3), "runs past"),  # truncated values
        (_int8_body([4], 4, [1.0], b"\x01" * 5), "trailing"),  # the shape says fewer values
        (_int8_body([2, -1], 4, [1.0], b""), "bad tensor shape"),
        (_int8_body([4], 4, [float("nan")], b"\x01" * 4), "finite"),
        (_int8_body([4], 4, [float("inf")], b"\x01" * 4), "finite"),
        (_int8_body([4], 4, [-1.0], b"\x01" * 4), "finite"),
    ],
)
def test_hostile_int8_entries_are_refused(body, message):
    with pytest.raises(WireError, match=message):
        decode_body(body)


def test_decoded_bytes_are_bounded_and_counted_in_the_budget():
    """An int8 frame decodes to four times its values' bytes: that counts against the reader's
    maximum frame and its frame budget, like the bytes of any other frame."""
    x = torch.randn(1, 64, 64)
    data = _wire(Frame("result", {}, [pack(x, "int8")]))
    decoded = 4 * x.numel()
    with pytest.raises(WireError, match="decode to"):
        decode_body(data[4:], max_decoded=decoded - 1)

    class OneFrame:  # a stream holding one frame, read under a budget as the server reads
        async def read_message(self, max_bytes, timeout=None, frame_timeout=None, budget=None):
            body = Message(data[4:])
            body.grant = budget.take("p", len(body))
            return body

    budget = FrameBudget(1 << 20, 1 << 20)
    frame = run(read_frame(OneFrame(), max_frame=1 << 20, budget=budget))
    assert budget.used("p") == decoded and torch.allclose(frame.tensors[0], x, atol=0.05)
    frame.release()
    small = FrameBudget(1 << 20, decoded - 1)
    with pytest.raises(WireError, match="at most") as refused:
        run(read_frame(OneFrame(), max_frame=1 << 20, budget=small))
    assert refused.value.code == "busy" and small.used() == 0 and budget.used() == 0


def test_a_server_refuses_an_int8_step_that_decodes_past_its_max_frame(tmp_path):
    model = write_tiny_checkpoint(tmp_path / "m", "llama")

    async def scenario():
        cfg = ServerConfig(model_dir=model, blocks="0:4", new_swarm=True, max_frame=1 << 20, **SPEED)
        server = await BlockServer.start(cfg)
        try:
            async with peer(server.host.addrs[0]) as (host, sp):
                for rows, want in ((4100, "bad_frame"), (4, "result")):  # 4100 × 64 × 4 bytes > 1 MiB
                    stream = await host.open_stream(sp, protocols.FORWARD, timeout=10)
                    hidden = pack(torch.randn(1, rows, 64), "int8")
                    await write_frame(stream, Frame("forward", {"start": 0, "end": 4, "wire": "int8"}, [hidden]), 10)
                    reply = await read_frame(stream, timeout=20)
                    assert (reply.fields.get("code") or reply.kind) == want, reply.fields
                    assert reply.kind == "error" or reply.forms == ["int8b"]  # answered in the request's wire dtype
                    await stream.close()
            await eventually(lambda: server.frames.used() == 0, what="frame bytes given back")
        finally:
            await server.stop()

    run(scenario())


# ---- generation through in-process servers ---------------------------------------------------


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """Servers for blocks 0:2 and 2:4 and a spare 2:4 (float32), in this process."""
    model = write_tiny_checkpoint(tmp_path_factory.mktemp("wire") / "m", "llama")
    background = BackgroundLoop()
    servers = []
    try:
        for blocks in ("0:2", "2:4", "2:4"):
            join = {"initial_peers": [servers[0].host.addrs[0]]} if servers else {"new_swarm": True}
            cfg = ServerConfig(model_dir=model, blocks=blocks, announce_period=1.0, **join, **SPEED)
            servers.append(background.call(BlockServer.start(cfg), timeout=60))
        background.call(eventually(lambda: len(servers[0].table.snapshot()) == 3, what="a full table"), timeout=20)
        yield model, servers, background
    finally:
        for server in servers:
            background.call(server.stop(), timeout=30)
        background.close()


class _Simulated:
    """The swarm's computation in this process: each span's blocks, with the wire dtype's round
    trip on every span's input and on the last span's output."""

    def __init__(self, spans, batch: int, max_length: int, wire: str):
        self.sessions = [LocalSession(blocks, batch, max_length) for blocks in spans]
        self.wire = wire

    def step(self, hidden, hypo_ids=None):
        for session in self.sessions:
            hidden = session.step(unpack(pack(hidden, self.wire)), hypo_ids)
        return unpack(pack(hidden, self.wire))

    def close(self):
        for session in self.sessions:
            session.close()


def _simulate(model, cfg: GenerationConfig, wire: str) -> list[int]:
    """The tokens of the simulation of spans 0:2 and 2:4."""
    client = ClientModel.load(model)
    blocks = client.checkpoint.load_blocks(0, client.checkpoint.num_blocks)
    spans = [blocks.sub(0, 2), blocks.sub(2, 4)]
    ids = client.encode("The capital of France is")
    return generate(client.head, lambda batch, length: _Simulated(spans, batch, length, wire), ids, cfg)


CFG = GenerationConfig(max_new_tokens=12, eos_token_ids=())
INPUTS = [torch.randn(1, 5 if i == 0 else 1, 64, generator=torch.Generator().manual_seed(i)) for i in range(10)]


def _run(model, servers, wire: str, **kw) -> tuple[list[int], dict]:
    """Tokens generated through the swarm; ``seen``: the last chain's wire dtypes and bytes."""
    seen = {}

    def hook(i, chain):
        seen["wires"] = [s.wire for s in chain.sessions]
        seen["bytes"] = chain.wire_bytes

    tokens = swarm_generate(model, servers[0].host.addrs[0], CFG, hook, wire_dtype=wire, step_timeout=10.0, **kw)
    return tokens, seen


def _chain_outputs(model, servers, wire: str, on_step=None, **kw) -> list[torch.Tensor]:
    """The outputs of a chain stepped with :data:`INPUTS`; ``on_step(i, chain)`` after step i."""
    loop = BackgroundLoop()
    cfg = ClientConfig(initial_peers=[servers[0].host.addrs[0]], wire_dtype=wire, step_timeout=10, wait_timeout=20, **kw)
    client = loop.call(SwarmClient.start(model_id(Checkpoint(model)), 4, cfg), timeout=60)
    try:
        chain = loop.call(client.open_chain(1, 64), timeout=60)
        outputs = []
        for i, x in enumerate(INPUTS):
            outputs.append(loop.call(chain.step(x), timeout=60))
            if on_step is not None:
                on_step(i, chain)
        assert [s.wire for s in chain.sessions] == [wire, wire]
        loop.call(chain.close(), timeout=30)
        return outputs
    finally:
        loop.call(client.close(), timeout=15)
        loop.close()


def _simulated_outputs(model, wire: str) -> list[torch.Tensor]:
    blocks = Checkpoint(model).load_blocks(0, 4)
    session = _Simulated([blocks.sub(0, 2), blocks.sub(2, 4)], 1, 64, wire)
    return [session.step(x) for x in INPUTS]


@pytest.mark.parametrize("wire", ["int8", "bfloat16"])
def test_lossy_wire_chains_equal_the_local_simulation_bit_for_bit(swarm, wire):
    """Pushed (server to server, trails sent on as received) or sent by the client to each server:
    the outputs equal the simulation's exactly."""
    model, servers, _ = swarm
    expected = _simulated_outputs(model, wire)
    assert not torch.equal(expected[-1], _simulated_outputs(model, "float32")[-1])
    pushed = _chain_outputs(model, servers, wire)
    assert any(link.stream is not None for link in servers[0].inference.loop.push_links.values()), "nothing was pushed"
    direct = _chain_outputs(model, servers, wire, push=False)
    for want, got, got_direct in zip(expected, pushed, direct):
        assert torch.equal(got, want) and torch.equal(got_direct, want)


def test_int8_generation_equals_the_simulation_and_takes_fewer_bytes(swarm):
    model, servers, _ = swarm
    tokens, seen = _run(model, servers, "int8")
    exact, plain = _run(model, servers, "float32")
    assert tokens == _simulate(model, CFG, "int8")
    client = ClientModel.load(model)
    assert exact == generate_local(client, client.encode("The capital of France is"), CFG)
    assert seen["wires"] == ["int8", "int8"] and plain["wires"] == ["float32", "float32"]
    assert seen["bytes"] < plain["bytes"]


def test_int8_failover_replays_to_the_same_outputs(swarm, caplog):
    """The server of blocks 2:4 stops mid-generation; the spare replays the history it is sent
    (decoded exactly as the first server decoded it) and every output equals the undisturbed
    run's, bit for bit."""
    model, servers, background = swarm
    stopped = []

    def on_step(i, chain):
        if i == 4:
            victim = next(s for s in servers if s.host.peer_id == chain.sessions[1].span.peer_id)
            background.call(victim.stop(), timeout=30)
            stopped.append(victim)

    with caplog.at_level("WARNING", logger="swarm.client"):
        outputs = _chain_outputs(model, servers, "int8", on_step)
    assert len(stopped) == 1 and any("recovered blocks 2:4" in r.getMessage() for r in caplog.records)
    for want, got in zip(_simulated_outputs(model, "int8"), outputs):
        assert torch.equal(got, want)


def test_auto_sends_a_bfloat16_server_bfloat16_with_the_same_tokens(tmp_path):
    model = write_tiny_checkpoint(tmp_path / "m", "llama")
    background = BackgroundLoop()
    cfg = ServerConfig(model_dir=model, blocks="0:4", new_swarm=True, dtype="bfloat16", **SPEED)
    server = background.call(BlockServer.start(cfg), timeout=60)
    try:
        auto, seen_auto = _run(model, [server], "auto")
        exact, seen_exact = _run(model, [server], "float32")
    finally:
        background.call(server.stop(), timeout=30)
        background.close()
    assert auto == exact  # the server casts its input to bfloat16 anyway
    assert seen_auto["wires"] == ["bfloat16"] and seen_exact["wires"] == ["float32"]
    assert seen_auto["bytes"] < seen_exact["bytes"]


# ---- training passes -------------------------------------------------------------------------


class _RoundTrip(torch.autograd.Function):
    """The wire's int8 round trip on a boundary, forward and backward (the swarm's gradients
    treat the quantization as the identity and quantize the gradient that crosses back)."""

    @staticmethod
    def forward(ctx, x):
        return unpack(pack(x, "int8"))

    @staticmethod
    def backward(ctx, grad):
        return unpack(pack(grad, "int8"))


def test_int8_forward_backward_gradients_close_to_float32(swarm):
    model, servers, _ = swarm
    checkpoint = Checkpoint(model)
    head, local = checkpoint.load_head(), checkpoint.load_blocks(0, 4)
    lora = init_lora(checkpoint, ["self_attn.q_proj", "self_attn.v_proj"], rank=2, seed=0)
    for key, value in lora.items():
        if key.endswith("lora_B"):
            value.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    spec = AdapterSpec(scale=2.0)
    ids = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(2))

    def grads(blocks_fn):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in lora.items()}
        embeddings = head.embed(ids).detach().requires_grad_(True)
        logits = head.logits(blocks_fn(embeddings, leaves))
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        return {"embeddings": embeddings.grad, **{k: v.grad for k, v in leaves.items()}}

    def simulated(x, leaves):  # the swarm's spans 0:2 and 2:4 with int8 at each boundary
        for a, b in ((0, 2), (2, 4)):
            x = LocalBlocks(local.sub(a, b))(_RoundTrip.apply(x), leaves, spec)
        return _RoundTrip.apply(x)

    ccfg = ClientConfig(request_timeout=10, step_timeout=20, wait_timeout=20)
    reference = grads(lambda x, t: LocalBlocks(local)(x, t, spec))
    wanted = grads(simulated)
    results, sent = {}, {}
    for wire in ("float32", "int8"):
        with RemoteBlocks.connect(model, [servers[0].host.addrs[0]], replace(ccfg, wire_dtype=wire)) as remote:
            grads(lambda x, t: remote(x, t, spec))  # uploads the adapter
            before = remote.wire_bytes
            results[wire] = grads(lambda x, t: remote(x, t, spec))
            sent[wire] = remote.wire_bytes - before
            assert [(s.start, s.end) for s in remote.last_spans] == [(0, 2), (2, 4)]
    for key, want in reference.items():
        scale = want.abs().max()
        assert (results["float32"][key] - want).abs().max() <= 1e-5 * scale, key
        assert (results["int8"][key] - wanted[key]).abs().max() <= 1e-4 * scale, key  # the simulation, exactly
        # close to float32: this random tiny model is sensitive (about 5% off, cosine 0.998)
        assert (results["int8"][key] - want).norm() <= 0.1 * want.norm(), key
        assert F.cosine_similarity(results["int8"][key].flatten(), want.flatten(), dim=0) > 0.995, key
    assert not torch.equal(results["int8"]["embeddings"], results["float32"]["embeddings"])
    assert sent["int8"] < 0.5 * sent["float32"]


def test_a_bad_wire_dtype_is_a_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from swarm.cli.main import app

    model = write_tiny_checkpoint(tmp_path / "m", "llama")
    result = CliRunner().invoke(app, ["generate", "--local", "--model", str(model), "--wire-dtype", "int4", "Hello"])
    assert result.exit_code == 1 and "--wire-dtype must be one of auto, float32, bfloat16, int8" in result.output
