"""What a server announces as its speed: min(compute, network) (compute from the cached
measurement with auto, measured again with eval; network from a timed echo to a peer, --bandwidth
or an assumed default), or a number given with --throughput; anything else is refused naming the
flag. And --num-blocks' default: the blocks that fit in --memory."""

from __future__ import annotations

import json

import pytest
import torch

from swarm.engine.checkpoint import Checkpoint
from swarm.engine.memory import GIB, RESERVED_BYTES, block_bytes, default_num_blocks, kv_bytes_per_token
from swarm.engine.throughput import (
    ASSUMED_BANDWIDTH_MBIT,
    CAPACITY_BATCH,
    measure_batch_throughput,
    network_throughput,
    parse_throughput,
    server_throughput,
)
from swarm.p2p.loop import run
from swarm.p2p.server import BlockServer, ServerConfig


async def _speed(model, throughput, **kw):
    server = await BlockServer.start(ServerConfig(model_dir=model, blocks="0:3", new_swarm=True, throughput=throughput, **kw))
    try:
        return server.speed, server.info()
    finally:
        await server.stop()


def test_auto_uses_the_cache_eval_measures_again_and_a_number_is_announced(tmp_path, monkeypatch, tiny_checkpoints):
    monkeypatch.setenv("SWARM_HOME", str(tmp_path))
    model = tiny_checkpoints["llama"]
    speed, info = run(_speed(model, "auto"))  # measured once, cached
    cache = tmp_path / "throughput.json"
    figures = json.loads(cache.read_text())
    (key, block_rate), = ((k, v) for k, v in figures.items() if "/batch=" not in k)
    assert "/float32/quant=none/threads=" in key and "/cpu=" in key
    # compute: one block's steps/s ÷ the blocks a request is expected to use, (3 + 1) / 2
    assert speed.source == "measured" and speed.compute == pytest.approx(block_rate / 2, abs=0.01)
    # and with 8 sessions' steps in each pass (the server batches up to 32): its capacity
    batch_rate = figures[f"{key}/batch={CAPACITY_BATCH}"]
    assert speed.batch_rate == batch_rate and info.capacity == pytest.approx(max(min(batch_rate / 2, speed.network), info.throughput), abs=0.01)
    del figures[f"{key}/batch={CAPACITY_BATCH}"]
    cache.write_text(json.dumps(figures))
    _, info = run(_speed(model, "auto", batch_steps=1))  # one session at a time: it carries its throughput
    assert info.capacity == info.throughput and f"{key}/batch={CAPACITY_BATCH}" not in json.loads(cache.read_text())
    # alone in its swarm, nobody to measure the link against: assumed, and marked so
    assert speed.bandwidth_source == "assumed" and speed.bandwidth == ASSUMED_BANDWIDTH_MBIT
    assert info.throughput == min(speed.compute, speed.network) and info.bandwidth_source == "assumed"
    cache.write_text(json.dumps({key: 123456.0}))  # one figure without the other: both measured again, together
    speed, _ = run(_speed(model, "auto"))
    figures = json.loads(cache.read_text())
    assert speed.source == "measured" and figures[key] != 123456.0 and f"{key}/batch={CAPACITY_BATCH}" in figures
    cache.write_text(json.dumps({key: 123456.0, f"{key}/batch={CAPACITY_BATCH}": 500000.0}))
    speed, info = run(_speed(model, "auto", bandwidth=10.0))
    assert speed.source == "cached" and speed.compute == 61728.0
    assert speed.bandwidth_source == "given" and speed.network == round(network_throughput(10.0, 64), 2)
    assert info.throughput == speed.network  # the link is the limit here
    assert info.capacity == speed.network  # for batched sessions' hidden states too
    speed, _ = run(_speed(model, "eval"))
    assert speed.source == "measured" and json.loads(cache.read_text())[key] != 123456.0
    speed, info = run(_speed(model, 7.5))
    assert info.throughput == 7.5 and info.throughput_source == "given"


