"""A server under bad input: fuzzed frames get an error or a closed stream, and it keeps serving.
Also the stateless forward/backward protocols against local autograd."""

from __future__ import annotations

import asyncio
import os
import random
import struct

import msgpack
import pytest
import torch

from swarm.engine.checkpoint import Checkpoint
from swarm.p2p import protocols
from swarm.p2p.host import Host, P2PError, StreamClosedError
from swarm.p2p.wire import PROTOCOL_VERSION, Frame, encode, expect, read_frame, write_frame
from conftest import write_tiny_checkpoint
from swarm_utils import cli_json, local_json, running_swarm

PROMPT = "The capital of France is"


def _frame_bytes(frame: Frame) -> bytes:
    return b"".join(bytes(b) for b in encode(frame))


def _raw(header: dict, payload: bytes = b"") -> bytes:
    h = msgpack.packb(header)
    return struct.pack(">IH", 2 + len(h) + len(payload), len(h)) + h + payload


def _bad_payloads(hidden_size: int) -> list[tuple[str, bytes]]:
    rng = random.Random(0)
    good_hidden = torch.zeros(1, 2, hidden_size)
    return [
        ("random bytes", bytes(rng.getrandbits(8) for _ in range(300))),
        ("random 64 KiB", os.urandom(1 << 16)),
        ("oversized length", struct.pack(">I", 2**31) + b"x" * 16),
        ("truncated frame", _frame_bytes(Frame("forward", {"start": 0, "end": 1}, [good_hidden]))[:40]),
        ("wrong version", _raw({"v": 7, "kind": "forward", "start": 0, "end": 1, "tensors": []})),
        ("unknown kind", _raw({"v": PROTOCOL_VERSION, "kind": "rm -rf", "tensors": []})),
        ("wrong dtype", _frame_bytes(Frame("forward", {"start": 0, "end": 1}, [torch.zeros(1, 2, hidden_size, dtype=torch.int64)]))),
        ("wrong shape", _frame_bytes(Frame("forward", {"start": 0, "end": 1}, [torch.zeros(1, 2, hidden_size + 1)]))),
        ("bad range", _frame_bytes(Frame("forward", {"start": 3, "end": 99}, [good_hidden]))),
        ("open: bad range", _frame_bytes(Frame("open", {"start": 0, "end": 99, "batch": 1, "max_length": 8}))),
        ("open: huge cache", _frame_bytes(Frame("open", {"start": 0, "end": 1, "batch": 64, "max_length": 256}))),
        ("open: past the context", _frame_bytes(Frame("open", {"start": 0, "end": 1, "batch": 1, "max_length": 10**9}))),
        ("step before open", _frame_bytes(Frame("step", {"step_id": "x", "position": 0}, [good_hidden]))),
    ]


async def _send_bad(host: Host, peer: str, protocol: str, payload: bytes) -> str:
    stream = await host.open_stream(peer, protocol, timeout=10)
    try:
        await stream.write(payload, timeout=10)
        await stream.close()
        try:
            frame = await read_frame(stream, timeout=20)
        except StreamClosedError:
            return "closed"
        assert frame.kind == "error", frame
        return frame["code"]
    except StreamClosedError:
        return "closed"
    finally:
        try:
            await stream.reset()
        except P2PError:
            pass


async def _session_after_open_errors(host: Host, peer: str, hidden_size: int) -> list[str]:
    """Malformed frames inside an open session: an error reply each time, session ends."""
    out = []
    for bad in (
        Frame("step", {"step_id": "s", "position": 5}, [torch.zeros(1, 1, hidden_size)]),  # wrong position
        Frame("step", {"step_id": "s", "position": 0}, [torch.zeros(1, 1, hidden_size), torch.tensor([3])]),  # bad row
        Frame("step", {"step_id": "s", "position": 0, "chunks": {"a": 1}}, [torch.zeros(1, 1, hidden_size)]),
        Frame("step", {"step_id": "s", "position": 0}, [torch.zeros(2, 1, hidden_size)]),  # wrong batch
        Frame("forward", {"start": 0, "end": 1}, [torch.zeros(1, 1, hidden_size)]),  # wrong kind mid-session
    ):
        stream = await host.open_stream(peer, protocols.INFERENCE, timeout=10)
        await write_frame(stream, Frame("open", {"start": 0, "end": 4, "batch": 1, "max_length": 16}), timeout=10)
        expect(await read_frame(stream, timeout=10), "opened")
        await write_frame(stream, bad, timeout=10)
        out.append((await read_frame(stream, timeout=10))["code"])
        await stream.close()
    return out


