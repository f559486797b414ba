"""What one peer can make a server hold is bounded, and work nobody waits for stops (issue 9):
frames in flight per peer and in total with a deadline from their first byte, sessions and cache
tokens per peer, the first step due soon after an open, abandoned passes stopped at the next
block, long prefills chunked, the event loop kept free of tensor work, the model's context
enforced, and the server's own failures told apart from refused requests.

The servers run in this process so the tests can look at their accounting; the peers are real
libp2p hosts with their own Noise identities."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from conftest import write_tiny_checkpoint
from server_utils import BlockGate, eventually, peer, prefix, served
from swarm.engine.checkpoint import PREFILL_CHUNK, Checkpoint
from swarm.engine.generation import LocalSession
from swarm.p2p import protocols
from swarm.p2p.host import STREAM_BUFFER_LIMIT, P2PError, StreamClosedError
from swarm.p2p.loop import run
from swarm.p2p.wire import Frame, RemoteError, expect, read_frame, write_frame

KIB = 1 << 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("limits"), "llama", max_position_embeddings=2048)


async def _ended(stream, timeout: float) -> str:
    """How a stream the server should end ends: its error code, or "closed"."""
    try:
        frame = await read_frame(stream, timeout=timeout)
    except StreamClosedError:
        return "closed"
    return frame.fields.get("code", frame.kind)


async def _open(host, server_peer, max_length=64, batch=1, start=0, end=4):
    stream = await host.open_stream(server_peer, protocols.INFERENCE, timeout=10)
    await write_frame(stream, Frame("open", {"start": start, "end": end, "batch": batch, "max_length": max_length}), 10)
    return stream, await read_frame(stream, timeout=10)


# ---- frames in flight ------------------------------------------------------------------------


def test_partial_frames_are_bounded_per_peer_and_freed_when_the_peer_leaves(tiny):
    """A peer announcing big frames on every protocol and sending most of each: the server holds
    at most the peer's budget (the rest is refused at once, before any body is read), and every
    byte is given back when the peer disconnects."""
    frame = 600 * KIB

    async def scenario():
        async with served(tiny, max_frame=1 << 20, peer_frame_memory=1 << 20, frame_memory=4 << 20) as (server, maddr):
            async with peer(maddr) as (host, sp):  # and then gone, mid-frame
                session, opened = await _open(host, sp)
                expect(opened, "opened")
                streams = [session] + [
                    await host.open_stream(sp, proto, timeout=10)
                    for proto in (protocols.PUSH, protocols.FORWARD, protocols.BACKWARD)
                ]
                await streams[0].write(prefix(frame) + b"\0" * (frame - 1000), timeout=10)
                await eventually(lambda: server.frames.used(host.peer_id) == frame, what="the first frame counted")
                refused = []
                for stream in streams[1:]:  # no room left for this peer: refused before any body
                    await stream.write(prefix(frame) + b"\0" * 100, timeout=10)
                    refused.append(await _ended(stream, 10))
                assert refused == ["closed", "busy", "busy"], refused  # push streams get no replies: reset
                assert server.frames.used(host.peer_id) == frame
                # another peer is not affected by this one's budget
                async with peer(maddr) as (other, _):
                    reply = await protocols.request(other, sp, protocols.INFO, Frame("info"), 10)
                    assert reply.kind == "info_reply"
            await eventually(lambda: server.frames.used() == 0, what="the partial frames freed")
            await eventually(lambda: not server.sessions, what="the session freed")
            assert server.budget.tokens_left == server.budget.max_tokens

    run(scenario())


@pytest.mark.parametrize("protocol", [protocols.PUSH, protocols.FORWARD, protocols.INFO, protocols.INFERENCE, protocols.PROBE])
def test_a_stalled_frame_ends_its_stream_at_its_deadline(tiny, protocol):
    """A frame that starts and then stalls is given up at the frame timeout (plus a second per MiB
    announced) from its first byte, not at the stream's idle timeout, and its bytes are freed."""

    async def scenario():
        async with served(tiny, request_timeout=1.0, idle_timeout=600.0) as (server, maddr):
            async with peer(maddr) as (host, sp):
                if protocol == protocols.INFERENCE:
                    stream, opened = await _open(host, sp)
                    expect(opened, "opened")
                else:
                    stream = await host.open_stream(sp, protocol, timeout=10)
                await stream.write(prefix(64 * KIB) + b"\0" * KIB, timeout=10)
                loop = asyncio.get_running_loop()
                began = loop.time()
                outcome = await _ended(stream, 20)
                waited = loop.time() - began
                await eventually(lambda: server.frames.used() == 0, what="the stalled frame freed")
                return outcome, waited

    outcome, waited = run(scenario())
    assert outcome in ("closed", "bad_frame", "session_expired"), outcome
    assert waited < 5, f"a stalled frame was kept {waited:.1f} s"


