"""Recovery from server failures with the default model, measured.

Servers on loopback: 0:10, 20:30 and five for 10:20 (one serving, four spares). One client of the
public facade (:func:`swarm.open`) joins them; a 100-token greedy generation runs undisturbed, then
again with the server serving block 10 killed (SIGKILL) every 20 tokens. Prints: whether the tokens
are identical, tokens/s of both runs (the join, done once before both, not counted), and for every
kill the time from the kill to the next token, the replay compute (the same steps run on blocks
10:20 in this process) and their difference (the recovery's own cost: detection, routing, new
session, transfer). Writes scripts/results/recovery.json (``--out``).

    python scripts/bench_recovery.py [--dtype float32] [--tokens 100] [--every 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import swarm  # first: it sets OpenMP's spin count, which must precede PyTorch
import torch

from bench_common import add_out, write_results  # a sibling script (its folder is on sys.path)

from swarm.engine.checkpoint import Checkpoint, parse_dtype
from swarm.engine.default_model import ensure_default_model
from swarm.engine.generation import GenerationConfig
from swarm.launch import running_swarm

PROMPT = "The capital of France is"


def replay_compute(ckpt: Checkpoint, dtype, prompt_len: int, position: int) -> float:
    """Seconds to run, on blocks 10:20 here, the steps a replacement replays at ``position``."""
    blocks = ckpt.load_blocks(10, 20, dtype)
    hidden = torch.randn(1, position + 1, blocks.config.hidden_size)
    steps = [prompt_len] + [1] * (position + 1 - prompt_len)
    with torch.no_grad(), blocks.open_session(1, position + 1) as kv:
        t, at = time.perf_counter(), 0
        for n in steps:
            blocks(hidden[:, at : at + n], kv)
            at += n
        return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--every", type=int, default=20)
    add_out(parser, "recovery")
    args = parser.parse_args()
    path = ensure_default_model()
    dtype = parse_dtype(args.dtype)
    ckpt = Checkpoint(path)
    cfg = GenerationConfig(max_new_tokens=args.tokens, eos_token_ids=())
    kills_at = list(range(args.every, args.tokens, args.every))
    ranges = ["0:10", "10:20", "20:30"] + ["10:20"] * len(kills_at)
    with (
        tempfile.TemporaryDirectory(prefix="swarm-recovery-") as home,
        running_swarm(path, ranges, home, ("--dtype", args.dtype)) as servers,
        swarm.open(path, initial_peers=[servers[0].maddr], dtype=args.dtype) as client,
    ):
        procs = {server.maddr.rsplit("/p2p/", 1)[1]: server for server in servers}
        prompt = client.encode(PROMPT)
        t = time.perf_counter()
        clean = client.generate_ids(prompt, cfg)
        clean_tps = len(clean) / (time.perf_counter() - t)

        chains, stamps, kills = [], [], []

        def on_token(_):
            stamps.append(time.perf_counter())
            if len(stamps) in kills_at:
                peer = next(s.span.peer_id for s in chains[-1].sessions if s.span.start <= 10 < s.span.end)
                kills.append((len(stamps), time.perf_counter()))
                procs[peer].proc.kill()
                procs[peer].proc.wait()

        t = time.perf_counter()
        disturbed = client.generate_ids(prompt, cfg, on_token, chains.append)
        disturbed_tps = len(disturbed) / (time.perf_counter() - t)
    print(f"default model, {args.dtype}, {args.tokens} tokens, a kill every {args.every} tokens")
    print(f"  identical output: {disturbed == clean}")
    print(f"  tokens/s undisturbed {clean_tps:.1f}, with kills {disturbed_tps:.1f}")
    print(f"  {'kill at token':>14}{'death→next token':>18}{'replay compute':>16}{'recovery cost':>15}")
    rows = []
    for token, killed in kills:
        to_next = stamps[token] - killed
        replay = replay_compute(ckpt, dtype, len(prompt), len(prompt) + token)
        print(f"  {token:>14}{to_next * 1e3:>15.0f} ms{replay * 1e3:>13.0f} ms{(to_next - replay) * 1e3:>12.0f} ms")
        rows.append({"token": token, "to_next_ms": to_next * 1e3, "replay_ms": replay * 1e3,
                     "recovery_ms": (to_next - replay) * 1e3})
    settings = {"dtype": args.dtype, "tokens": args.tokens, "every": args.every, "ranges": ranges, "prompt": PROMPT}
    write_results(args.out, "recovery", settings, {"identical": disturbed == clean, "undisturbed_tok_s": clean_tps,
                                                   "disturbed_tok_s": disturbed_tps, "kills": rows})


if __name__ == "__main__":
    main()