@pytest.mark.slow
def test_fuzzed_frames_get_errors_and_the_server_keeps_serving(tmp_path, tiny_checkpoints):
    model = tiny_checkpoints["llama"]
    ckpt = Checkpoint(model)
    hidden_size = ckpt.config.hidden_size
    expected = local_json(["--model", str(model), "--max-new-tokens", "10", PROMPT])

    async def fuzz(maddr: str) -> tuple[dict, list[str]]:
        host = await Host.start()
        try:
            peer = await host.connect(maddr, timeout=10)
            outcomes = {}
            for protocol in (protocols.INFERENCE, protocols.FORWARD, protocols.BACKWARD, protocols.INFO):
                for name, payload in _bad_payloads(hidden_size):
                    outcomes[(protocol, name)] = await _send_bad(host, peer, protocol, payload)
            return outcomes, await _session_after_open_errors(host, peer, hidden_size)
        finally:
            await host.close()

    with running_swarm(model, ["0:4"], tmp_path, extra=("--cache-tokens", "4096")) as servers:
        outcomes, in_session = asyncio.run(fuzz(servers[0].maddr))
        after = cli_json(
            ["--model", str(model), "--initial-peers", servers[0].maddr, "--max-new-tokens", "10", PROMPT], tmp_path
        )
        assert servers[0].proc.poll() is None, "the server died"
    assert set(outcomes.values()) <= {"closed", "bad_frame", "bad_request", "cache_full"}, outcomes
    assert outcomes[(protocols.FORWARD, "wrong shape")] == "bad_request"
    assert outcomes[(protocols.FORWARD, "wrong version")] == "bad_frame"
    assert outcomes[(protocols.INFERENCE, "open: huge cache")] == "cache_full"
    assert outcomes[(protocols.INFERENCE, "open: past the context")] == "bad_request"
    assert outcomes[(protocols.INFERENCE, "oversized length")] == "bad_frame"
    assert in_session == ["bad_request"] * 4 + ["bad_frame"]
    assert after["token_ids"] == expected["token_ids"]


@pytest.mark.slow
def test_forward_and_backward_protocols_match_local(tmp_path, tiny_checkpoints):
    model = tiny_checkpoints["qwen2"]
    blocks = Checkpoint(model).load_blocks(1, 3)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, blocks.config.hidden_size, generator=g)
    grad_out = torch.randn(2, 5, blocks.config.hidden_size, generator=g)
    with torch.no_grad():
        expected_out = blocks(hidden)
    inputs = hidden.clone().requires_grad_(True)
    blocks(inputs).backward(grad_out)

    async def ask(maddr: str):
        host = await Host.start()
        try:
            peer = await host.connect(maddr, timeout=10)
            fwd = await protocols.request(host, peer, protocols.FORWARD, Frame("forward", {"start": 1, "end": 3}, [hidden]), 20)
            bwd = await protocols.request(
                host, peer, protocols.BACKWARD, Frame("backward", {"start": 1, "end": 3}, [hidden, grad_out]), 20
            )
            return expect(fwd, "result").tensors[0], expect(bwd, "result").tensors[0]
        finally:
            await host.close()

    with running_swarm(model, ["0:4"], tmp_path) as servers:
        out, grad_in = asyncio.run(ask(servers[0].maddr))
    assert torch.allclose(out, expected_out, atol=1e-5)
    assert torch.allclose(grad_in, inputs.grad, atol=1e-5)
    assert grad_in.abs().sum() > 0


@pytest.mark.slow
def test_long_computation_does_not_stall_the_server(tmp_path):
    """While a big forward pass runs, the same server answers pings and info requests."""
    model = write_tiny_checkpoint(
        tmp_path / "wide", "llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=8, max_position_embeddings=2048
    )
    hidden = torch.randn(8, 1024, 256)

    async def probe(maddr: str):
        host = await Host.start()
        try:
            peer = await host.connect(maddr, timeout=10)
            big = asyncio.create_task(
                protocols.request(host, peer, protocols.FORWARD, Frame("forward", {"start": 0, "end": 8}, [hidden]), 120)
            )
            rtts, infos = [], 0
            while not big.done():
                rtts.append(await host.ping(peer, timeout=5))
                reply = await protocols.request(host, peer, protocols.INFO, Frame("info"), 5)
                infos += reply.kind == "info_reply"
            return expect(await big, "result").tensors[0].shape, rtts, infos
        finally:
            await host.close()

    with running_swarm(model, ["0:8"], tmp_path) as servers:
        shape, rtts, infos = asyncio.run(probe(servers[0].maddr))
    assert shape == (8, 1024, 256)
    assert len(rtts) >= 3 and infos == len(rtts), "the server stopped answering during the computation"
    assert max(rtts) < 1.0, rtts