# ---- sessions and cache per peer -----------------------------------------------------------------


def test_one_peer_cannot_hold_the_whole_cache_and_unused_opens_expire(tiny):
    async def scenario():
        overrides = dict(cache_tokens=1000, peer_cache_share=0.5, max_peer_sessions=3, open_timeout=1.0)
        async with served(tiny, **overrides) as (server, maddr):
            async with peer(maddr) as (greedy, sp), peer(maddr) as (polite, _):
                held = [await _open(greedy, sp, max_length=200) for _ in range(2)]
                assert [f.kind for _, f in held] == ["opened", "opened"]
                _, over_share = await _open(greedy, sp, max_length=200)
                assert over_share.kind == "error" and over_share["code"] == "cache_full"
                assert "share" in over_share["message"]
                more = [await _open(greedy, sp, max_length=10) for _ in range(2)]
                assert [f.kind for _, f in more] == ["opened", "error"] and more[1][1]["code"] == "busy"
                # another peer still gets room
                _, theirs = await _open(polite, sp, max_length=500)
                assert theirs.kind == "opened"
                # sessions that never step are closed soon after they open
                codes = [await _ended(stream, 10) for stream, _ in [*held, more[0]]]
                assert set(codes) == {"session_expired"}, codes
                await eventually(lambda: server.budget.used_by(greedy.peer_id) == 0, what="the greedy peer's cache freed")

    run(scenario())


# ---- work nobody waits for ------------------------------------------------------------------------


def test_an_abandoned_prefill_stops_at_the_next_block_and_prefills_are_chunked(tiny):
    seq = 3 * PREFILL_CHUNK + 7
    hidden = torch.randn(1, seq, Checkpoint(tiny).config.hidden_size)

    async def scenario():
        async with served(tiny) as (server, maddr):
            gate = BlockGate(server.blocks, closed=True)
            try:
                async with peer(maddr) as (host, sp):
                    stream, opened = await _open(host, sp, max_length=seq + 8)
                    expect(opened, "opened")
                    await write_frame(stream, Frame("step", {"step_id": "a", "position": 0}, [hidden]), 10)
                    await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 10)
                    await stream.reset()  # the client gives up
                    await eventually(lambda: all(s.stop.is_set() for s in server.sessions.values()), what="stop")
                    gate.open()
                    await eventually(lambda: not server.sessions, what="the session freed")
                    ran = list(gate.seq_lengths)
                    # the server is free again at once
                    gate.seq_lengths.clear()
                    reply = await protocols.request(
                        host, sp, protocols.FORWARD, Frame("forward", {"start": 0, "end": 4}, [hidden[:, :5]]), 10
                    )
                    assert expect(reply, "result").tensors[0].shape == (1, 5, hidden.shape[-1])
                    return ran
            finally:
                gate.remove()

    ran = run(scenario())
    assert ran == [PREFILL_CHUNK], f"the abandoned prefill ran on: {ran}"