def test_throughput_is_the_least_of_compute_and_network():
    fast_link = server_throughput(300.0, 5, 1000.0, 4096)  # 300 / 3 = 100 tok/s; 1 Gbit ÷ 4096·32 = 7629
    assert (fast_link.throughput, fast_link.compute) == (100.0, 100.0)
    slow_link = server_throughput(300.0, 1, 1.0, 4096)  # 1 Mbit/s carries 7.6 hidden states a second
    assert slow_link.throughput == slow_link.network == 7.63
    assert server_throughput(None, 4, 1.0, 4096, given=42.0).throughput == 42.0
    batched = server_throughput(300.0, 5, 1000.0, 4096, batch_rate=1200.0)  # 8 sessions: 1200 steps/s of a block
    assert (batched.throughput, batched.capacity) == (100.0, 400.0)
    assert server_throughput(300.0, 5, 10.0, 4096, batch_rate=1200.0).capacity == 76.29  # the link's limit
    assert server_throughput(300.0, 5, 1000.0, 4096).capacity == 100.0  # not measured: its throughput
    assert server_throughput(None, 4, 1.0, 4096, given=42.0).capacity == 42.0


def test_batch_throughput_counts_every_session_of_a_pass(tiny_checkpoints):
    blocks = Checkpoint(tiny_checkpoints["llama"]).load_blocks(0, 2)
    rate = measure_batch_throughput(blocks, 4, seconds=0.05)
    assert 0 < rate < float("inf") and blocks.batch_exact is False  # block 0 attached in place for it, block 1 left as it was


@pytest.mark.parametrize("spec", ["0", "-3", "abc", "nan", "inf", ""])
def test_bad_throughput_is_refused_naming_the_flag(spec):
    with pytest.raises(ValueError, match="--throughput must be auto, eval or a positive number"):
        parse_throughput(spec)


def test_num_blocks_defaults_to_what_fits_in_memory(tiny_checkpoints):
    checkpoint = Checkpoint(tiny_checkpoints["llama"])
    f32 = torch.float32
    per_block = block_bytes(checkpoint, 0, f32) + 1000 * kv_bytes_per_token(checkpoint, f32)
    for n in (1, 2, 3):
        memory = (RESERVED_BYTES + n * per_block + per_block // 2) / GIB
        assert default_num_blocks(checkpoint, f32, memory, cache_tokens=1000) == n
    assert default_num_blocks(checkpoint, f32, 1000.0, cache_tokens=1000) == checkpoint.num_blocks
    with pytest.raises(ValueError, match="--memory 0.1 GB leaves no room for one block"):
        default_num_blocks(checkpoint, f32, 0.1, cache_tokens=1000)


def test_the_link_is_measured_against_a_peer_and_probes_are_bounded(tiny_checkpoints):
    from server_utils import eventually

    from swarm.p2p import protocols
    from swarm.p2p.bandwidth import PROBE_MAX_FRAME, measure_bandwidth
    from swarm.p2p.streams import StreamClosedError
    from swarm.p2p.wire import Frame

    async def main():
        model = tiny_checkpoints["llama"]
        a = await BlockServer.start(ServerConfig(model_dir=model, blocks="0:2", new_swarm=True, announce_period=0.5))
        try:
            first = [x for x in a.host.addrs if "/ip4/" in x]
            b = await BlockServer.start(ServerConfig(model_dir=model, blocks="2:4", initial_peers=first, throughput=5.0,
                                                     announce_period=0.5))
            try:
                # the joiner measured its link against the first server before going online ...
                assert b.speed.bandwidth_source == "measured" and b.speed.bandwidth > 1.0
                assert b.info().network == round(network_throughput(b.speed.bandwidth, 64), 2)
                # ... and the first, which had nobody to measure against, measures once someone comes
                # (a server whose --throughput is given does not: the figure would not change it)
                await eventually(lambda: a.speed.bandwidth_source == "measured", timeout=20, what="a's link measured")
                await eventually(lambda: b.table.snapshot()[a.host.peer_id].bandwidth_source == "measured",
                                 timeout=20, what="a's measured link announced")
                # an echo never carries more than it was sent, and a probe frame is bounded: the server
                # refuses it from its length prefix, answers and resets the stream, which may reach us
                # while we still write the body (then the write fails) or after (then we read the answer)
                reply = await protocols.request(b.host, a.host.peer_id, protocols.PROBE, Frame("info"), 30)
                assert reply.kind == "error"
                big = Frame("probe", {}, [torch.zeros(PROBE_MAX_FRAME // 4 + 1)])
                try:
                    reply = await protocols.request(b.host, a.host.peer_id, protocols.PROBE, big, 30)
                    assert reply.kind == "error" and reply["code"] == "bad_frame", reply
                except StreamClosedError:
                    pass
                assert a.frames.used() == 0  # nothing of the refused frame is held
                assert await measure_bandwidth(b.host, a.host.peer_id) > 1.0  # and it still echoes
            finally:
                await b.stop()
        finally:
            await a.stop()

    run(main())
