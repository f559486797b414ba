"""A swarm across hosts: servers in 3 network namespaces and a client in a fourth, joined by veth
pairs to a bridge (scripts/netlab.py), so peers talk real TCP between distinct addresses. Servers
listen on 0.0.0.0 and announce their interface's address. One server's link is cut mid-generation
(a spare waits on a fifth host): the output still equals the local run. Needs root; skipped with
the reason otherwise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


from conftest import netns_marks
from netlab import Lab  # scripts/netlab.py (pytest's pythonpath)
from swarm.engine.client import ClientModel, generate_local
from swarm.engine.generation import GenerationConfig
from swarm_utils import ServerProcess, swarm_env

PROMPT = "The capital of France is"
TOKENS, PAUSE_AT, BLOCK = 24, 8, 2
CLIENT = Path(__file__).with_name("netns_client.py")

pytestmark = netns_marks()


def test_swarm_across_hosts_fails_over_a_cut_link(tiny6, tmp_path):
    cfg = GenerationConfig(max_new_tokens=TOKENS, eos_token_ids=())
    client_model = ClientModel.load(tiny6)
    expected = generate_local(client_model, client_model.encode(PROMPT), cfg)
    with Lab() as lab:
        hosts = [lab.add_host(name) for name in ("s1", "s2", "s3", "client", "spare")]
        servers: dict[str, tuple] = {}
        try:
            for host, blocks in zip([hosts[0], hosts[1], hosts[2], hosts[4]], ["0:2", "2:4", "4:6", "2:4"]):
                join = ["--new-swarm"] if not servers else ["--initial-peers", servers["s1"][0].maddr]
                # s3 names its address itself, as behind a port forward; the others announce their interface's
                announce = ["--announce-addr", f"/ip4/{host.ip}/tcp/4001"] if host.name == "s3" else []
                args = ["--model", str(tiny6), "--blocks", blocks, "--host", "0.0.0.0", "--port", "4001",
                        "--identity", str(tmp_path / f"{host.name}.key"), "--announce-period", "1", *announce, *join]
                server = ServerProcess(args, tmp_path, host.name, prefix=tuple(lab.cmd(host, [])))
                servers[host.name] = (server, host)
                if not join[0].startswith("--initial"):
                    server.wait_ready()
            for server, host in servers.values():
                # announced: the host's own address, not the wildcard it listens on
                assert (server.maddr or server.wait_ready()).startswith(f"/ip4/{host.ip}/tcp/4001/p2p/"), server.maddr
            by_peer = {s.maddr.rsplit("/p2p/", 1)[1]: (s, h) for s, h in servers.values()}

            with open(tmp_path / "client.log", "w") as log:
                client = lab.popen(
                    hosts[3],
                    [sys.executable, str(CLIENT), str(tiny6), servers["s1"][0].maddr, str(PAUSE_AT), str(BLOCK), str(TOKENS)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=swarm_env(tmp_path),
                )
            line = client.stdout.readline()
            assert line.startswith("serving "), (tmp_path / "client.log").read_text()[-3000:]
            victim_id = line.split()[1]
            victim, victim_host = by_peer[victim_id]
            assert victim_host.name in ("s2", "spare")
            lab.set_link(victim_host, up=False)  # its packets vanish: found by the client's step timeout
            out, _ = client.communicate("go\n", timeout=120)
            assert client.returncode == 0, (tmp_path / "client.log").read_text()[-3000:]
            result = json.loads(out.strip().splitlines()[-1])
        finally:
            for server, _ in servers.values():
                server.stop()
    assert result["tokens"] == expected
    assert victim_id in result["served_by"] and result["served_by"][-1] != victim_id  # failed over to the other host