def test_an_abandoned_forward_stops(tiny):
    hidden = torch.randn(2, 40, Checkpoint(tiny).config.hidden_size)

    async def scenario():
        async with served(tiny) as (server, maddr):
            gate = BlockGate(server.blocks, closed=True)
            try:
                async with peer(maddr) as (host, sp):
                    stream = await host.open_stream(sp, protocols.FORWARD, timeout=10)
                    await write_frame(stream, Frame("forward", {"start": 0, "end": 4}, [hidden]), 10)
                    await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 10)
                    await stream.reset()  # the client gives up
                    await eventually(lambda: not _watching(), what="the reset noticed")
                    gate.open()
                    await eventually(lambda: not server._streams, what="the forward handler ended")
                    return list(gate.seq_lengths)
            finally:
                gate.remove()

    assert run(scenario()) == [40]


def _watching() -> bool:
    """Whether a stateless pass's watcher (which stops it when its client leaves) still waits."""
    return any(getattr(t.get_coro(), "__qualname__", "") == "_watch_for_end" for t in asyncio.all_tasks())


def test_long_prompts_chunk_the_same_way_locally_and_on_a_server(tiny):
    """A prefill longer than a chunk gives the same outputs (exactly) in one process and through a
    server, and a server's blocks never see more than a chunk at once."""
    ckpt = Checkpoint(tiny)
    blocks = ckpt.load_blocks(0, 4)
    hidden = torch.randn(1, 2 * PREFILL_CHUNK + 3, ckpt.config.hidden_size)
    local = LocalSession(blocks, 1, hidden.shape[1] + 1)
    expected = local.step(hidden)

    async def scenario():
        async with served(tiny) as (server, maddr):
            gate = BlockGate(server.blocks)
            try:
                async with peer(maddr) as (host, sp):
                    stream, opened = await _open(host, sp, max_length=hidden.shape[1] + 1)
                    expect(opened, "opened")
                    await write_frame(stream, Frame("step", {"step_id": "a", "position": 0}, [hidden]), 10)
                    return expect(await read_frame(stream, timeout=60), "output").tensors[0], gate.seq_lengths
            finally:
                gate.remove()

    out, lengths = run(scenario())
    assert torch.equal(out, expected)
    assert max(lengths) == PREFILL_CHUNK


# ---- the event loop and push streams ----------------------------------------------------------------


def test_cache_allocation_and_freeing_stay_off_the_event_loop(tiny, monkeypatch):
    from swarm.cache import kv

    threads = []
    original_init, original_close = kv.SessionKV.__init__, kv.SessionKV.close

    def init(self, *args, **kwargs):
        threads.append(("alloc", threading.current_thread().name))
        original_init(self, *args, **kwargs)

    def close(self):
        if not self._closed:
            threads.append(("free", threading.current_thread().name))
        original_close(self)

    monkeypatch.setattr(kv.SessionKV, "__init__", init)
    monkeypatch.setattr(kv.SessionKV, "close", close)

    async def scenario():
        loop_thread = threading.current_thread().name
        async with served(tiny) as (server, maddr):
            async with peer(maddr) as (host, sp):
                stream, opened = await _open(host, sp)
                expect(opened, "opened")
                await write_frame(stream, Frame("close"), 10)
                assert (await read_frame(stream, timeout=10)).kind == "closed"
                await eventually(lambda: not server.sessions, what="the session freed")
        return loop_thread

    loop_thread = run(scenario())
    assert [op for op, _ in threads] == ["alloc", "free"]
    assert all(name != loop_thread for _, name in threads), threads


