"""Servers behind NATs (emulated: network namespaces behind nftables masquerade routers, see
scripts/netlab.py): a server nobody can dial serves through a relay on the public side, to a
client behind another NAT, with the tokens of a local run. Needs root; skipped with the reason
otherwise."""

from __future__ import annotations

import json
import subprocess
import time


from conftest import netns_marks
from netlab import Lab  # scripts/netlab.py (pytest's pythonpath)
from swarm_utils import ServerProcess, local_json, swarm_cmd, swarm_env

PROMPT = "The capital of France is"
pytestmark = netns_marks()


def _run(lab, host, args, home, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(lab.cmd(host, swarm_cmd(*args)), capture_output=True, text=True, timeout=timeout,
                          env=swarm_env(home))


def test_a_server_behind_nat_serves_a_client_behind_another_through_a_relay(tiny6, tmp_path):
    """Through the relay, then direct where the NATs allow hole punching (the office's), relayed
    where they do not (the strict NAT's, which resets unasked connections and picks random ports):
    the tokens of a local run either way."""
    with Lab() as lab:
        public = lab.add_host("public")
        home_nat, office_nat = lab.add_router("home"), lab.add_router("office")
        strict_nat = lab.add_router("strict", hole_punching=False)
        hidden = lab.add_host("hidden", behind=home_nat)
        client = lab.add_host("client", behind=office_nat)
        strict = lab.add_host("strict-client", behind=strict_nat)
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

            assert row["link"] == "direct", row  # the status process's own connection, hole-punched

            args = [PROMPT, "--model", str(tiny6), "--max-new-tokens", "12"]
            expected = local_json(args)["token_ids"]
            for host, link in ((client, "direct"), (strict, "relayed")):
                done = _run(lab, host, ["generate", "--json", *args, "--initial-peers", relay.maddr], tmp_path)
                assert done.returncode == 0, done.stderr[-3000:]
                assert json.loads(done.stdout)["token_ids"] == expected
                status = _run(lab, host, ["status", "--json", "--initial-peers", relay.maddr], tmp_path)
                rows = [s for s in json.loads(status.stdout)["servers"] if s["peer_id"] == hidden_id]
                assert rows and rows[0]["link"] == link, (host.name, rows)
        finally:
            for server in servers:
                server.stop()


def test_a_relay_killed_mid_generation_is_a_failed_link(tiny6, tmp_path):
    """Two public servers of blocks 0:3, both relays; a server of 3:6 behind a NAT reserves on both.
    The relay its client reaches it through is SIGKILLed mid-generation: the client fails over
    (the other relay's server for 0:3, the other relay to reach 3:6) and the tokens are a local run's."""
    import sys
    from pathlib import Path

    from swarm.engine.client import ClientModel, generate_local
    from swarm.engine.generation import GenerationConfig

    tokens, pause_at = 16, 6
    model = ClientModel.load(tiny6)
    expected = generate_local(model, model.encode(PROMPT), GenerationConfig(max_new_tokens=tokens, eos_token_ids=()))
    with Lab() as lab:
        publics = [lab.add_host("r1"), lab.add_host("r2")]
        home_nat = lab.add_router("home")
        hidden, client = lab.add_host("hidden", behind=home_nat), lab.add_host("client")
        servers = {}
        try:
            common = ["--model", str(tiny6), "--host", "0.0.0.0", "--port", "4001", "--announce-period", "1"]
            for host in publics:
                join = ["--new-swarm"] if not servers else ["--initial-peers", servers["r1"].maddr]
                servers[host.name] = ServerProcess([*common, "--blocks", "0:3", *join, "--identity",
                                                    str(tmp_path / f"{host.name}.key")], tmp_path, host.name,
                                                   prefix=tuple(lab.cmd(host, [])))
                servers[host.name].wait_ready()
            servers["hidden"] = ServerProcess([*common, "--blocks", "3:6", "--initial-peers", servers["r1"].maddr,
                                               "--identity", str(tmp_path / "hidden.key")], tmp_path, "hidden",
                                              prefix=tuple(lab.cmd(hidden, [])))
            hidden_id = servers["hidden"].wait_ready().rsplit("/p2p/", 1)[1]
            relay_ids = {servers[h.name].maddr.rsplit("/p2p/", 1)[1]: h.name for h in publics}
            deadline, addrs = time.monotonic() + 60, []
            while time.monotonic() < deadline and len(addrs) < 2:  # reserved on both relays
                status = _run(lab, client, ["status", "--json", "--initial-peers", servers["r1"].maddr], tmp_path)
                rows = [s for s in json.loads(status.stdout or '{"servers": []}')["servers"] if s["peer_id"] == hidden_id]
                addrs = [a for a in (rows[0]["addrs"] if rows else []) if "/p2p-circuit/" in a]
                time.sleep(1)
            assert len(addrs) == 2, servers["hidden"].log()
            first_relay = relay_ids[addrs[0].split("/p2p/")[1].split("/")[0]]  # the address a client dials first

            script = Path(__file__).with_name("netns_client.py")
            with open(tmp_path / "client.log", "w") as log:
                proc = lab.popen(client, [sys.executable, str(script), str(tiny6), servers["r1"].maddr, str(pause_at), "4",
                                          str(tokens)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                 text=True, env=swarm_env(tmp_path))
            line = proc.stdout.readline()
            assert line.startswith(f"serving {hidden_id}"), (tmp_path / "client.log").read_text()[-3000:]
            servers[first_relay].proc.kill()  # mid-generation: the relay and one server of 0:3 die
            out, _ = proc.communicate("go\n", timeout=120)
            assert proc.returncode == 0, (tmp_path / "client.log").read_text()[-3000:]
            assert json.loads(out.strip().splitlines()[-1])["tokens"] == expected
        finally:
            for server in servers.values():
                server.stop()
