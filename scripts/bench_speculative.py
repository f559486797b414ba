"""Speculative decoding over emulated Internet links: tokens/s with and without drafts (needs root).

3 `swarm serve` processes of the default model (bfloat16) on 3 emulated hosts (network namespaces,
scripts/netlab.py), each behind a delaying relay it announces, a third of the blocks each; the
client on a 4th host (scripts/spec_client.py). At each round trip, every prompt of a held-out set
(scripts/data/speculative_prompts.json: prose, chat, code-like and extraction prompts, written for
this benchmark and not tuned on) is generated greedily with each draft setting, the settings
alternating; a row per round trip and kind of prompt: tokens/s of each setting, the speedup, the
drafts' acceptance rate and the tokens per round trip. Every setting's tokens are checked equal.

    python scripts/bench_speculative.py [--rtts 1,20,50,100,200] [--drafts none,ngram] [--tokens 48]

Writes scripts/results/speculative.json and scripts/results/speculative.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench_common import add_out, write_results  # sibling scripts (their folder is on sys.path)
from netlab import Lab, Relay, unavailable

from swarm.engine.checkpoint import Checkpoint
from swarm.engine.default_model import ensure_default_model
from swarm.launch import ServeProcess, even_ranges

RESULTS = Path(__file__).parent / "results"
PROMPTS = Path(__file__).parent / "data" / "speculative_prompts.json"
SERVER_PORT, RELAY_PORT = 4001, 4000


def swarm_on_hosts(stack: ExitStack, model: Path, home: Path):
    lab = stack.enter_context(Lab())
    hosts = [lab.add_host(f"s{i + 1}") for i in range(3)]
    client = lab.add_host("client")
    relays = [Relay(lab, h, RELAY_PORT, SERVER_PORT, 0.0) for h in hosts]
    servers: list[ServeProcess] = []
    ranges = even_ranges(Checkpoint(model).num_blocks, 3)
    for i, host in enumerate(hosts):
        join = ["--new-swarm"] if i == 0 else ["--initial-peers", servers[0].maddr]
        args = ["--model", str(model), "--dtype", "bfloat16", "--blocks", ranges[i], "--host", "127.0.0.1",
                "--port", str(SERVER_PORT), "--announce-addr", f"/ip4/{host.ip}/tcp/{RELAY_PORT}",
                "--identity", str(home / f"{host.name}.key"), "--threads", "1", "--throughput", "10",
                "--bandwidth", "100", *join]
        server = ServeProcess(args, log=home / f"{host.name}.log", prefix=lab.cmd(host, []))
        servers.append(server)
        stack.callback(server.stop)
        server.wait_ready(timeout=300)
    return lab, client, relays, servers


def summarize(runs: list[dict], drafts: list[str]) -> list[dict]:
    rows = []
    for rtt in dict.fromkeys(r["rtt_ms"] for r in runs):
        for kind in dict.fromkeys(r["kind"] for r in runs):
            mine = [r for r in runs if r["rtt_ms"] == rtt and r["kind"] == kind]
            row = {"rtt_ms": rtt, "kind": kind}
            for draft in drafts:
                these = [r for r in mine if r["draft"] == draft]
                row[f"{draft}_tok_s"] = round(statistics.mean(r["tokens_per_s"] for r in these), 3)
                drafted = sum(r["drafted"] for r in these)
                row[f"{draft}_acceptance"] = round(sum(r["accepted"] for r in these) / drafted, 3) if drafted else None
                row[f"{draft}_tokens_per_step"] = round(sum(len(r["token_ids"]) - 1 for r in these)
                                                        / max(1, sum(r["steps"] for r in these)), 3)
            for draft in drafts[1:]:
                row[f"{draft}_speedup"] = round(row[f"{draft}_tok_s"] / row[f"{drafts[0]}_tok_s"], 3)
            rows.append(row)
    return rows


def plot(rows: list[dict], drafts: list[str], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("no plot: matplotlib is not installed (pip install -e '.[plot]')")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for kind in dict.fromkeys(r["kind"] for r in rows):
        mine = [r for r in rows if r["kind"] == kind]
        for draft in drafts[1:]:
            ax.plot([r["rtt_ms"] for r in mine], [r[f"{draft}_speedup"] for r in mine], "o-", label=f"{draft}, {kind}")
    ax.axhline(1.0, color="gray", linestyle=":")
    ax.set_xlabel("round-trip time between hosts (ms, set)")
    ax.set_ylabel(f"tokens/s ÷ tokens/s with --draft {drafts[0]}")
    ax.set_title("Speculative decoding through 3 servers (SmolLM2-135M, bfloat16)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtts", default="1,20,50,100,200")
    parser.add_argument("--drafts", default="none,ngram,model",
                        help="the first is the baseline; model: a draft model (--draft-model, default the model's own copy)")
    parser.add_argument("--draft-model", type=Path, help="the draft model (default: the default model itself, bfloat16)")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--prompts", type=Path, default=PROMPTS)
    parser.add_argument("--plot", type=Path, default=RESULTS / "speculative.png")
    add_out(parser, "speculative")
    args = parser.parse_args()
    why = unavailable()
    if why:
        sys.exit(f"bench_speculative needs network namespaces: {why}")
    model = ensure_default_model()
    drafts = args.drafts.split(",")
    runs = []
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        lab, client_host, relays, servers = swarm_on_hosts(stack, model, home)
        argv = [sys.executable, str(Path(__file__).with_name("spec_client.py")), str(model), "--peers", servers[0].maddr,
                "--prompts", str(args.prompts), "--rtts", args.rtts, "--drafts", args.drafts, "--tokens", str(args.tokens),
                *(["--draft-model", str(args.draft_model)] if args.draft_model else [])]
        with open(home / "client.log", "w") as log:
            proc = lab.popen(client_host, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        for line in proc.stdout:
            record = json.loads(line)
            if record["what"] == "set-rtt":
                for relay in relays:
                    relay.set_delay(record["rtt_ms"] / 2)
                proc.stdin.write("done\n")
                proc.stdin.flush()
                print(f"RTT {record['rtt_ms']:g} ms", flush=True)
                continue
            runs.append(record)
            print(f"  {record['kind']:<11} #{record['prompt']} {record['draft']:<6} {record['tokens_per_s']:7.2f} tok/s, "
                  f"{record['accepted']}/{record['drafted']} drafts accepted, {record['steps']} steps", flush=True)
        if proc.wait() != 0:
            raise RuntimeError(f"the client failed:\n{(home / 'client.log').read_text()[-3000:]}")
    for rtt in dict.fromkeys(r["rtt_ms"] for r in runs):  # exactness: the same tokens whatever the draft
        for key in {(r["kind"], r["prompt"]) for r in runs}:
            outs = {tuple(r["token_ids"]) for r in runs if r["rtt_ms"] == rtt and (r["kind"], r["prompt"]) == key}
            assert len(outs) == 1, f"drafts changed the tokens of {key} at {rtt} ms"
    rows = summarize(runs, drafts)
    print(f"{'RTT':>6} {'kind':<11}" + "".join(f"{d + ' tok/s':>13}" for d in drafts)
          + "".join(f"{d + ' ×':>10}{'accept':>8}{'tok/step':>9}" for d in drafts[1:]))
    for r in rows:
        print(f"{r['rtt_ms']:>6g} {r['kind']:<11}" + "".join(f"{r[f'{d}_tok_s']:>13.2f}" for d in drafts)
              + "".join(f"{r[f'{d}_speedup']:>10.2f}{(r[f'{d}_acceptance'] or 0):>8.0%}{r[f'{d}_tokens_per_step']:>9.2f}"
                        for d in drafts[1:]))
    write_results(args.out, "speculative", {"rtts": args.rtts, "drafts": drafts, "tokens": args.tokens,
                                            "prompts": str(args.prompts.name)}, {"rows": rows, "runs": runs})
    plot(rows, drafts, args.plot)


if __name__ == "__main__":
    main()
