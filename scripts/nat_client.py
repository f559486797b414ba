"""The client's side of scripts/bench_nat.py, run on its emulated host: greedy generations of
TOKENS tokens through the one server ALLOWED may serve (``--allow-peers``); one JSON line per
run with the median and mean time per token and how this host reaches that server.

    python scripts/nat_client.py MODEL_DIR INITIAL_PEER ALLOW_FILE SERVER_ID --runs 3 --tokens 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import swarm  # noqa: F401  (first: it sets OpenMP's spin count, which must precede PyTorch)

from bench_common import open_swarm  # a sibling script (its folder is on sys.path)

PROMPT = "The history of the printing press begins"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("peer")
    parser.add_argument("allow")
    parser.add_argument("server")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    with open_swarm(args.model_dir, [args.peer], dtype="bfloat16", allow_peers=args.allow, timeout=60) as client:
        cfg = replace(client.generation_config(max_new_tokens=args.tokens, draft="none"), eos_token_ids=())
        ids = client.encode(PROMPT)
        for run in range(args.runs):
            stamps: list[float] = []
            client.generate_ids(ids, cfg, on_token=lambda _: stamps.append(time.perf_counter()))
            gaps = [b - a for a, b in zip(stamps, stamps[1:])]
            link = "relayed" if client.client.host.relayed(args.server) else "direct"
            print(json.dumps({"run": run, "ms_per_token_median": round(1e3 * statistics.median(gaps), 2),
                              "ms_per_token_mean": round(1e3 * statistics.mean(gaps), 2), "link": link}), flush=True)


if __name__ == "__main__":
    main()
