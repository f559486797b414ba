"""The paper's experiment on this machine: a swarm over emulated Internet links against one machine
offloading the model from disk, side by side (needs root).

Model: the random 1.1B Llama-shaped checkpoint (bfloat16, made by bench_local.py). Memory: every
process measured (the offloading one, each server, the client) runs in a memory cgroup capped at
``--cap`` of the weights' size (page cache included), with caches dropped first.

- **Offloading**: one process, the whole model, every block's weights read from the safetensors
  file at every step (scripts/offload.py; the faster of its ways, named in the table).
- **Swarm**: 3 `swarm serve` processes on 3 emulated hosts (network namespaces, scripts/netlab.py),
  a third of the blocks each, the client on a 4th host. Each host's link is shaped by tbf; latency
  comes from a delaying relay on each server's host, which the server announces with
  ``--announce-addr`` (it listens on 127.0.0.1 behind it). Each row prints the round trip and the
  bandwidth measured through the emulated links in that run.
- **Analytic limit** at a round trip RTT: 1 / (compute per token + 4 × RTT/2): with push, a token
  crosses 4 links (client → 1 → 2 → 3 → client). Compute per token is the same model decoding in
  one process with every weight in memory, measured before and after the sweep.

    python scripts/bench_paper.py [--steps 8] [--rtts 0,10,25,50,100,200] [--sweep-mbit 100]

Writes scripts/results/paper.json and scripts/results/paper_decode_vs_rtt.png.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import swarm  # noqa: F401  (first: it sets OpenMP's spin count, which must precede PyTorch)
import torch

from bench_local import bench as local_bench, random_1b_checkpoint  # sibling scripts (their folder is on sys.path)
from memcap import drop_caches, memory_cgroup
from netlab import Lab, Relay, unavailable

from swarm.engine.checkpoint import Checkpoint
from swarm.launch import ServeProcess, even_ranges

RESULTS = Path(__file__).parent / "results"
ROWS = [("1 Gbit/s, < 5 ms", 1000.0, 0.0), ("100 Mbit/s, < 5 ms", 100.0, 0.0), ("100 Mbit/s, 100 ms", 100.0, 100.0)]
HOPS = 4  # one-way latencies per decoded token through 3 servers with push
SERVER_PORT, RELAY_PORT = 4001, 4000
COLUMNS = ["decode_128", "decode_1024", "forward_1x128", "forward_16x128"]


class Swarm:
    """3 capped servers on 3 hosts behind delaying relays, and a client host."""

    def __init__(self, stack: ExitStack, model: Path, server_cap: int, client_cap: int, home: Path):
        self.lab = stack.enter_context(Lab())
        self.model, self.home = model, home
        self.hosts = [self.lab.add_host(f"s{i + 1}") for i in range(3)]
        self.client_host = self.lab.add_host("client")
        self.relays = [Relay(self.lab, h, RELAY_PORT, SERVER_PORT, 0.0) for h in self.hosts]
        tag = f"swarm-paper-{os.getpid()}"
        self.groups = [stack.enter_context(memory_cgroup(f"{tag}-{h.name}", server_cap)) for h in self.hosts]
        self.client_group = stack.enter_context(memory_cgroup(f"{tag}-client", client_cap))
        self.servers: list[ServeProcess] = []
        ranges = even_ranges(Checkpoint(model).num_blocks, 3)
        drop_caches()
        for i, host in enumerate(self.hosts):
            announce = f"/ip4/{host.ip}/tcp/{RELAY_PORT}"
            join = ["--new-swarm"] if i == 0 else ["--initial-peers", self.addrs[0]]
            args = ["--model", str(model), "--dtype", "bfloat16", "--blocks", ranges[i], "--host", "127.0.0.1",
                    "--port", str(SERVER_PORT), "--announce-addr", announce, "--identity", str(home / f"{host.name}.key"),
                    "--threads", "2", "--cache-tokens", "4096", "--throughput", "10", "--bandwidth", "100", *join]
            # the cgroup's shell first: `ip netns exec` mounts its own /sys, which would hide the cgroups
            prefix = [*self.groups[i].command([]), *self.lab.cmd(host, [])]
            server = ServeProcess(args, log=home / f"{host.name}.log", prefix=prefix)
            self.servers.append(server)
            stack.callback(server.stop)
            server.wait_ready(timeout=300)

    @property
    def addrs(self) -> list[str]:
        return [server.maddr for server in self.servers]

    def shape(self, mbit: float, rtt_ms: float) -> None:
        for host in [*self.hosts, self.client_host]:
            self.lab.shape(host, mbit)
        for relay in self.relays:
            relay.set_delay(rtt_ms / 2)

    def client(self, *args: str, on_set_rtt=None, steps: int = 8) -> list[dict]:
        """Run scripts/paper_client.py on the client host; its JSON lines (``set-rtt`` ones answered
        after ``on_set_rtt(ms)``)."""
        argv = [sys.executable, str(Path(__file__).with_name("paper_client.py")), str(self.model),
                "--peers", ",".join(self.addrs), "--steps", str(steps), *args]
        with open(self.home / "client.log", "w") as log:
            proc = self.lab.popen(self.client_host, argv, self.client_group.command([]), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=log, text=True)
        out = []
        for line in proc.stdout:
            record = json.loads(line)
            print("   ", {k: v for k, v in record.items() if k != "step_ms"}, flush=True)
            if record["what"] == "set-rtt":
                on_set_rtt(record["rtt_ms"])
                proc.stdin.write("done\n")
                proc.stdin.flush()
            else:
                out.append(record)
        if proc.wait() != 0:
            servers = "\n".join(f"{h.name} (exit {s.proc.poll()}, OOM kills {g.oom_kills()}): {s.log(1500)}"
                                 for h, g, s in zip(self.hosts, self.groups, self.servers))
            raise RuntimeError(f"the client failed:\n{(self.home / 'client.log').read_text()[-3000:]}\nservers:\n{servers}")
        return out

    def peaks(self) -> list[int | None]:
        return [g.peak_bytes() for g in [*self.groups, self.client_group]]


def local_compute(model: Path, steps: int) -> float:
    """Seconds per decoded token with every weight in memory, in one process (2 threads)."""
    return 1 / local_bench(model, torch.bfloat16, 128, steps)["decode_tok_s"]


def offloading(model: Path, cap: int, steps: int) -> dict:
    """Both of offload.py's ways of reading the weights, capped; the row is the faster's (by decode
    after a 128-token prompt), the other kept in the results."""
    import offload

    runs = {}
    for mode in offload.MODES:
        print(f"  offloading, weights read by {mode} ...", flush=True)
        plan = offload.Plan(path=str(model), mode=mode, prompts=(128, 1024), steps=steps, forwards=((1, 128), (16, 128)))
        runs[mode] = offload.baseline(plan, cap)
        print(offload.summary(runs[mode]), flush=True)
    speed = lambda mode: runs[mode]["decode"]["128"].get("steps_per_s", 0.0)  # noqa: E731
    best = max(runs, key=speed)
    r = runs[best]
    row = {"setup": f"offloading ({'streamed' if best == 'stream' else 'memory-mapped'} reads)", "mode": best}
    row |= {f"decode_{p}": r["decode"][p].get("steps_per_s") for p in ("128", "1024")}
    row |= {f"forward_{f}": r["forward"][f].get("tokens_per_s") for f in ("1x128", "16x128")}
    return {"row": row, "runs": runs}


def table(results: dict) -> str:
    def cell(row: dict, key: str) -> str:
        v = row.get(key)
        return "-" if v is None else f"{v:.2f}" if key.startswith("decode") else f"{v:.0f}"

    lines = ["| setup | RTT measured | bandwidth measured | steps/s, 128-token prompt | steps/s, 1,024-token prompt "
             "| forward tok/s, 1×128 | forward tok/s, 16×128 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        rtt = "-" if row.get("rtt_ms") is None else f"{row['rtt_ms']:.1f} ms"
        mbit = "-" if row.get("mbit") is None else f"{row['mbit']:.0f} Mbit/s"
        lines.append(f"| {row['setup']} | {rtt} | {mbit} | " + " | ".join(cell(row, k) for k in COLUMNS) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = results["sweep"]
    rtts = [p["rtt_ms"] for p in sweep]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.plot(rtts, [p["steps_per_s"] for p in sweep], "o-", label="swarm (3 servers, measured)")
    ax.plot(rtts, [p["limit"] for p in sweep], "--", label=f"analytic limit 1/(compute + {HOPS}·RTT/2)")
    ax.plot(rtts, [p["latency_only"] for p in sweep], ":", label=f"swarm at the lowest RTT + {HOPS}·ΔRTT/2")
    off = results["rows"][0].get("decode_128")
    if off:
        ax.axhline(off, color="gray", linestyle=":", label="offloading (one machine, measured)")
    ax.set_xlabel("round-trip time between hosts (ms, measured)")
    ax.set_ylabel("decode steps/s after a 128-token prompt")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks([1, 2, 3, 5, 10, 20])
    ax.set_title(f"{results['model']} in {results['dtype']}, {results['sweep_mbit']:.0f} Mbit/s links")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="decode steps per measurement")
    parser.add_argument("--rtts", default="0,10,25,50,100,200", help="round trips of the sweep (ms)")
    parser.add_argument("--sweep-mbit", type=float, default=100.0, help="the links' rate during the sweep")
    parser.add_argument("--cap", type=float, default=0.5,
                        help="memory cap of the offloading process and of the client, as a part of the weights' size")
    parser.add_argument("--server-cap", type=float, default=0.6,
                        help="memory cap of each server (a third of the blocks plus ~0.3 GB of Python, PyTorch and libp2p)")
    parser.add_argument("--skip-offloading", action="store_true")
    parser.add_argument("--replot", action="store_true", help="only draw the plot again from --out's results")
    parser.add_argument("--out", type=Path, default=RESULTS / "paper.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "paper_decode_vs_rtt.png")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM cleans up as Ctrl-C does
    if args.replot:
        plot(json.loads(args.out.read_text()), args.plot)
        return
    reason = unavailable()
    if reason:
        sys.exit(f"error: {reason}: this benchmark runs its hosts in network namespaces")
    model = random_1b_checkpoint()
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    cap, server_cap = int(weights * args.cap), int(weights * args.server_cap)
    results = {"model": "random 1.1B Llama-shaped", "dtype": "bfloat16", "weights_bytes": weights, "cap_bytes": cap,
               "server_cap_bytes": server_cap,
               "sweep_mbit": args.sweep_mbit, "rows": [], "sweep": []}
    print(f"weights {weights / 1e9:.2f} GB; memory caps (page cache included): offloading and client {cap / 1e9:.2f} GB, "
          f"each server {server_cap / 1e9:.2f} GB", flush=True)

    if not args.skip_offloading:
        print("offloading ...", flush=True)
        off = offloading(model, cap, args.steps)
        results["offloading"] = off["runs"]
        results["rows"].append(off["row"])
    else:
        results["rows"].append({"setup": "offloading (skipped)"})

    with tempfile.TemporaryDirectory(prefix="swarm-paper-") as home, ExitStack() as stack:  # processes end first
        print("starting 3 servers on 3 hosts ...", flush=True)
        net = Swarm(stack, model, server_cap, cap, Path(home))
        for setup, mbit, rtt in ROWS:
            print(f"swarm, {setup} ...", flush=True)
            net.shape(mbit, rtt)
            got = {r["what"]: r for r in net.client("--table", ",".join(COLUMNS), steps=args.steps)}
            row = {"setup": f"swarm, {setup}", "rtt_ms": statistics.mean(got["link"]["rtt_ms"]), "mbit": got["link"]["mbit"],
                   "decode_128": got["decode_128"]["steps_per_s"], "decode_1024": got["decode_1024"]["steps_per_s"],
                   "forward_1x128": got["forward_1x128"]["tokens_per_s"], "forward_16x128": got["forward_16x128"]["tokens_per_s"],
                   "detail": got}
            results["rows"].append(row)
        print("sweep ...", flush=True)
        compute = [local_compute(model, 16)]
        rtts = [float(r) for r in args.rtts.split(",")]
        net.shape(args.sweep_mbit, 0.0)
        sweep = net.client("--sweep", ",".join(map(str, rtts)), steps=args.steps,
                             on_set_rtt=lambda ms: net.shape(args.sweep_mbit, ms))
        compute.append(local_compute(model, 16))
        results["compute_s_per_token"] = compute
        results["server_and_client_peak_bytes"] = net.peaks()
    per_token = statistics.mean(compute)
    points = [p for p in sweep if p["what"] == "sweep"]
    base = min(points, key=lambda p: statistics.mean(p["rtt_ms"]))
    base_rtt, base_time = statistics.mean(base["rtt_ms"]), 1 / base["steps_per_s"]
    for point in points:
        rtt = statistics.mean(point["rtt_ms"])
        results["sweep"].append({"set_rtt_ms": point["set_rtt_ms"], "rtt_ms": rtt, "mbit": point["mbit"],
                                 "steps_per_s": point["steps_per_s"], "limit": 1 / (per_token + HOPS * rtt / 2e3),
                                 "latency_only": 1 / (base_time + HOPS * (rtt - base_rtt) / 2e3), "step_ms": point["step_ms"]})
    print()
    print(table(results))
    off = results["rows"][0].get("decode_128")
    if off:
        lan = results["rows"][1]["decode_128"]
        print(f"\nswarm ÷ offloading at 1 Gbit/s, < 5 ms: {lan / off:.1f}× (decode after a 128-token prompt)")
    print(f"\ncompute per token (all weights in memory, one process): {per_token * 1e3:.1f} ms")
    print("| RTT measured | swarm steps/s | analytic limit | swarm ÷ limit | lowest-RTT swarm + latency | swarm ÷ that |")
    print("|---:|---:|---:|---:|---:|---:|")
    for p in results["sweep"]:
        print(f"| {p['rtt_ms']:.1f} ms | {p['steps_per_s']:.2f} | {p['limit']:.2f} | {p['steps_per_s'] / p['limit']:.2f} "
              f"| {p['latency_only']:.2f} | {p['steps_per_s'] / p['latency_only']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    try:
        plot(results, args.plot)
        print(f"\nwrote {args.out} and {args.plot}")
    except ImportError:
        print(f"\nwrote {args.out}; no plot: matplotlib is missing (pip install -e '.[plot]')")


if __name__ == "__main__":
    main()
