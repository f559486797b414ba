"""Reachability: a server learns whether peers can dial it at the addresses it announces."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from conftest import write_tiny_checkpoint
from swarm.p2p.nat import address_ip, may_dial_back, verdict
from swarm_utils import ServerProcess, cli, running_swarm

ID = "12D3KooWKXHtf3MH2zcHVmhQBYXmrzwg8J39nmBXHCkSQrrzh5gB"


@pytest.mark.parametrize(
    ("addr", "observed", "refused"),
    [
        (f"/ip4/10.0.0.5/tcp/4001/p2p/{ID}", "10.0.0.5", None),
        ("/ip4/10.0.0.5/tcp/4001", "10.0.0.5", None),
        ("/ip4/10.0.0.6/tcp/4001", "10.0.0.5", "comes from (10.0.0.5)"),  # never a third party
        ("/ip4/10.0.0.5/tcp/4001", None, "comes from (None)"),
        ("/ip6/::1/tcp/4001", "::1", None),
        ("/ip4/10.0.0.5/udp/4001", "10.0.0.5", "not an /ip4 or /ip6 TCP address"),
        ("/dns4/example.org/tcp/4001", "10.0.0.5", "not an /ip4 or /ip6 TCP address"),
        (f"/ip4/10.0.0.1/tcp/4001/p2p/{ID}/p2p-circuit", "10.0.0.1", "relayed"),
        ("nonsense", "10.0.0.5", "not an /ip4"),
    ],
)
def test_who_may_be_dialed_back(addr, observed, refused):
    why = may_dial_back(addr, observed)
    assert (why is None) if refused is None else (refused in why), why


@pytest.mark.parametrize(
    ("results", "reach"),
    [
        ({}, "unknown"),
        ({"a": None}, "unknown"),
        ({"a": False}, "private"),
        ({"a": False, "b": None}, "unknown"),
        ({"a": False, "b": True}, "public"),
        ({"a": True, "b": None}, "public"),
    ],
)
def test_verdict(results, reach):
    assert verdict(results) == reach


def test_address_ip():
    assert address_ip("/ip4/1.2.3.4/tcp/5") == "1.2.3.4" and address_ip("/ip4/1.2.3.4/udp/5") is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reach_of(maddr: str, peer_id: str, deadline: float) -> str:
    """The reachability `swarm status` shows for ``peer_id`` once it is no longer unknown."""
    reach = "unknown"
    while time.monotonic() < deadline:
        status = cli(["status", "--json", "--initial-peers", maddr])
        rows = [s for s in json.loads(status.stdout)["servers"] if s["peer_id"] == peer_id] if status.stdout else []
        reach = rows[0]["reach"] if rows else "unknown"
        if reach != "unknown":
            return reach
        time.sleep(0.5)
    return reach


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-reach"), "llama")


@pytest.mark.slow
def test_servers_learn_whether_peers_can_dial_them(tiny, tmp_path):
    """A server joining a swarm is dialed back by its peer: public. One announcing an address where
    nothing listens is told so in its log and shows as private (no server offers to relay here:
    tests/test_nat.py has one that does); with --require-reachable it refuses to serve, in one line."""
    with running_swarm(tiny, ["0:2", "2:4"], tmp_path, ("--no-relay",)) as servers:
        joined = servers[1].maddr.rsplit("/p2p/", 1)[1]
        assert _reach_of(servers[0].maddr, joined, time.monotonic() + 30) == "public"
        first = servers[0].maddr.rsplit("/p2p/", 1)[1]  # it had no one to ask at start: it asks the newcomer
        assert _reach_of(servers[0].maddr, first, time.monotonic() + 20) == "public"

        nowhere = f"/ip4/127.0.0.1/tcp/{_free_port()}"
        base = ["--model", str(tiny), "--blocks", "0:4", "--announce-period", "1", "--initial-peers", servers[0].maddr,
                "--announce-addr", nowhere]
        strict = ServerProcess([*base, "--identity", str(tmp_path / "strict.key"), "--require-reachable"], tmp_path, "strict")
        try:
            assert strict.proc.wait(60) == 1
            lines = [line for line in strict.log().splitlines() if line.strip()]
            assert lines[-1].startswith("error: --require-reachable: this server is not reachable"), lines
            assert nowhere in lines[-1]
        finally:
            strict.stop()

        lax = ServerProcess([*base, "--identity", str(tmp_path / "lax.key")], tmp_path, "lax")
        try:
            lax.wait_ready(60)
            peer = lax.maddr.rsplit("/p2p/", 1)[1]
            assert _reach_of(servers[0].maddr, peer, time.monotonic() + 30) == "private"
            assert f"no peer could dial this server at {nowhere}/p2p/{peer}" in lax.log()
        finally:
            lax.stop()


def _server(peer: str, relay: bool = True, reach: str = "public", state: str = "online", addrs=None):
    from swarm.p2p.table import ServerInfo

    return ServerInfo(peer_id=peer, addrs=tuple(addrs if addrs is not None else [f"/ip4/10.0.0.1/tcp/1/p2p/{peer}"]),
                      model="m", start=0, end=1, state=state, reach=reach, relay=relay)


@pytest.mark.parametrize(
    ("servers", "current", "expected"),
    [
        ([_server("a"), _server("b"), _server("c")], [], ["a", "b", "c"]),
        ([_server("a"), _server("b"), _server("c")], ["c"], ["c", "a", "b"]),  # a relay held stays first
        ([_server("a", reach="unknown"), _server("b")], [], ["b", "a"]),  # known reachable first
        ([_server("a", relay=False), _server("b", reach="private"), _server("c", reach="relayed")], [], []),
        ([_server("a", state="offline"), _server("b", addrs=[]), _server("me")], ["a"], []),  # gone, no address, itself
        ([_server("b", addrs=[f"/ip4/10.0.0.1/tcp/1/p2p/x/p2p-circuit/p2p/b"])], [], []),  # only relayed itself
    ],
)
def test_relay_candidates(servers, current, expected):
    from swarm.p2p.nat import relay_candidates

    assert relay_candidates({s.peer_id: s for s in servers}, "me", current) == expected


@pytest.mark.parametrize(
    ("direct", "relays", "reach"),
    [("public", 0, "public"), ("unknown", 0, "unknown"), ("private", 0, "private"), ("private", 2, "relayed")],
)
def test_announced_reach(direct, relays, reach):
    from swarm.p2p.nat import announced_reach

    assert announced_reach(direct, relays) == reach


def test_circuit_addresses():
    from swarm.p2p.circuits import circuit_addr, is_circuit

    addr = circuit_addr(f"/ip4/10.0.0.1/tcp/4001/p2p/{ID}", ID, "me")
    assert addr == f"/ip4/10.0.0.1/tcp/4001/p2p/{ID}/p2p-circuit/p2p/me" and is_circuit(addr)
    assert circuit_addr("/ip4/10.0.0.1/tcp/4001", ID, "me") == addr


def test_a_relay_holds_no_more_relayed_connections_than_its_bounds():
    """A peer opening relayed connections without end gets at most PEER_CIRCUITS of them at once;
    another peer still gets through, and the relay's total stays within its slots' bound."""
    import asyncio

    from libp2p.peer.peerinfo import PeerInfo
    from multiaddr import Multiaddr

    from swarm.p2p.circuits import CIRCUITS_PER_SLOT, PEER_CIRCUITS, circuit_addr
    from swarm.p2p.host import Host

    async def main():
        relay = await Host.start(relay_slots=4, hole_punch=False)
        target, attacker, other = [await Host.start(hole_punch=False) for _ in range(3)]
        try:
            await target.connect(f"{relay.addrs[0]}/p2p/{relay.peer_id}")
            assert await target.reserve(relay.peer_id)
            through = circuit_addr(relay.addrs[0], relay.peer_id, target.peer_id)
            relay_addr = Multiaddr(f"{relay.addrs[0]}/p2p/{relay.peer_id}")
            dest, via = PeerInfo(_id(target.peer_id), [Multiaddr(through)]), PeerInfo(_id(relay.peer_id), [relay_addr])

            async def flood() -> int:
                opened = 0
                for _ in range(PEER_CIRCUITS + 6):
                    try:
                        await attacker._circuits.transport.dial_peer_info(dest_info=dest, relay_info=via)
                        opened += 1
                    except Exception:
                        pass
                return opened

            opened = await attacker._bridge.call(flood, timeout=60, what="flood")
            assert opened == PEER_CIRCUITS  # the rest refused
            protocol = relay._circuits.protocol
            assert protocol.open_circuits <= 4 * CIRCUITS_PER_SLOT
            await other.connect(through, timeout=10)  # someone else still gets through
            assert other.relayed(target.peer_id) and await other.ping(target.peer_id, timeout=5) < 2
        finally:
            for host in (relay, target, attacker, other):
                await host.close()

    asyncio.run(asyncio.wait_for(main(), 90))


def _id(peer_id: str):
    from libp2p.peer.id import ID as PeerID

    return PeerID.from_base58(peer_id)


def test_relayed_connections_come_only_through_relays_reserved_on():
    """A peer that is not a relay this host reserved a slot on cannot hand it a "relayed"
    connection (a STOP stream): the stream is reset; through the relay reserved on, it works."""
    import asyncio

    from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID

    from swarm.p2p.circuits import circuit_addr
    from swarm.p2p.host import Host

    async def main():
        relay = await Host.start(relay_slots=2, hole_punch=False)
        target, stranger, client = [await Host.start(hole_punch=False) for _ in range(3)]
        try:
            await stranger.connect(f"{target.addrs[0]}/p2p/{target.peer_id}")

            async def stop_stream() -> bytes:
                try:  # the reset may come before the protocol's negotiation ends, or after
                    stream = await stranger._lp.new_stream(_id(target.peer_id), [STOP_PROTOCOL_ID])
                    await stream.write(b"\x00")
                    return await stream.read(100)
                except Exception:
                    return b""

            assert await stranger._bridge.call(stop_stream, timeout=20, what="stop") == b""  # reset, no answer
            await target.connect(f"{relay.addrs[0]}/p2p/{relay.peer_id}")
            assert await target.reserve(relay.peer_id)
            await client.connect(circuit_addr(relay.addrs[0], relay.peer_id, target.peer_id), timeout=10)
            assert client.relayed(target.peer_id) and await client.ping(target.peer_id, timeout=5) < 2
        finally:
            for host in (relay, target, stranger, client):
                await host.close()

    asyncio.run(asyncio.wait_for(main(), 60))
