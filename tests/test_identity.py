"""Who a peer is: a key file is used by one process at a time."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from swarm.p2p.host import Host, IdentityInUseError
from swarm.p2p.identity import claim_default_identity, claim_identity
from swarm_utils import ServerProcess, run_swarm


def _peer_of(server: ServerProcess) -> str:
    return server.maddr.rsplit("/p2p/", 1)[1]


# ---- one process per key file ------------------------------------------------------------------


def test_a_key_file_is_held_by_one_host_at_a_time(tmp_path):
    path = tmp_path / "keys" / "identity.key"

    async def main():
        first = await Host.start(identity=path)
        try:
            with pytest.raises(IdentityInUseError, match=rf"identity file {path} is in use .*\(pid {os.getpid()}\)"):
                await Host.start(identity=path)
            with pytest.raises(IdentityInUseError):  # another spelling of the same file
                await Host.start(identity=tmp_path / "keys" / ".." / "keys" / "identity.key")
        finally:
            await first.close()
        again = await Host.start(identity=path)  # closing a host frees its key file
        await again.close()
        return first.peer_id, again.peer_id

    first, again = asyncio.run(asyncio.wait_for(main(), 60))
    assert first == again


def test_the_default_identity_skips_key_files_held_explicitly(tmp_path):
    explicit = claim_identity(tmp_path / "identity.key")  # as `--identity $SWARM_HOME/identity.key` would
    try:
        default = claim_default_identity(tmp_path)
        second = claim_default_identity(tmp_path)
        assert (default.path.name, second.path.name) == ("identity-2.key", "identity-3.key")
        keys = {i.key_pair.public_key.to_bytes() for i in (explicit, default, second)}
        assert len(keys) == 3
        default.release()
        assert claim_default_identity(tmp_path).path.name == "identity-2.key"
    finally:
        explicit.release()


def _serve(home: Path, name: str, model: Path, *args: str) -> ServerProcess:
    return ServerProcess(["--model", str(model), "--blocks", "0:4", "--announce-period", "1", *args], home, name)


def test_servers_never_share_a_peer_id(tmp_path, tiny_checkpoints):
    """Default and explicit identities in every combination on one machine ($SWARM_HOME shared):
    distinct peer ids, and a second process on a key in use exits 1 naming the file."""
    model = tiny_checkpoints["llama"]
    first_key, second_key = tmp_path / "identity.key", tmp_path / "identity-2.key"
    servers = []
    try:
        servers.append(_serve(tmp_path, "default-1", model, "--new-swarm"))  # takes identity.key
        servers[0].wait_ready()
        join = ("--initial-peers", servers[0].maddr)
        servers.append(_serve(tmp_path, "explicit-2", model, "--identity", str(second_key), *join))
        servers[1].wait_ready()
        servers.append(_serve(tmp_path, "default-3", model, *join))  # must skip both: identity-3.key
        servers[2].wait_ready()
        refused = [
            run_swarm(["serve", "--model", str(model), "--identity", str(key), *join], tmp_path, timeout=60)
            for key in (first_key, second_key)
        ]
        assert all(s.proc.poll() is None for s in servers)
        peers = [_peer_of(s) for s in servers]
    finally:
        for s in servers:
            s.stop()
    assert len(set(peers)) == 3, peers
    assert (tmp_path / "identity-3.key").exists()
    for proc, key, owner in zip(refused, (first_key, second_key), servers):
        assert proc.returncode == 1, proc.stderr
        message = " ".join(proc.stderr.split())  # rich may wrap long lines
        assert f"error: the identity file {key} is in use by another running swarm process (pid {owner.proc.pid})" in message
        assert "give another --identity or stop that process" in message
