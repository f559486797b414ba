"""Steps pushed from server to server: a chain computes without a round trip through the client per
server, the client's own copy of a pushed step is answered from the last step, and the same step
with another input (an upstream server replaced) rewinds the cache and is computed anew."""

from __future__ import annotations

import asyncio
import time

import torch

from swarm.engine.checkpoint import Checkpoint
from swarm.engine.generation import LocalSession
from swarm.p2p import protocols
from swarm.p2p.host import Host
from swarm.p2p.wire import Frame, expect, read_frame, write_frame
from swarm_utils import running_swarm


async def _open(host: Host, peer: str, start: int, end: int):
    stream = await host.open_stream(peer, protocols.INFERENCE, timeout=10)
    await write_frame(stream, Frame("open", {"start": start, "end": end, "batch": 1, "max_length": 512}), timeout=10)
    return stream, expect(await read_frame(stream, timeout=10), "opened")["session_id"]


async def _step(stream, step_id: str, position: int, hidden: torch.Tensor, route=None) -> None:
    fields = {"step_id": step_id, "position": position}
    if route:
        fields["route"] = route
    await write_frame(stream, Frame("step", fields, [hidden]), timeout=10)


async def _output(stream) -> Frame:
    return expect(await read_frame(stream, timeout=10), "output")


def test_pushed_steps_equal_local_and_repeats_are_answered_exactly(tmp_path, tiny_checkpoints):
    model = tiny_checkpoints["llama"]
    ckpt = Checkpoint(model)
    hidden_size = ckpt.config.hidden_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, 3, hidden_size, generator=g)

    async def scenario(maddrs: list[str]):
        host = await Host.start()
        try:
            first = await host.connect(maddrs[0], timeout=10)
            second = await host.connect(maddrs[1], timeout=10)
            s1, _ = await _open(host, first, 0, 2)
            s2, sid2 = await _open(host, second, 2, 4)
            route = [{"peer": second, "session": sid2}]
            inputs, outputs, pushed = [], [], []
            position, deadline = 0, time.monotonic() + 30
            while True:  # step until pushes flow (the first push to a peer only starts connecting)
                x = prompt if position == 0 else torch.randn(1, 1, hidden_size, generator=g)
                step_id = f"step-{len(inputs)}"
                await _step(s1, step_id, position, x, route)
                out1 = await _output(s1)
                assert out1["step_id"] == step_id
                if not out1["pushed"]:
                    await _step(s2, step_id, position, out1.tensors[0])
                out2 = await _output(s2)
                assert out2["step_id"] == step_id and out2["pushed"] is False  # s2 is the last server
                inputs.append(x)
                outputs.append(out2.tensors[0])
                pushed.append(out1["pushed"])
                position += x.shape[1]
                if sum(pushed[1:]) >= 2 or time.monotonic() > deadline:
                    break
            # the client's own copy of the last (pushed) step: the same answer, the cache unchanged
            await _step(s1, step_id, position - 1, inputs[-1])
            last_out1 = (await _output(s1)).tensors[0]
            await _step(s2, step_id, position - 1, last_out1)
            repeat = (await _output(s2)).tensors[0]
            # the same step with another input: the cache rewinds one position and recomputes
            other = torch.randn(1, 1, hidden_size, generator=g)
            await _step(s2, step_id, position - 1, other)
            rewound = (await _output(s2)).tensors[0]
            # and the session goes on from there
            after = torch.randn(1, 1, hidden_size, generator=g)
            await _step(s2, "after", position, after)
            continued = (await _output(s2)).tensors[0]
            return inputs, outputs, pushed, repeat, last_out1, other, rewound, after, continued
        finally:
            await host.close()

    with running_swarm(model, ["0:2", "2:4"], tmp_path) as servers:
        inputs, outputs, pushed, repeat, last_out1, other, rewound, after, continued = asyncio.run(
            scenario([s.maddr for s in servers])
        )
    assert sum(pushed[1:]) >= 2, f"no step was pushed: {pushed}"

    blocks = ckpt.load_blocks(0, 4)
    local = LocalSession(blocks, 1, 512)
    for x, out in zip(inputs, outputs):
        assert torch.equal(local.step(x), out)
    assert torch.equal(repeat, outputs[-1])

    head, tail = LocalSession(ckpt.load_blocks(0, 2), 1, 512), LocalSession(ckpt.load_blocks(2, 4), 1, 512)
    for x in inputs[:-1]:
        tail.step(head.step(x))
    assert torch.equal(head.step(inputs[-1]), last_out1)
    assert torch.equal(tail.step(other), rewound)
    assert torch.equal(tail.step(after), continued)
