"""Private swarms: a pre-shared key keeps a swarm to its members, an allow list says who serves."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from conftest import write_tiny_checkpoint
from swarm.p2p.host import Host, P2PError
from swarm.p2p.private import (
    KEY_HEADER,
    Membership,
    format_swarm_key,
    new_swarm_key,
    read_allow_peers,
    read_swarm_key,
)
from swarm.p2p.table import PeerTable, ServerInfo
from swarm_utils import cli, cli_json, local_json, running_swarm

PEER_A = "12D3KooWKXHtf3MH2zcHVmhQBYXmrzwg8J39nmBXHCkSQrrzh5gB"
PEER_B = "12D3KooWAa5H88i53M7zmZ6VtpxTS4UxuXk3JawUVdGYjrGg9ES3"


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ---- key and allow-list files ------------------------------------------------------------------


def test_keygen_writes_a_go_libp2p_swarm_key_only_its_owner_reads(tmp_path):
    path = tmp_path / "swarm.key"
    result = cli(["keygen", "--swarm-key", str(path)])
    assert result.exit_code == 0, result.output
    lines = path.read_text().splitlines()
    assert lines[:2] == [KEY_HEADER, "/base16/"] and len(bytes.fromhex(lines[2])) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_swarm_key(path) == bytes.fromhex(lines[2])
    again = cli(["keygen", "--swarm-key", str(path)])  # never overwrites a swarm's key by accident
    assert again.exit_code == 1 and "exists" in again.stderr and read_swarm_key(path) == bytes.fromhex(lines[2])
    assert cli(["keygen", "--swarm-key", str(path), "--force"]).exit_code == 0 and read_swarm_key(path) != bytes.fromhex(lines[2])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is not a swarm key file"),
        ("hello\n", "is not a swarm key file"),
        (f"{KEY_HEADER}\n/base16/\nzz\n", "holds no valid key"),
        (f"{KEY_HEADER}\n/base16/\n{'ab' * 16}\n", "has 16 bytes, not 32"),
        (f"{KEY_HEADER}\n/base58/\n{'ab' * 32}\n", "holds no valid key"),
        (b"\xff\xfe", "not text"),
    ],
)
def test_a_bad_swarm_key_file_is_one_line_naming_it(tmp_path, text, message):
    path = tmp_path / "bad.key"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=message) as info:
        read_swarm_key(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value) and str(info.value).startswith("--swarm-key")


def test_base64_keys_as_go_writes_them_are_read(tmp_path):
    import base64

    key = new_swarm_key()
    path = tmp_path / "b64.key"
    path.write_text(f"{KEY_HEADER}\n/base64/\n{base64.b64encode(key).decode()}\n")
    assert read_swarm_key(path) == key


def test_allow_peers_files(tmp_path):
    good = tmp_path / "allow.txt"
    good.write_text(f"# our servers\n{PEER_A}  # alice\n\n{PEER_B}\n")
    assert read_allow_peers(good) == {PEER_A, PEER_B}
    for text, message in (("# nobody\n", "lists no peer id"), (f"{PEER_A}\nnot-a-peer\n", "line 2: 'not-a-peer'")):
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_allow_peers(bad)
    with pytest.raises(ValueError, match="--allow-peers: cannot read"):
        read_allow_peers(tmp_path / "missing.txt")


def test_flags_name_the_file_in_one_line(tmp_path):
    missing = tmp_path / "none.key"
    for args in (["status", "--initial-peers", f"/ip4/127.0.0.1/tcp/1/p2p/{PEER_A}"], ["generate", "hi"]):
        result = cli([*args, "--swarm-key", str(missing)])
        assert result.exit_code == 1, result.output
        assert result.stderr.count("\n") == 1 and f"--swarm-key: cannot read {missing}" in result.stderr


def test_the_table_takes_only_allowed_servers():
    def info(peer: str) -> ServerInfo:
        return ServerInfo(peer_id=peer, addrs=(), model="m", start=0, end=2, instance="1", received=time.monotonic())

    table = PeerTable("m", 2, 1.0, allowed=frozenset({PEER_A}))
    assert table.update(info(PEER_A)) and not table.update(info(PEER_B))
    table.merge([info(PEER_B).to_wire()])
    assert set(table.snapshot()) == {PEER_A}
    assert Membership().may_serve(PEER_B) and not Membership(allowed=frozenset({PEER_A})).may_serve(PEER_B)


# ---- hosts -----------------------------------------------------------------------------------


def test_only_hosts_with_the_same_key_connect_and_others_are_refused_at_once():
    key, other = new_swarm_key(), new_swarm_key()

    async def main():
        hosts = [await Host.start(swarm_key=k) for k in (key, key, other, None)]
        member, peer, stranger, open_peer = hosts
        try:
            maddr = f"{member.addrs[0]}/p2p/{member.peer_id}"
            await peer.connect(maddr, timeout=10)
            assert await peer.ping(member.peer_id) < 1.0
            for outsider in (stranger, open_peer):  # another key, or none: refused within a round trip
                began = time.monotonic()
                with pytest.raises(P2PError) as info:
                    await outsider.connect(maddr, timeout=10)
                assert time.monotonic() - began < 5, info.value
                if outsider is stranger:
                    assert "not in this private swarm" in str(info.value)
            began = time.monotonic()
            with pytest.raises(P2PError, match="not in this private swarm"):  # a member dialing an open peer
                await member.connect(f"{open_peer.addrs[0]}/p2p/{open_peer.peer_id}", timeout=10)
            assert time.monotonic() - began < 5
        finally:
            for host in hosts:
                await host.close()

    run(main())


# ---- real swarms -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-private"), "llama")


@pytest.mark.slow
def test_two_private_swarms_on_the_same_hosts_never_mix(tiny, tmp_path):
    """Swarm A (two servers) and swarm B (one server of the same model) with different keys: a
    member of A given initial peers of both sees only A's servers and generates through them
    exactly; a peer without the key learns nothing; --allow-peers narrows who serves."""
    key_a, key_b = tmp_path / "a.key", tmp_path / "b.key"
    for key in (key_a, key_b):
        assert cli(["keygen", "--swarm-key", str(key)]).exit_code == 0
    with running_swarm(tiny, ["0:2", "2:4"], tmp_path / "a", ("--swarm-key", str(key_a))) as swarm_a, \
            running_swarm(tiny, ["0:4"], tmp_path / "b", ("--swarm-key", str(key_b))) as swarm_b:
        ids_a = {s.maddr.rsplit("/p2p/", 1)[1] for s in swarm_a}
        both = [swarm_a[0].maddr, swarm_b[0].maddr]
        status = cli(["status", "--json", "--swarm-key", str(key_a), *sum((["--initial-peers", m] for m in both), [])])
        assert status.exit_code == 0, status.output
        assert {s["peer_id"] for s in json.loads(status.stdout)["servers"]} == ids_a  # B's server never shows

        prompt = ["The capital of France is", "--model", str(tiny), "--max-new-tokens", "8"]
        through_a = cli_json([*prompt, "--swarm-key", str(key_a), "--initial-peers", ",".join(both)])
        assert through_a["token_ids"] == local_json(prompt)["token_ids"]

        for args in ([], ["--swarm-key", str(key_b)]):  # no key, or B's: nothing of A
            outsider = cli(["status", "--json", "--initial-peers", swarm_a[0].maddr, *args])
            assert outsider.exit_code == 1 and "--swarm-key" in outsider.stderr, outsider.output

        allow = tmp_path / "allow.txt"
        first = swarm_a[0].maddr.rsplit("/p2p/", 1)[1]
        allow.write_text(first + "\n")
        narrowed = cli(["status", "--json", "--swarm-key", str(key_a), "--allow-peers", str(allow),
                        "--initial-peers", swarm_a[1].maddr])
        assert narrowed.exit_code == 3, narrowed.output  # blocks 2:4 are served only by a peer not allowed
        assert [s["peer_id"] for s in json.loads(narrowed.stdout)["servers"]] == [first]

        refused = cli(["serve", "--model", str(tiny), "--blocks", "0:4", "--swarm-key", str(key_a),
                       "--allow-peers", str(allow), "--identity", str(tmp_path / "stranger.key"),
                       "--initial-peers", swarm_a[0].maddr], tmp_path)
        assert refused.exit_code == 1 and "is not in" in refused.stderr and refused.stderr.count("\n") == 1


def test_relayed_connections_in_a_private_swarm_and_each_on_its_own():
    """Through a relay of the same private swarm, two clients reach a server that reserved a slot;
    one leaving does not cut the other (each relayed connection closes its own streams)."""
    from swarm.p2p.circuits import circuit_addr

    key = new_swarm_key()

    async def main():
        relay, server, first, second = [await Host.start(swarm_key=key, relay_slots=4 if i == 0 else 0, hole_punch=False)
                                        for i in range(4)]
        try:
            await server.connect(f"{relay.addrs[0]}/p2p/{relay.peer_id}")
            assert await server.reserve(relay.peer_id)
            through = circuit_addr(relay.addrs[0], relay.peer_id, server.peer_id)
            for client in (first, second):
                await client.connect(through, timeout=10)
                assert client.relayed(server.peer_id)
                await client.ping(server.peer_id)
            await first.close()
            for _ in range(3):
                assert await second.ping(server.peer_id, timeout=5) < 2.0
        finally:
            for host in (relay, server, first, second):
                await host.close()

    run(main())