def test_a_full_session_inbox_does_not_hold_up_other_sessions_on_the_push_stream(tiny):
    """Pushed steps for a session whose inbox is full are dropped at once; a step for another
    session behind them on the same push stream arrives without waiting."""
    size = Checkpoint(tiny).config.hidden_size

    async def scenario():
        async with served(tiny) as (server, maddr):
            gate = BlockGate(server.blocks, closed=True)
            try:
                async with peer(maddr) as (host, sp):
                    busy, a = await _open(host, sp)
                    idle, b = await _open(host, sp)
                    busy_id, idle_id = a["session_id"], b["session_id"]
                    # the busy session computes (held by the gate) while its inbox fills up
                    await write_frame(busy, Frame("step", {"step_id": "s0", "position": 0}, [torch.zeros(1, 1, size)]), 10)
                    await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 10)
                    push = await host.open_stream(sp, protocols.PUSH, timeout=10)
                    for i in range(12):
                        step = Frame("step", {"session": busy_id, "step_id": f"p{i}", "position": 1}, [torch.zeros(1, 1, size)])
                        await write_frame(push, step, 10)
                    await write_frame(push, Frame("step", {"session": idle_id, "step_id": "q", "position": 0},
                                                  [torch.zeros(1, 1, size)]), 10)
                    # the other session took its step (and waits for the compute thread, which the gate holds)
                    await eventually(lambda: server.sessions[idle_id].computing is not None, timeout=3,
                                     what="the other session's pushed step")
                    gate.open()
            finally:
                gate.remove()

    run(scenario())


# ---- context and error codes ------------------------------------------------------------------------


def test_requests_past_the_models_context_are_refused(tiny):
    size = Checkpoint(tiny).config.hidden_size  # context: 2048 positions

    async def scenario():
        async with served(tiny, cache_tokens=10_000) as (server, maddr):
            async with peer(maddr) as (host, sp):
                _, opened = await _open(host, sp, max_length=2049)
                long_forward = Frame("forward", {"start": 0, "end": 4}, [torch.zeros(1, 2049, size)])
                forward = await protocols.request(host, sp, protocols.FORWARD, long_forward, 30)
                return opened, forward

    opened, forward = run(scenario())
    for reply in (opened, forward):
        assert reply.kind == "error" and reply["code"] == "bad_request", reply
        assert "context of 2048" in reply["message"]


def test_a_server_failure_is_answered_as_one_so_clients_fail_over(tiny):
    """A step that fails inside the server (here a kernel error injected with a hook: a real
    out-of-memory cannot be provoked reliably) is answered with ``server_error``, which a client
    treats as a failed server, not as a refusal of its request."""
    size = Checkpoint(tiny).config.hidden_size

    def fail(module, args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")

    async def scenario():
        async with served(tiny) as (server, maddr):
            handle = server.blocks.blocks[1].register_forward_pre_hook(fail)
            try:
                async with peer(maddr) as (host, sp):
                    stream, opened = await _open(host, sp)
                    expect(opened, "opened")
                    await write_frame(stream, Frame("step", {"step_id": "a", "position": 0}, [torch.zeros(1, 2, size)]), 10)
                    session_reply = await read_frame(stream, timeout=10)
                    forward = Frame("forward", {"start": 0, "end": 4}, [torch.zeros(1, 2, size)])
                    forward_reply = await protocols.request(host, sp, protocols.FORWARD, forward, 10)
                    return session_reply, forward_reply
            finally:
                handle.remove()

    for reply in run(scenario()):
        assert reply.kind == "error" and reply["code"] == "server_error", reply
        with pytest.raises(RemoteError) as info:
            expect(reply, "output")
        assert not info.value.refused


def test_a_client_fails_over_from_a_failing_server_and_the_output_stays_exact(tiny):
    """End to end: two servers hold the same blocks; the first step to reach either fails inside
    it (an injected kernel error). The client takes that for a failed server, not a refused
    request: it moves to the other server and the outputs equal local computation."""
    from swarm.p2p.client import ClientConfig, SwarmClient
    from swarm.p2p.table import model_id
    from swarm.p2p.verify import VerifyPolicy

    ckpt = Checkpoint(tiny)
    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(1, 3, ckpt.config.hidden_size, generator=g), torch.randn(1, 1, ckpt.config.hidden_size, generator=g)]
    local = LocalSession(ckpt.load_blocks(0, 4), 1, 16)
    expected = [local.step(x) for x in steps]
    faults = []

    def fail_once(module, args):
        if not faults:
            faults.append(module)
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory (injected)")

    async def scenario():
        async with served(tiny) as (first, m1), served(tiny, initial_peers=[m1]) as (second, _):
            handles = [s.blocks.blocks[0].register_forward_pre_hook(fail_once) for s in (first, second)]
            await eventually(lambda: len(first.table.snapshot()) == 2, what="both servers in the table")
            # no checks: a checker's success on the failed server would lift its ban, which this counts
            client = await SwarmClient.start(model_id(ckpt), 4, ClientConfig(initial_peers=[m1], push=False,
                                                                              verify=VerifyPolicy("off")))
            try:
                chain = await client.open_chain(1, 16)
                outputs = [await chain.step(x) for x in steps]
                await chain.close()
                return outputs, client.banned()
            finally:
                await client.close()
                for h in handles:
                    h.remove()

    outputs, banned = run(scenario())
    assert len(faults) == 1 and len(banned) == 1
    assert all(torch.equal(out, exp) for out, exp in zip(outputs, expected))


