"""One hand-off per hop (issue 22): once a session is open, its steps are read, computed and
answered or pushed on without the server's event loop, so a busy (here: blocked) event loop
cannot delay a token. Two servers in this process, a client on a loop of its own."""

from __future__ import annotations

import asyncio

import pytest
import torch

from conftest import write_tiny_checkpoint
from server_utils import eventually, served
from swarm.engine.checkpoint import Checkpoint
from swarm.engine.generation import LocalSession
from swarm.p2p import protocols
from swarm.p2p.host import Host
from swarm.p2p.loop import BackgroundLoop, run
from swarm.p2p.wire import Frame, expect, read_frame, write_frame


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("session-loop"), "llama")


async def _open_chain(addrs: list[str]):
    """On the client's loop: a host with a session on each server (blocks 0:2 and 2:4)."""
    host = await Host.start()
    chain = []
    for maddr, (start, end) in zip(addrs, [(0, 2), (2, 4)]):
        server_peer = await host.connect(maddr, timeout=10)
        stream = await host.open_stream(server_peer, protocols.INFERENCE, timeout=10)
        await write_frame(stream, Frame("open", {"start": start, "end": end, "batch": 1, "max_length": 32}), 10)
        chain.append((server_peer, stream, expect(await read_frame(stream, timeout=10), "opened")["session_id"]))
    return host, chain


async def _token(chain, step_id: str, position: int, hidden: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """On the client's loop: one step through both servers, routed so the first pushes to the
    second; returns the chain's output and whether it came by push."""
    (_, first, _), (second_peer, second, second_id) = chain
    route = [{"peer": second_peer, "session": second_id}]
    await write_frame(first, Frame("step", {"step_id": step_id, "position": position, "route": route}, [hidden]), 10)
    reply = await asyncio.wait_for(_first_reply(first, second), 30)
    if reply[0] == "first":  # not pushed (the link to the second server was not up yet): send it on
        middle = expect(reply[1], "output").tensors[0]
        await write_frame(second, Frame("step", {"step_id": step_id, "position": position}, [middle]), 10)
        return expect(await read_frame(second, timeout=30), "output").tensors[0], False
    output = expect(reply[1], "output")
    assert output["to"] == "push" and output["trail"] == 1, output.fields
    return output.tensors[0], True


async def _first_reply(first, second):
    reads = {asyncio.create_task(read_frame(s, timeout=30)): name for s, name in ((first, "first"), (second, "second"))}
    done, pending = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    task = done.pop()
    return reads[task], task.result()


def test_steps_and_pushes_go_on_while_the_servers_event_loop_is_blocked(tiny):
    ckpt = Checkpoint(tiny)
    g = torch.Generator().manual_seed(3)
    steps = [torch.randn(1, 5, ckpt.config.hidden_size, generator=g)]
    steps += [torch.randn(1, 1, ckpt.config.hidden_size, generator=g) for _ in range(4)]
    local = LocalSession(ckpt.load_blocks(0, 4), 1, 32)
    expected = [local.step(x) for x in steps]
    client = BackgroundLoop()

    async def scenario():
        async with served(tiny, blocks="0:2") as (first, m1), served(tiny, blocks="2:4", initial_peers=[m1]) as (second, m2):
            await eventually(lambda: second.host.peer_id in first.table, what="the second server in the first's table")
            host, chain = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_open_chain([m1, m2]), client.loop))
            try:
                # an open session's loop is started from the event loop once its open is answered
                for server in (first, second):
                    await eventually(lambda server=server: all(s.serving for s in server.sessions.values()),
                                     what="the sessions' loops started")
                outputs = [client.call(_token(chain, "s0", 0, steps[0]), timeout=60)]
                await eventually(
                    lambda: any(link.stream is not None for link in first.inference.loop.push_links.values()),
                    what="the push link between the servers",
                )
                # a new stream's handler starts on the event loop, once: let the second's start
                await eventually(lambda: second._streams.get((first.host.peer_id, protocols.PUSH)), what="the push handler")

                async def rest():
                    position = steps[0].shape[1]
                    for i, x in enumerate(steps[1:], 1):
                        outputs.append(await _token(chain, f"s{i}", position, x))
                        position += x.shape[1]

                # called synchronously: both servers' event loop (this one) is blocked meanwhile
                client.call(rest(), timeout=60)

                async def close() -> list[str]:
                    kinds = []
                    for _, stream, _ in chain:
                        await write_frame(stream, Frame("close"), 10)
                        kinds.append((await read_frame(stream, timeout=10)).kind)
                    return kinds

                assert client.call(close(), timeout=30) == ["closed", "closed"]
                for server in (first, second):  # freed, and every frame's bytes given back
                    await eventually(lambda server=server: not server.sessions, what="the sessions freed")
                    await eventually(lambda server=server: server.frames.used() == 0, what="the frames released")
                return outputs
            finally:
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(host.close(), client.loop))

    try:
        outputs = run(scenario())
    finally:
        client.close()
    assert all(pushed for _, pushed in outputs[1:]), "the steps taken with the event loop blocked were not all pushed"
    for (output, _), want in zip(outputs, expected):
        assert torch.equal(output, want)
