"""Per-token time through a server reached directly, hole-punched and relayed (needs root).

Emulated hosts (scripts/netlab.py), no delay added to any link, so what differs is the path: two
`swarm serve` processes of the default model (bfloat16, every block each), one on the public
side (it also relays) and one behind a NAT router. Three clients, each allowed to use one
server only (``--allow-peers``):

- direct: a client on the public side, to the public server;
- hole-punched: a client behind a port-keeping NAT, to the server behind the other NAT (the
  relayed connection made direct, DCUtR);
- relayed: a client behind a strict NAT (resets, random ports), to that server through the relay.

The three alternate, ``--runs`` generations each, ``--tokens`` greedy tokens per generation.

    python scripts/bench_nat.py [--runs 3] [--tokens 32]

Writes scripts/results/nat.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench_common import add_out, write_results  # sibling scripts (their folder is on sys.path)
from netlab import Lab, unavailable

from swarm.engine.default_model import ensure_default_model
from swarm.launch import ServeProcess

PATHS = ("direct", "hole-punched", "relayed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    add_out(parser, "nat")
    args = parser.parse_args()
    why = unavailable()
    if why:
        sys.exit(f"bench_nat needs network namespaces: {why}")
    model = ensure_default_model()
    rows: dict[str, list[dict]] = {p: [] for p in PATHS}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        lab = stack.enter_context(Lab())
        public = lab.add_host("public")
        home_nat, office_nat, strict_nat = lab.add_router("home"), lab.add_router("office"), lab.add_router("strict", False)
        hidden = lab.add_host("hidden", behind=home_nat)
        clients = {"direct": lab.add_host("client"), "hole-punched": lab.add_host("punched", behind=office_nat),
                   "relayed": lab.add_host("relayedc", behind=strict_nat)}
        servers = {}
        for name, host in (("public", public), ("hidden", hidden)):
            join = ["--new-swarm"] if not servers else ["--initial-peers", servers["public"].maddr]
            server = ServeProcess(["--model", str(model), "--dtype", "bfloat16", "--blocks", "0:30", "--host", "0.0.0.0",
                                   "--port", "4001", "--identity", str(home / f"{name}.key"), "--throughput", "10",
                                   "--announce-period", "1", *join], log=home / f"{name}.log", prefix=lab.cmd(host, []))
            stack.callback(server.stop)
            server.wait_ready(timeout=300)
            servers[name] = server
        ids = {name: s.maddr.rsplit("/p2p/", 1)[1] for name, s in servers.items()}
        deadline = time.monotonic() + 120  # the hidden server reserves a slot on the public one
        while time.monotonic() < deadline:
            status = subprocess.run(lab.cmd(clients["direct"], [sys.executable, "-m", "swarm.cli.main", "status", "--json",
                                    "--initial-peers", servers["public"].maddr]), capture_output=True, text=True)
            rows_now = [s for s in json.loads(status.stdout or '{"servers": []}')["servers"] if s["peer_id"] == ids["hidden"]]
            if rows_now and rows_now[0]["reach"] == "relayed":
                break
            time.sleep(1)
        else:
            raise RuntimeError(f"the hidden server never reserved a relay slot:\n{servers['hidden'].log()}")
        for path in PATHS:
            target = "public" if path == "direct" else "hidden"
            (home / f"allow-{path}").write_text(ids[target] + "\n")
        script = str(Path(__file__).with_name("nat_client.py"))
        for run in range(args.runs):
            order = PATHS if run % 2 == 0 else PATHS[::-1]  # alternating: the drift hits all alike
            for path in order:
                target = "public" if path == "direct" else "hidden"
                done = subprocess.run(
                    lab.cmd(clients[path], [sys.executable, script, str(model), servers["public"].maddr,
                                            str(home / f"allow-{path}"), ids[target], "--runs", "1",
                                            "--tokens", str(args.tokens)]),
                    capture_output=True, text=True, timeout=600)
                if done.returncode != 0:
                    raise RuntimeError(f"{path} client failed:\n{done.stderr[-3000:]}")
                record = json.loads(done.stdout.strip().splitlines()[-1])
                rows[path].append(record)
                print(f"{path:<13} {record['ms_per_token_median']:7.1f} ms/token (median), link {record['link']}", flush=True)
    summary = [{"path": p, "ms_per_token_median": round(statistics.median(r["ms_per_token_median"] for r in rows[p]), 2),
                "ms_per_token_mean": round(statistics.mean(r["ms_per_token_mean"] for r in rows[p]), 2),
                "link": rows[p][-1]["link"]} for p in PATHS]
    for row in summary:
        print(f"{row['path']:<13} {row['ms_per_token_median']:7.1f} ms/token median, {row['ms_per_token_mean']:7.1f} mean ({row['link']})")
    write_results(args.out, "nat", {"runs": args.runs, "tokens": args.tokens}, {"rows": summary, "runs": rows})


if __name__ == "__main__":
    main()
