"""What verification costs: generation tokens/s with ``--verify off``, ``sample`` and ``strict``,
side by side in one run, through the same swarm.

The swarm: two `swarm serve` processes of the default model on loopback, each holding every
block (so each can check the other: a check needs a second server of the same blocks). Each
round runs the policies one after another, in a rotating order (this machine's speed drifts
over minutes), each a fresh client generating ``--tokens`` tokens greedily after the same prompt;
then ``--train-rounds`` rounds of the same, each client training a LoRA for ``--train-steps``
AdamW steps through the swarm (batch 4 × 64).
The client's ledger is reset before every run, so each run pays the first checks of new servers
(3 per server, the first one blocking) as a new user would; ``sample-known`` runs with the ledger
of an earlier run (the servers passed their first checks already: every check runs in the
background), as a returning user does. Prints the median
tokens/s of each policy and its cost against ``off``: the median over rounds of the round's own
ratio (the machine's speed drifts between rounds).

Writes scripts/results/verify.json (``--out``).

    python scripts/bench_verify.py [--tokens 128] [--rounds 5] [--train-steps 6] [--train-rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import swarm  # noqa: F401  (first: it sets OpenMP's spin count, which must precede PyTorch)

import torch
from bench_common import add_out, open_swarm, write_results  # sibling scripts (their folder is on sys.path)
from bench_finetune import train

from swarm.engine.adapters import init_lora, resolve_targets
from swarm.engine.checkpoint import Checkpoint

from swarm.engine.default_model import ensure_default_model
from swarm.launch import running_swarm

PROMPT = "A short story about a lighthouse keeper who finds a message in a bottle:"
POLICIES = ("off", "sample", "sample-known", "strict")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=4, help="LoRA training steps per run (0: no training runs)")
    parser.add_argument("--train-rounds", type=int, default=3)
    add_out(parser, "verify")
    args = parser.parse_args()
    model = ensure_default_model()
    times: dict[str, list[float]] = {p: [] for p in POLICIES}
    checks: dict[str, list[int]] = {p: [] for p in POLICIES}
    train_rates: dict[str, list[float]] = {p: [] for p in POLICIES}
    train_checks: dict[str, list[int]] = {p: [] for p in POLICIES}
    ckpt = Checkpoint(model)
    head = ckpt.load_head()
    lora = init_lora(ckpt, resolve_targets(ckpt, None), rank=8, seed=0)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(100, 40000, (4, 64), generator=generator) for _ in range(max(1, args.train_steps))]
    with tempfile.TemporaryDirectory() as home, running_swarm(model, ["0:30", "0:30"], home) as servers:
        import os

        os.environ["SWARM_HOME"] = home
        maddr = servers[0].maddr
        ledger = Path(home) / "verify.json"
        client = open_swarm(model, [maddr], verify="sample")  # a run whose ledger sample-known starts from
        try:
            client.generate_ids(client.encode(PROMPT), client.generation_config(max_new_tokens=8, draft="none"))
        finally:
            client.close()
        known = ledger.read_bytes()
        n = len(POLICIES)

        def fresh_client(policy: str):
            """A client of ``policy`` whose ledger is empty, or (``sample-known``) an earlier run's."""
            ledger.unlink(missing_ok=True)
            if policy == "sample-known":
                ledger.write_bytes(known)
            return open_swarm(model, [maddr], verify=policy.split("-")[0])

        for r in range(args.rounds):
            order = POLICIES[r % n :] + POLICIES[: r % n]
            for policy in order:
                client = fresh_client(policy)
                try:
                    cfg = client.generation_config(max_new_tokens=args.tokens, draft="none")
                    ids = client.encode(PROMPT)
                    chains = []
                    began = time.perf_counter()
                    tokens = client.generate_ids(ids, cfg, on_chain=chains.append)
                    elapsed = time.perf_counter() - began
                    verifier = chains[-1].verifier if chains else None
                    checks[policy].append(verifier.checks if verifier is not None else 0)
                finally:
                    client.close()
                times[policy].append(len(tokens) / elapsed)
                print(f"round {r + 1} {policy:12} {times[policy][-1]:6.1f} tokens/s, {checks[policy][-1]} checks")
        for r in range(args.train_rounds if args.train_steps else 0):  # apart: a round of each is short
            order = POLICIES[r % n :] + POLICIES[: r % n]
            for policy in order:
                client = fresh_client(policy)
                try:
                    seconds, tokens = train(head, client.blocks, batches, lora, args.train_steps)
                    passes = client.blocks.checks
                    train_checks[policy].append(passes.checks if passes is not None else 0)
                finally:
                    client.close()
                train_rates[policy].append(tokens / seconds)
                print(f"round {r + 1} {policy:12} {train_rates[policy][-1]:6.1f} training tokens/s, "
                      f"{train_checks[policy][-1]} checked passes")
    # the cost: the median over rounds of each round's own ratio to off (the machine drifts between rounds)
    figures = {p: {"tokens_per_s": statistics.median(times[p]), "runs": times[p], "checks": checks[p],
                   "cost_vs_off": 1 - statistics.median(a / b for a, b in zip(times[p], times["off"]))} for p in POLICIES}
    for p in POLICIES:
        print(f"{p:12} {figures[p]['tokens_per_s']:6.1f} tokens/s  cost {100 * figures[p]['cost_vs_off']:5.1f} %")
    if args.train_steps:
        for p in POLICIES:
            rate = statistics.median(train_rates[p])
            cost = 1 - statistics.median(a / b for a, b in zip(train_rates[p], train_rates["off"]))
            figures[p].update(train_tokens_per_s=rate, train_runs=train_rates[p], train_checks=train_checks[p],
                              train_cost_vs_off=cost)
            print(f"{p:12} {rate:6.1f} training tokens/s  cost {100 * cost:5.1f} %")
    write_results(args.out, "verify", {"tokens": args.tokens, "rounds": args.rounds, "servers": 2,
                                       "model": "default", "prompt": PROMPT, "train_steps": args.train_steps,
                                       "train_batch": "4 × 64 tokens, LoRA r=8 q/v, AdamW"}, {"policies": figures})


if __name__ == "__main__":
    main()
