"""One person's tokens while others load the same servers: a peer with many sessions, and a peer
training with 8,192-token forward and backward passes, side by side with the unloaded run.

3 `swarm serve` processes on loopback each hold a third of the model's blocks (`--max-batch 32`).
A victim client (one session, greedy, `--tokens` new tokens after a 64-token prompt) generates:

- ``alone``: nothing else runs;
- ``hog``: another peer (its own process and identity) keeps `--hog-sessions` sessions decoding;
- ``trainer``: another peer keeps running forward and backward passes of `--train-tokens`
  positions (batch 1) through every block (`Swarm.blocks`, as a custom training loop does).

The load's clients run at the lowest CPU priority (`nice 19`): on a real swarm they run on their
own machines, and what is measured is what the servers do. The settings alternate round by round (drift of the machine's speed hits all alike). Figures per
setting: the victim's ms/token (median over its tokens, after the first) and its longest wait for
one token, their ratio to ``alone``, and whether its tokens equal the unloaded run's.

    python scripts/bench_interference.py [--model default|1.1b|PATH] [--dtype bfloat16]
        [--tokens 32] [--hog-sessions 16] [--train-tokens 8192] [--rounds 2]

(The load's roles run as `--role hog|trainer --peers MADDR` subprocesses of this script.)
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import swarm  # noqa: F401  (first: it sets OpenMP's spin count, which must precede PyTorch)

from bench_common import add_out, open_swarm, write_results
from bench_local import random_1b_checkpoint
from swarm.engine.default_model import ensure_default_model
from swarm.engine.generation import GenerationConfig
from swarm.launch import even_ranges, running_swarm

SETTINGS = ("alone", "hog", "trainer")


def model_path(name: str) -> Path:
    if name == "default":
        return ensure_default_model(quiet=True)
    if name == "1.1b":
        return random_1b_checkpoint()
    return Path(name)


def prompt(vocab: int, length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(length)]


def run_hog(client, sessions: int, vocab: int) -> None:
    """``sessions`` greedy generations at once, each started again when it ends, until killed."""
    cfg = GenerationConfig(max_new_tokens=256, eos_token_ids=())
    decoding = threading.Semaphore(0)

    def one(i: int) -> None:
        seed, first = i, [True]

        def on_token(_) -> None:
            if first[0]:
                first[0] = False
                decoding.release()

        while True:
            client.generate_ids(prompt(vocab, 32, seed), cfg, on_token=on_token)
            seed += sessions

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(sessions)]
    for t in threads:
        t.start()
    for _ in range(sessions):  # every session decodes: the load is on
        decoding.acquire()
    print("ready", flush=True)
    for t in threads:
        t.join()


def run_trainer(client, tokens: int) -> None:
    """Forward and backward passes of ``tokens`` positions through every block, until killed."""
    import torch

    blocks = client.blocks
    size = client.checkpoint.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    print("ready", flush=True)
    while True:
        hidden = torch.randn(1, tokens, size, generator=generator).requires_grad_(True)  # the client's float32
        started = time.perf_counter()
        out = blocks(hidden)
        out.float().pow(2).mean().backward()
        print(f"trainer: a {tokens}-position forward and backward in {time.perf_counter() - started:.1f} s", flush=True)


def victim(client, ids: list[int], tokens: int) -> dict:
    cfg = GenerationConfig(max_new_tokens=tokens, eos_token_ids=())
    times: list[float] = []
    out = client.generate_ids(ids, cfg, on_token=lambda _: times.append(time.perf_counter()))
    gaps = [(b - a) * 1e3 for a, b in zip(times, times[1:])]
    return {"ms_per_token": statistics.median(gaps), "longest_ms": max(gaps), "tokens": out}


def start_load(setting: str, args, maddr: str, home: Path) -> subprocess.Popen | None:
    if setting == "alone":
        return None
    cmd = [sys.executable, __file__, "--role", setting, "--peers", maddr, "--model", args.model, "--dtype", args.dtype,
           "--hog-sessions", str(args.hog_sessions), "--train-tokens", str(args.train_tokens)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "SWARM_HOME": str(home)})
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"the {setting} load did not start: {line!r}")
    threading.Thread(target=lambda: [print(line, end="") for line in proc.stdout], daemon=True).start()
    return proc


def bench(args) -> dict:
    from swarm.engine.checkpoint import Checkpoint

    path = model_path(args.model)
    ckpt = Checkpoint(path)
    ids = prompt(ckpt.config.vocab_size, 64, seed=12345)
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    with tempfile.TemporaryDirectory() as home:
        extra = ("--dtype", args.dtype, "--throughput", "100", "--max-batch", "32",
                 "--cache-tokens", str((args.hog_sessions + 4) * 512 + 4096), "--max-peer-sessions", str(args.hog_sessions + 8))
        with running_swarm(path, even_ranges(ckpt.num_blocks, 3), Path(home) / "swarm", extra) as servers:
            client = open_swarm(path, [servers[0].maddr], dtype="float32", step_timeout=600)
            try:
                victim(client, ids, 4)  # warm: the chain found, the first connections made
                for r in range(args.rounds):
                    order = SETTINGS if r % 2 == 0 else tuple(reversed(SETTINGS))
                    for setting in order:
                        load = start_load(setting, args, servers[0].maddr, Path(home))
                        try:
                            run = victim(client, ids, args.tokens)
                        finally:
                            if load is not None:
                                load.kill()
                                load.wait()
                        runs[setting].append(run)
                        print(f"{setting:<8} {run['ms_per_token']:7.1f} ms/token, longest wait {run['longest_ms']:7.0f} ms",
                              flush=True)
            finally:
                client.close()
    reference = runs["alone"][0]["tokens"]
    figures: dict = {}
    for setting in SETTINGS:
        keep = runs[setting]
        figures[setting] = {
            "ms_per_token": statistics.median(r["ms_per_token"] for r in keep),
            "longest_ms": max(r["longest_ms"] for r in keep),
            "tokens_equal": all(r["tokens"] == reference for r in keep),
            "rounds": [{k: v for k, v in r.items() if k != "tokens"} for r in keep],
        }
    for setting in SETTINGS:
        f = figures[setting]
        f["ratio"] = f["ms_per_token"] / figures["alone"]["ms_per_token"]
        print(f"{setting:<8} median {f['ms_per_token']:7.1f} ms/token ({f['ratio']:.2f}× alone), "
              f"longest {f['longest_ms']:6.0f} ms, tokens equal: {f['tokens_equal']}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--hog-sessions", type=int, default=16)
    parser.add_argument("--train-tokens", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--role", choices=["hog", "trainer"], help=argparse.SUPPRESS)
    parser.add_argument("--peers", help=argparse.SUPPRESS)
    add_out(parser, "interference")
    args = parser.parse_args()
    if args.role:
        # the other peers' clients would run on their own machines; here they share this one, so
        # they take what CPU the servers and the victim leave (the servers' load is what we measure)
        os.nice(19)
        client = open_swarm(model_path(args.model), [args.peers], dtype="float32", step_timeout=600)
        vocab = client.checkpoint.config.vocab_size
        if args.role == "hog":
            run_hog(client, args.hog_sessions, vocab)
        else:
            run_trainer(client, args.train_tokens)
        return
    figures = bench(args)
    write_results(args.out, "interference", {"model": args.model, "dtype": args.dtype, "tokens": args.tokens,
                                             "hog_sessions": args.hog_sessions, "train_tokens": args.train_tokens,
                                             "rounds": args.rounds}, figures)


if __name__ == "__main__":
    main()
