"""The client's side of scripts/bench_speculative.py, run on the client's emulated host: at each
round trip (the line ``set-rtt MS`` asks the caller to set it, a line on stdin says done), every
prompt of the set generated with each draft setting, the settings alternating; one JSON object per
generation.

    python scripts/spec_client.py MODEL_DIR --peers MADDR --prompts FILE --rtts 1,20,50,100,200
                                  [--drafts none,ngram] [--tokens 48]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import swarm  # first: it sets OpenMP's spin count, which must precede PyTorch

from bench_common import open_swarm  # a sibling script (its folder is on sys.path)

from swarm.engine.speculative import SpecStats


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def run(client: swarm.Swarm, ids: list[int], draft: str, tokens: int, drafter=None) -> dict:
    """Greedy generation of ``tokens`` tokens after ``ids`` with ``draft`` (``model``: with
    ``drafter``); tokens/s from the first token to the last (the prompt's step is the same for
    every setting)."""
    stamps, stats = [], SpecStats()
    cfg = client.generation_config(max_new_tokens=tokens, draft="none" if draft == "model" else draft)
    cfg = replace(cfg, eos_token_ids=())  # always the full length: rates comparable
    out = client.generate_ids(ids, cfg, on_token=lambda _: stamps.append(time.perf_counter()), stats=stats,
                              draft=drafter if draft == "model" else None)
    span = stamps[-1] - stamps[0]
    return {"tokens_per_s": round((len(out) - 1) / span, 3) if span > 0 else None, "token_ids": out,
            "steps": stats.steps, "drafted": stats.drafted, "accepted": stats.accepted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--peers", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--rtts", default="1,20,50,100,200")
    parser.add_argument("--drafts", default="none,ngram")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--draft-model", help="the draft model of the 'model' setting (default: the model itself)")
    args = parser.parse_args()
    prompts = json.load(open(args.prompts))
    drafts = args.drafts.split(",")
    for rtt in [float(r) for r in args.rtts.split(",")]:
        emit(what="set-rtt", rtt_ms=rtt)
        sys.stdin.readline()
        with open_swarm(args.model_dir, args.peers.split(",")[:1], dtype="bfloat16", step_timeout=120, timeout=60) as client:
            drafter = client.draft_model(args.draft_model or args.model_dir) if "model" in drafts else None
            turn = 0
            for kind, items in prompts.items():
                for n, item in enumerate(items):
                    ids = client.encode(item["text"], chat=item.get("chat", False))
                    order = drafts if turn % 2 == 0 else drafts[::-1]  # alternating: the drift hits all alike
                    turn += 1
                    for draft in order:
                        emit(what="run", rtt_ms=rtt, kind=kind, prompt=n, draft=draft, prompt_tokens=len(ids),
                             **run(client, ids, draft, args.tokens, drafter))


if __name__ == "__main__":
    main()
