"""Membership: which servers a peer counts on. Runs of one peer id (a restart) never remove each
other; every known address of a peer is tried; servers that do not answer are shown unreachable
and left out of routes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import pytest
from rich.console import Console

from swarm.cli.render import status_view
from swarm.engine.checkpoint import Checkpoint
from swarm.p2p.client import ClientConfig, SwarmClient
from swarm.p2p.host import Host, PeerUnreachableError
from swarm.p2p.routing import NoRouteError, Span
from swarm.p2p.status import gather_status
from swarm.p2p.table import PeerTable, ServerInfo, model_id
from swarm_utils import ServerProcess, cli_json, local_json

PROMPT = "The capital of France is"

pytestmark = pytest.mark.slow  # real server processes restarted, killed and frozen


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _peer_of(server: ServerProcess) -> str:
    return server.maddr.rsplit("/p2p/", 1)[1]


def _dead_port() -> int:
    with socket.socket() as s:  # bound, never listening: a dial is refused
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- runs of one peer id -----------------------------------------------------------------------


def test_an_earlier_run_never_removes_a_later_one():
    table = PeerTable("m", 4, period=1.0)

    def info(run: str, state="online", start=0):
        return ServerInfo("p", (), "m", start, 4, state=state, instance=run, received=time.monotonic())

    assert table.update(info("01"))
    assert table.update(info("02", start=1)), "a restart (later run) replaces the entry"
    assert not table.update(info("01", state="offline")), "the old run's goodbye arrives late"
    assert not table.update(info("01")), "nor does the old run's last hello come back"
    assert table.snapshot()["p"].instance == "02" and table.snapshot()["p"].start == 1
    table.merge([info("01").to_wire()])
    assert table.snapshot()["p"].instance == "02", "another table's older entry does not win either"
    table.merge([info("03").to_wire()])
    assert table.snapshot()["p"].instance == "03", "but its later run does"
    assert table.update(info("03", state="offline")) and table.snapshot() == {}
    assert ServerInfo.from_wire(info("04").to_wire(), received=0.0).instance == "04"


# ---- every address of a peer -------------------------------------------------------------------


def test_a_stale_address_does_not_hide_the_live_one(tmp_path):
    key = tmp_path / "server.key"

    async def main():
        server = await Host.start(identity=key)
        client = await Host.start()
        try:
            stale = f"/ip4/127.0.0.1/tcp/{_dead_port()}/p2p/{server.peer_id}"
            with pytest.raises(PeerUnreachableError, match="cannot connect"):
                await client.connect(stale, timeout=10)
            assert await client.connect(server.addrs[0], timeout=10) == server.peer_id  # STALE then LIVE
            # a restarted server (same key, new port) is found through the address announced last
            await server.close()
            server = await Host.start(identity=key)
            other = await Host.start()
            try:
                other.add_addrs(server.peer_id, [stale, server.addrs[0]])
                assert await other.ping(server.peer_id, timeout=10) > 0
            finally:
                await other.close()
            client.add_addrs(server.peer_id, server.addrs)  # the old connection is gone: dials again
            deadline = time.monotonic() + 10
            while True:  # the client notices the old connection closing on its own thread
                try:
                    assert await client.ping(server.peer_id, timeout=10) > 0
                    break
                except PeerUnreachableError:
                    if time.monotonic() > deadline:
                        raise
        finally:
            await client.close()
            await server.close()

    run(main())


def test_generate_and_status_with_a_stale_initial_peer(tmp_path, tiny_checkpoints):
    """`--initial-peers STALE --initial-peers LIVE`, STALE being the server's previous address (it restarted on a
    new port with the same identity), works like LIVE alone."""
    model = tiny_checkpoints["llama"]
    args = ["--model", str(model), "--blocks", "0:4", "--identity", str(tmp_path / "server.key"), "--new-swarm"]
    server = ServerProcess(args, tmp_path, "before")
    try:
        stale = server.wait_ready()
    finally:
        assert server.stop() == 0
    server = ServerProcess(args, tmp_path, "after")
    try:
        live = server.wait_ready()
        assert stale != live and stale.rsplit("/", 1)[1] == live.rsplit("/", 1)[1]
        local = local_json(["--model", str(model), "--max-new-tokens", "6", PROMPT])
        remote = cli_json(["--model", str(model), "--initial-peers", stale, "--initial-peers", live, "--max-new-tokens", "6",
                           PROMPT], tmp_path)
        status = run(gather_status([stale, live]))
    finally:
        server.stop()
    assert remote["token_ids"] == local["token_ids"]
    assert [s["state"] for s in status["servers"]] == ["online"] and len(status["unreachable_initial_peers"]) == 1


# ---- servers that do not answer ----------------------------------------------------------------


def _render(data: dict) -> str:
    console = Console(width=200, record=True)
    console.print(status_view(data))
    return console.export_text()


def test_dead_and_frozen_servers_are_unreachable_in_status_and_routes(tmp_path, tiny_checkpoints):
    model = tiny_checkpoints["llama"]
    servers: list[ServerProcess] = []

    def serve(blocks: str, *join: str) -> ServerProcess:
        # a long announce period: the tables keep listing a dead server for the whole test
        server = ServerProcess(["--model", str(model), "--blocks", blocks, "--announce-period", "60",
                                "--identity", str(tmp_path / f"{len(servers)}.key"), *join], tmp_path, f"s{len(servers)}")
        servers.append(server)
        server.wait_ready()
        return server

    async def client(first: str) -> SwarmClient:
        cfg = ClientConfig(initial_peers=[first], wait_timeout=20.0, unreachable_seconds=0.5)
        return await SwarmClient.start(model_id(Checkpoint(model)), 4, cfg)

    async def routes(first: str) -> None:
        killed = _peer_of(servers[1])
        one = await client(first)
        try:
            assert killed in one.table.snapshot()
            with pytest.raises(NoRouteError, match="block\\(s\\) 2:4"):
                await one.route(wait=False)
            assert killed in one.unreachable()
            replacement = serve("2:4", "--initial-peers", first)  # route waits until it is announced
            assert await one.route() == [Span(_peer_of(servers[0]), 0, 2), Span(_peer_of(replacement), 2, 4)]
        finally:
            await one.close()
        os.kill(replacement.proc.pid, signal.SIGSTOP)  # frozen: pings time out
        try:
            two = await client(first)
            with pytest.raises(NoRouteError, match="block\\(s\\) 2:4"):
                await two.route(wait=False)
            assert _peer_of(replacement) in two.unreachable()
        finally:
            os.kill(replacement.proc.pid, signal.SIGCONT)
        try:
            assert (await two.route())[1].peer_id == _peer_of(replacement), "pinged again, and it answers"
        finally:
            await two.close()

    try:
        first = serve("0:2", "--new-swarm").maddr
        serve("2:4", "--initial-peers", first)
        before = run(gather_status([first]))
        servers[1].proc.kill()
        servers[1].proc.wait()
        after = run(gather_status([first]))
        run(routes(first), timeout=120)
    finally:
        for server in servers:
            server.stop()
    assert [s["state"] for s in before["servers"]] == ["online", "online"] and before["gaps"] == []
    assert [s["state"] for s in after["servers"]] == ["online", "unreachable"]
    assert after["gaps"] == [[2, 4]] and after["coverage"][2:] == [0.0, 0.0]
    text = _render(after)
    assert "unreachable" in text and "gaps: 2:4" in text
