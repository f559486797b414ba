"""Honest servers of every precision check each other without a false accusation.

Real `swarm serve` processes of the default model, all 30 blocks each, one per precision
(float32; bfloat16; int8 weights computing in float32; nf4 weights computing in bfloat16; and a
float32 one on one thread), on loopback. For every pair of them, a client that may use only those
two (``--allow-peers``) generates greedily with ``--verify strict``: every step of the one it
routes through is checked by the other. Prompts are slices of scripts/data/heldout_en.txt.
Counts the checked steps, the accusations (must be none) and the closest call (the largest
disagreement seen, as a share of the pair's tolerance).

Writes scripts/results/mixed_verify.json (``--out``).

    python scripts/mixed_verify.py [--steps 2000]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import swarm  # noqa: F401  (first: it sets OpenMP's spin count, which must precede PyTorch)

from bench_common import add_out, open_swarm, write_results  # sibling scripts (their folder is on sys.path)

from swarm.engine.default_model import ensure_default_model
from swarm.launch import ServeProcess

TEXT = Path(__file__).parent / "data" / "heldout_en.txt"
SERVERS = {
    "float32": ["--dtype", "float32"],
    "bfloat16": ["--dtype", "bfloat16"],
    "int8 (float32)": ["--dtype", "float32", "--quant", "int8"],
    "nf4 (bfloat16)": ["--dtype", "bfloat16", "--quant", "nf4"],
    "float32, 1 thread": ["--dtype", "float32", "--threads", "1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="checked steps in all (spread over the pairs)")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per generation")
    parser.add_argument("--home", type=Path, default=None, help="keep the servers' logs here (default: a temporary folder)")
    add_out(parser, "mixed_verify")
    args = parser.parse_args()
    model = ensure_default_model()
    words = TEXT.read_text().split()
    pairs = list(itertools.combinations(SERVERS, 2))
    per_pair = -(-args.steps // len(pairs))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        home = args.home or Path(tmp)
        home.mkdir(parents=True, exist_ok=True)
        env = {**__import__("os").environ, "SWARM_HOME": str(home)}
        procs: dict[str, ServeProcess] = {}
        try:
            for i, (name, flags) in enumerate(SERVERS.items()):
                first = ["--new-swarm"] if i == 0 else ["--initial-peers", next(iter(procs.values())).maddr]
                procs[name] = ServeProcess(["--model", str(model), "--blocks", "0:30", "--announce-period", "2",
                                            "--identity", str(home / f"id-{i}.key"), *flags, *first],
                                           env=env, log=home / f"server-{i}.log")
                if i == 0:
                    procs[name].wait_ready(300)
            for proc in list(procs.values())[1:]:
                proc.wait_ready(300)
            ids = {name: proc.maddr.rsplit("/p2p/", 1)[1] for name, proc in procs.items()}
            import os

            os.environ["SWARM_HOME"] = str(home)
            prompt_at = 0
            for a, b in pairs:
                allow = home / "allow.txt"
                allow.write_text(f"{ids[a]}\n{ids[b]}\n")
                (home / "verify.json").unlink(missing_ok=True)
                checks, closest, accused, began = 0, 0.0, [], time.monotonic()
                while checks < per_pair:
                    prompt = " ".join(words[prompt_at : prompt_at + 20 + prompt_at % 40])
                    prompt_at = (prompt_at + 97) % max(1, len(words) - 80)
                    client = open_swarm(model, [procs[a].maddr], verify="strict", allow_peers=allow)
                    try:
                        chains = []
                        cfg = client.generation_config(max_new_tokens=args.tokens, draft="none")
                        client.generate_ids(client.encode(prompt), cfg, on_chain=chains.append)
                    finally:
                        client.close()
                    for chain in chains:
                        if chain.verifier is not None:
                            checks += chain.verifier.checks
                            closest = max(closest, chain.verifier.closest)
                            accused += chain.verifier.caught
                ledger = json.loads((home / "verify.json").read_text())
                failed = sum(bad for _, bad in ledger["checks"].values())
                results[f"{a} / {b}"] = {"checks": checks, "failed": failed, "bans": list(ledger["bans"]),
                                         "accused": accused, "closest": closest,
                                         "seconds": time.monotonic() - began}
                print(f"{a:>18} / {b:<18} {checks:5d} checks, {failed} failed, closest call {100 * closest:5.1f} % "
                      f"of the tolerance", flush=True)
        finally:
            for proc in procs.values():
                proc.stop()
    total = sum(r["checks"] for r in results.values())
    false = sum(r["failed"] + len(r["bans"]) for r in results.values())
    print(f"{total} checked steps, {false} false accusations")
    write_results(args.out, "mixed_verify", {"steps": args.steps, "tokens": args.tokens, "servers": list(SERVERS)},
                  {"pairs": results, "checked_steps": total, "false_accusations": false})


if __name__ == "__main__":
    main()
