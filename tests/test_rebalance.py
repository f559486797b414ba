"""Servers with --blocks auto move where the swarm is weakest (in-process servers on loopback):
the move itself, sessions on the old range drained to clients that fail over, requests for the
old range answered busy, and no further moves once balanced."""

from __future__ import annotations

import torch

from server_utils import eventually, peer
import pytest

from swarm.p2p import protocols
from swarm.p2p.loop import run
from swarm.p2p.server import BlockServer, ServerConfig
from swarm.p2p.status import gather_status
from swarm.p2p.wire import Frame, read_frame, write_frame


@pytest.mark.slow
def test_an_auto_server_moves_to_the_weakest_blocks_and_drains_its_old_range(tiny_checkpoints):
    model = tiny_checkpoints["llama"]  # 4 blocks, hidden 64
    common = dict(model_dir=model, announce_period=0.5)

    async def main():
        x = await BlockServer.start(ServerConfig(blocks="0:2", new_swarm=True, throughput=1.0, **common))
        first = [x.host.addrs[0]]
        servers = [x]
        try:
            y = await BlockServer.start(ServerConfig(
                blocks="auto", num_blocks=2, choice_delay=0, initial_peers=first, throughput=5.0, balance_period=0.2,
                drain_timeout=1.0, **common))
            servers.append(y)
            assert (y.start_block, y.end_block) == (2, 4)  # the only window nobody serves
            async with peer(y.host.addrs[0]) as (host, sp):
                stream = await host.open_stream(sp, protocols.INFERENCE, timeout=10)
                await write_frame(stream, Frame("open", {"start": 2, "end": 4, "batch": 1, "max_length": 16}), 10)
                assert (await read_frame(stream, timeout=10)).kind == "opened"
                hidden = torch.randn(1, 3, 64)
                await write_frame(stream, Frame("step", {"step_id": "a", "position": 0}, [hidden]), 10)
                assert (await read_frame(stream, timeout=10)).kind == "output"

                # a strong server takes 2:4 as well: 0:2 (throughput 1) is now the bottleneck
                servers.append(await BlockServer.start(ServerConfig(blocks="2:4", initial_peers=first, throughput=5.0, **common)))
                await eventually(lambda: y.start_block == 0 and y.state == "online", timeout=30, what="the move to 0:2")
                assert y.moves and y.moves[-1]["from"] == [2, 4] and y.moves[-1]["to"] == [0, 2]

                # the session on the old range ends within the drain timeout: its client fails over
                reply = await read_frame(stream, timeout=10)
                assert reply.kind == "error" and reply["code"] == "session_expired", reply

                # a client with an older view asking for 2:4 goes elsewhere; 0:2 is served here
                forward = await protocols.request(host, sp, protocols.FORWARD, Frame("forward", {"start": 2, "end": 4}, [hidden]), 10)
                assert forward.kind == "error" and forward["code"] == "busy", forward
                forward = await protocols.request(host, sp, protocols.FORWARD, Frame("forward", {"start": 0, "end": 2}, [hidden]), 10)
                assert forward.kind == "result" and forward.tensors[0].shape == hidden.shape

            # balanced now (totals 6, 6, 5, 5 against 1, 1, 10, 10): ten more checks, no more moves
            checks = y.balance_checks
            await eventually(lambda: y.balance_checks >= checks + 10, timeout=30, what="ten more balance checks")
            assert len(y.moves) == 1
            # `swarm status` shows the move, as y announces it
            status = await gather_status(first)
            assert [(m["peer_id"], m["from"], m["to"]) for m in status["moves"]] == [(y.host.peer_id, [2, 4], [0, 2])]
        finally:
            for server in reversed(servers):
                await server.stop()

    run(main())

