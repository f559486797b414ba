"""Who a peer is and which model it serves: a key file is used by one process at a time, and a
model is known by its config and weights, not by the name of its directory."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_tiny_checkpoint
from swarm.engine.checkpoint import Checkpoint
from swarm.p2p.host import Host, IdentityInUseError
from swarm.p2p.identity import claim_default_identity, claim_identity
from swarm.p2p.table import model_id
from swarm_utils import ServerProcess, cli_json, local_json, run_swarm

PROMPT = "The capital of France is"


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


@pytest.mark.slow
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
        with ThreadPoolExecutor(2) as pool:  # both at once: each is refused on its own key file
            refused = list(pool.map(
                lambda key: run_swarm(["serve", "--model", str(model), "--identity", str(key), *join], tmp_path, timeout=60),
                (first_key, second_key),
            ))
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


# ---- a model is what it computes ---------------------------------------------------------------


def _copy(src: Path, dst: Path, transform=None, shards: int = 1) -> Path:
    """``src`` written to ``dst``: tensors passed through ``transform``, split into ``shards`` files."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, dst / f.name)
    tensors = load_file(src / "model.safetensors")
    if transform is not None:
        tensors = transform(tensors)
    config = json.loads((src / "config.json").read_text())
    config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
        return dst
    names, weight_map = sorted(tensors), {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({k: tensors[k] for k in part}, dst / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def _nudge(key: str, row: int):
    def transform(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key][row, 0] += 0.5
        return tensors

    return transform


def test_model_id_follows_config_and_weights_not_the_directory(tmp_path, tiny_checkpoints):
    original = tiny_checkpoints["llama"]
    same = {
        "renamed": _copy(original, tmp_path / "another-name"),
        "bfloat16": _copy(original, tmp_path / "bf16", lambda t: {k: v.to(torch.bfloat16) for k, v in t.items()}),
        "sharded": _copy(original, tmp_path / "sharded", shards=3),
    }
    key = "model.layers.2.mlp.down_proj.weight"
    different = {
        "first row nudged": _copy(original, tmp_path / "tuned-a", _nudge(key, 0)),
        "last row nudged": _copy(original, tmp_path / "tuned-b", _nudge(key, -1)),
        "another seed": write_tiny_checkpoint(tmp_path / "seed-1", "llama", seed=1),
        "another config": write_tiny_checkpoint(tmp_path / "deeper", "llama", num_hidden_layers=5),
    }
    expected = model_id(Checkpoint(original))
    assert {name: model_id(Checkpoint(p)) for name, p in same.items()} == dict.fromkeys(same, expected)
    ids = {name: model_id(Checkpoint(p)) for name, p in different.items()}
    assert len({expected, *ids.values()}) == 1 + len(ids), ids
    assert expected.startswith("llama-")  # readable in `swarm status`


@pytest.mark.slow
def test_a_copy_in_another_directory_joins_the_swarm(tmp_path, tiny_checkpoints):
    original = tiny_checkpoints["llama"]
    copy = _copy(original, tmp_path / "my-copy-of-the-model", shards=2)
    local = local_json(["--model", str(original), "--max-new-tokens", "8", PROMPT])
    first = second = None
    try:
        first = ServerProcess(["--model", str(original), "--blocks", "0:2", "--identity", str(tmp_path / "a.key"),
                               "--new-swarm"], tmp_path, "original")
        first.wait_ready()
        second = ServerProcess(["--model", str(copy), "--blocks", "2:4", "--identity", str(tmp_path / "b.key"),
                                "--initial-peers", first.maddr], tmp_path, "copy")
        second.wait_ready()
        # the client loads the copy; the chain needs both servers
        remote = cli_json(["--model", str(copy), "--initial-peers", second.maddr, "--max-new-tokens", "8",
                           PROMPT], tmp_path)
    finally:
        for server in (first, second):
            if server is not None:
                server.stop()
    assert remote["token_ids"] == local["token_ids"]
