"""Servers behind NATs (emulated: network namespaces behind nftables masquerade routers, see
scripts/netlab.py): a server nobody can dial serves through a relay on the public side, to a
client behind another NAT, with the tokens of a local run. Needs root; skipped with the reason
otherwise."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from conftest import write_tiny_checkpoint
from netlab import Lab, unavailable  # scripts/netlab.py (pytest's pythonpath)
from swarm_utils import ServerProcess, local_json, swarm_cmd, swarm_env

PROMPT = "The capital of France is"
REASON = unavailable()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(REASON is not None, reason=f"no emulated hosts: {REASON}"),
]


@pytest.fixture(scope="module")
def tiny6(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny6-nat"), "llama", num_hidden_layers=6)


def _run(lab, host, args, home, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(lab.cmd(host, swarm_cmd(*args)), capture_output=True, text=True, timeout=timeout,
                          env=swarm_env(home))


def test_a_server_behind_nat_serves_a_client_behind_another_through_a_relay(tiny6, tmp_path):
    with Lab() as lab:
        public = lab.add_host("public")
        home_nat, office_nat = lab.add_router("home"), lab.add_router("office")
        hidden = lab.add_host("hidden", behind=home_nat)
        client = lab.add_host("client", behind=office_nat)
        servers = []
        try:
            common = ["--model", str(tiny6), "--host", "0.0.0.0", "--port", "4001", "--announce-period", "1"]
            relay = ServerProcess([*common, "--blocks", "0:3", "--new-swarm", "--identity", str(tmp_path / "relay.key")],
                                  tmp_path, "relay", prefix=tuple(lab.cmd(public, [])))
            servers.append(relay)
            relay.wait_ready()
            behind = ServerProcess([*common, "--blocks", "3:6", "--initial-peers", relay.maddr,
                                    "--identity", str(tmp_path / "hidden.key")], tmp_path, "hidden",
                                   prefix=tuple(lab.cmd(hidden, [])))
            servers.append(behind)
            behind.wait_ready()
            hidden_id = behind.maddr.rsplit("/p2p/", 1)[1]

            deadline, row = time.monotonic() + 60, {}
            while time.monotonic() < deadline:  # dial-backs fail, it reserves a slot on the relay
                status = _run(lab, client, ["status", "--json", "--initial-peers", relay.maddr], tmp_path)
                rows = [s for s in json.loads(status.stdout or '{"servers": []}')["servers"] if s["peer_id"] == hidden_id]
                row = rows[0] if rows else {}
                if row.get("reach") == "relayed" and row.get("state") == "online":
                    break
                time.sleep(1)
            assert row.get("reach") == "relayed", (row, behind.log())
            assert all("/p2p-circuit/" in a for a in row["addrs"]), row
            assert "no peer could dial this server at" in behind.log()

            args = [PROMPT, "--model", str(tiny6), "--max-new-tokens", "12"]
            done = _run(lab, client, ["generate", "--json", *args, "--initial-peers", relay.maddr], tmp_path)
            assert done.returncode == 0, done.stderr[-3000:]
            assert json.loads(done.stdout)["token_ids"] == local_json(args)["token_ids"]
        finally:
            for server in servers:
                server.stop()