@pytest.mark.slow
def test_inbound_connection_slots_are_freed_when_connections_close(tiny):
    """py-libp2p keeps each inbound connection's slot (250 of them) until the host stops: a server
    refused every peer after 250 connections in its lifetime. Here the server's limit is cut to 3
    and 8 peers connect one after another."""
    import trio

    async def scenario():
        async with served(tiny) as (server, maddr):
            server.host._lp.get_network()._inbound_limiter = trio.CapacityLimiter(3)
            kinds = []
            for _ in range(8):
                async with peer(maddr) as (host, sp):
                    kinds.append((await protocols.request(host, sp, protocols.INFO, Frame("info"), 10)).kind)
            return kinds

    assert run(scenario()) == ["info_reply"] * 8


def test_a_repeated_beam_step_is_answered_from_memory(tiny):
    """The client resends a step after a push run went wrong; when that step reordered the cache
    (beam search) and its input is the same, the answer comes from memory, not an error."""
    size = Checkpoint(tiny).config.hidden_size
    g = torch.Generator().manual_seed(0)
    prompt, nxt = torch.randn(2, 3, size, generator=g), torch.randn(2, 1, size, generator=g)
    hypo = torch.tensor([1, 1])

    async def scenario():
        async with served(tiny) as (server, maddr):
            async with peer(maddr) as (host, sp):
                stream, opened = await _open(host, sp, batch=2, max_length=16)
                expect(opened, "opened")
                await write_frame(stream, Frame("step", {"step_id": "a", "position": 0}, [prompt]), 10)
                expect(await read_frame(stream, timeout=10), "output")
                outs = []
                for _ in range(2):
                    await write_frame(stream, Frame("step", {"step_id": "b", "position": 3}, [nxt, hypo]), 10)
                    outs.append(expect(await read_frame(stream, timeout=10), "output").tensors[0])
                return outs

    first, again = run(scenario())
    assert torch.equal(first, again)


def test_a_peer_that_ignores_the_yamux_window_cannot_fill_the_servers_memory(tiny):
    """py-libp2p's yamux buffers whatever a peer sends past its receive window (it only logs a
    warning): a stream's buffer now never holds more than the largest window."""

    async def scenario():
        async with served(tiny) as (server, maddr):
            async with peer(maddr) as (host, sp):
                stream = await host.open_stream(sp, protocols.INFO, timeout=10)
                await write_frame(stream, Frame("info"), 10)
                assert (await read_frame(stream, timeout=10, max_frame=1 << 24)).kind == "info_reply"
                chunk = b"x" * (1 << 20)
                try:
                    for _ in range(40):  # far past any window, never read by the server
                        stream._ns.muxed_stream.send_window = 1 << 50  # a stranger need not respect it
                        await stream.write(chunk, timeout=10)
                except P2PError:
                    pass
                from libp2p.peer.id import ID

                conns = server.host._lp.get_network().connections.get(ID.from_base58(host.peer_id), [])
                assert conns, "no connection from the peer"
                assert all(sum(map(len, c.muxed_conn.stream_buffers.values())) <= STREAM_BUFFER_LIMIT for c in conns)

    run(scenario())
