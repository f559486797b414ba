"""Steps pushed from server to server: a chain computes without a round trip through the client per
server, the last server replies with every server's output, the client's own copy of a pushed step
is answered from the last step, and the same step with another input (an upstream server replaced)
rewinds the cache and is computed anew."""

from __future__ import annotations

import asyncio
import time

import torch

import pytest

from swarm.engine.checkpoint import Checkpoint
from swarm.engine.generation import LocalSession
from swarm.p2p import protocols
from swarm.p2p.host import Host
from swarm.p2p.wire import Frame, expect, pump_frames, read_frame, write_frame
from swarm_utils import running_swarm


async def _open(host: Host, peer: str, start: int, end: int):
    stream = await host.open_stream(peer, protocols.INFERENCE, timeout=10)
    await write_frame(stream, Frame("open", {"start": start, "end": end, "batch": 1, "max_length": 256}), timeout=10)
    return stream, expect(await read_frame(stream, timeout=10), "opened")["session_id"]


async def _step(stream, step_id: str, position: int, hidden: torch.Tensor, route=None) -> None:
    fields = {"step_id": step_id, "position": position}
    if route:
        fields["route"] = route
    await write_frame(stream, Frame("step", fields, [hidden]), timeout=10)


class _Replies:
    """Frames from several sessions' streams in order of arrival, tagged with the stream's name."""

    def __init__(self, **streams):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks = [
            asyncio.create_task(pump_frames(stream, lambda item, name=name: self.queue.put((name, item))))
            for name, stream in streams.items()
        ]

    async def next(self) -> tuple[str, Frame]:
        name, item = await asyncio.wait_for(self.queue.get(), 10)
        if isinstance(item, BaseException):
            raise item
        return name, expect(item, "output")

    async def from_(self, name: str) -> Frame:
        got, frame = await self.next()
        assert got == name, f"expected a reply from {name}, got one from {got}: {frame.fields}"
        return frame

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()


@pytest.mark.slow
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
            replies = _Replies(s1=s1, s2=s2)
            inputs, firsts, outputs, pushed = [], [], [], []
            position, deadline = 0, time.monotonic() + 30
            while True:  # step until pushes flow (the first push to a peer only starts connecting)
                x = prompt if position == 0 else torch.randn(1, 1, hidden_size, generator=g)
                step_id = f"step-{len(inputs)}"
                await _step(s1, step_id, position, x, route)
                name, reply = await replies.next()
                assert reply["step_id"] == step_id
                if name == "s1":  # not pushed: s1 answers, and the client sends s2 the step itself
                    assert reply["to"] == "client" and reply["trail"] == 0 and len(reply.tensors) == 1
                    out1 = reply.tensors[0]
                    await _step(s2, step_id, position, out1)
                    reply = await replies.from_("s2")
                    assert reply["step_id"] == step_id and reply["to"] == "client" and reply["trail"] == 0
                else:  # pushed: s1 said nothing, s2 (the last server) answers with s1's output too
                    assert reply["to"] == "push" and reply["trail"] == 1 and len(reply.tensors) == 2
                    out1 = reply.tensors[1]
                inputs.append(x)
                firsts.append(out1)
                outputs.append(reply.tensors[0])
                pushed.append(name == "s2")
                position += x.shape[1]
                if sum(pushed[1:]) >= 2 or time.monotonic() > deadline:
                    break
            # the client's own copy of the last (pushed) step: the same answer, the cache unchanged
            await _step(s1, step_id, position - 1, inputs[-1])
            last_out1 = (await replies.from_("s1")).tensors[0]
            await _step(s2, step_id, position - 1, last_out1)
            repeat = (await replies.from_("s2")).tensors[0]
            # the same step with another input: the cache rewinds one position and recomputes
            other = torch.randn(1, 1, hidden_size, generator=g)
            await _step(s2, step_id, position - 1, other)
            rewound = (await replies.from_("s2")).tensors[0]
            # and the session goes on from there
            after = torch.randn(1, 1, hidden_size, generator=g)
            await _step(s2, "after", position, after)
            continued = (await replies.from_("s2")).tensors[0]
            replies.close()
            return inputs, firsts, outputs, pushed, repeat, last_out1, other, rewound, after, continued
        finally:
            await host.close()

    with running_swarm(model, ["0:2", "2:4"], tmp_path) as servers:
        inputs, firsts, outputs, pushed, repeat, last_out1, other, rewound, after, continued = asyncio.run(
            scenario([s.maddr for s in servers])
        )
    assert sum(pushed[1:]) >= 2, f"no step was pushed: {pushed}"

    blocks = ckpt.load_blocks(0, 4)
    local = LocalSession(blocks, 1, 512)
    for x, out in zip(inputs, outputs):
        assert torch.equal(local.step(x), out)
    assert torch.equal(repeat, outputs[-1])

    head, tail = LocalSession(ckpt.load_blocks(0, 2), 1, 512), LocalSession(ckpt.load_blocks(2, 4), 1, 512)
    for x, out1 in zip(inputs[:-1], firsts):
        assert torch.equal(head.step(x), out1)  # the trail of a pushed step is s1's exact output
        tail.step(out1)
    assert torch.equal(head.step(inputs[-1]), last_out1) and torch.equal(firsts[-1], last_out1)
    assert torch.equal(tail.step(other), rewound)
    assert torch.equal(tail.step(after), continued)
