"""Many users at once: aggregate tokens/s and per-session ms/token as concurrent sessions grow, with
batching on and off (`swarm serve --max-batch`), side by side in one run.

For each model and dtype, 3 `swarm serve` processes on loopback each hold a third of the blocks;
one client (`swarm.open`, joined once) runs N sessions at once (threads), each a prompt of 16–256
tokens (drawn per session, the same draws for every setting) and a greedy continuation of
`--tokens` new tokens. Each N runs with `--max-batch 32` (batched) and `--max-batch 1`, the two
swarms alternating round by round, so drift of the machine's speed hits both alike.

Figures per setting: aggregate tokens/s (new tokens of all sessions ÷ wall time from the first
start to the last end), per-session ms/token after its first token (p50 and p95 over sessions),
and the ratio to one session alone. Every session's tokens are checked equal between the two
settings (batching is exact).

    python scripts/bench_concurrency.py [--models default,1.1b] [--dtypes bfloat16,float32]
        [--sessions 1,4,16,64] [--tokens 64] [--rounds 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
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

BATCHED, ALONE = 32, 1


def prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``count`` prompts of 16–256 random token ids (ids 3 and up: no special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(16, 256))] for _ in range(count)]


def run_sessions(client, batch: list[list[int]], tokens: int) -> dict:
    """Generate for every prompt of ``batch`` at once; the figures and each session's tokens."""
    cfg = GenerationConfig(max_new_tokens=tokens, eos_token_ids=())
    results: list = [None] * len(batch)
    start = threading.Barrier(len(batch) + 1)

    def one(i: int) -> None:
        times: list[float] = []
        start.wait()
        out = client.generate_ids(batch[i], cfg, on_token=lambda _: times.append(time.perf_counter()))
        results[i] = (out, times)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(batch))]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    if any(r is None for r in results):
        raise RuntimeError("a session failed (see the log above)")
    per_token = [(times[-1] - times[0]) / (len(times) - 1) * 1e3 for _, times in results if len(times) > 1]
    return {
        "aggregate_tok_s": sum(len(out) for out, _ in results) / wall,
        "wall_s": wall,
        "ms_per_token_p50": statistics.median(per_token),
        "ms_per_token_p95": statistics.quantiles(per_token, n=20)[-1] if len(per_token) > 1 else per_token[0],
        "first_token_s_p50": statistics.median(times[0] - began for _, times in results),
        "tokens": [out for out, _ in results],
    }


def bench_model(name: str, path: Path, dtype: str, sessions: list[int], tokens: int, rounds: int) -> dict:
    from swarm.engine.checkpoint import Checkpoint

    ckpt = Checkpoint(path)
    draws = prompts(max(sessions), ckpt.config.vocab_size)
    ranges = even_ranges(ckpt.num_blocks, 3)
    figures: dict = {str(n): {} for n in sessions}
    with tempfile.TemporaryDirectory() as home:
        extra = ("--dtype", dtype, "--throughput", "100", "--cache-tokens", str(max(sessions) * 512 + 4096),
                 "--max-peer-sessions", str(max(sessions) + 8))
        with running_swarm(path, ranges, Path(home) / "batched", (*extra, "--max-batch", str(BATCHED))) as on, \
             running_swarm(path, ranges, Path(home) / "alone", (*extra, "--max-batch", str(ALONE))) as off:
            clients = {BATCHED: open_swarm(path, [on[0].maddr], dtype="float32", step_timeout=600),
                       ALONE: open_swarm(path, [off[0].maddr], dtype="float32", step_timeout=600)}
            try:
                for n in sessions:
                    runs: dict[int, list[dict]] = {BATCHED: [], ALONE: []}
                    for r in range(rounds):
                        order = (BATCHED, ALONE) if r % 2 == 0 else (ALONE, BATCHED)
                        for setting in order:
                            runs[setting].append(run_sessions(clients[setting], draws[:n], tokens))
                            last = runs[setting][-1]
                            print(f"{name} {dtype} N={n:<3} max-batch {setting:<2}: {last['aggregate_tok_s']:6.1f} tok/s, "
                                  f"p50 {last['ms_per_token_p50']:6.1f} ms/token, p95 {last['ms_per_token_p95']:6.1f}",
                                  flush=True)
                    same = all(run["tokens"] == runs[BATCHED][0]["tokens"] for run in runs[BATCHED] + runs[ALONE])
                    for setting, label in ((BATCHED, "batched"), (ALONE, "alone")):
                        keep = [{k: v for k, v in run.items() if k != "tokens"} for run in runs[setting]]
                        figures[str(n)][label] = {
                            key: statistics.median(run[key] for run in keep) for key in keep[0]
                        } | {"rounds": keep}
                    figures[str(n)]["tokens_equal"] = same
                    if not same:
                        print(f"!! {name} {dtype} N={n}: batched and alone tokens differ")
            finally:
                for client in clients.values():
                    client.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="default,1.1b")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="for the default model; the 1.1B runs in bfloat16")
    parser.add_argument("--sessions", default="1,4,16,64")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    add_out(parser, "concurrency")
    args = parser.parse_args()
    sessions = [int(n) for n in args.sessions.split(",")]
    results = []
    for model in args.models.split(","):
        if model == "default":
            path, name, dtypes = ensure_default_model(quiet=True), "SmolLM2-135M", args.dtypes.split(",")
        else:
            path, name, dtypes = random_1b_checkpoint(), "Llama-1.1B (random)", ["bfloat16"]
        for dtype in dtypes:
            figures = bench_model(name, path, dtype, sessions, args.tokens, args.rounds)
            results.append({"model": name, "dtype": dtype, "sessions": figures})
            one = figures[str(sessions[0])]["batched"]["aggregate_tok_s"]
            for n in sessions:
                f = figures[str(n)]
                print(f"  {name} {dtype} N={n}: batched {f['batched']['aggregate_tok_s'] / one:.2f}× one session, "
                      f"alone {f['alone']['aggregate_tok_s'] / one:.2f}×; tokens equal: {f['tokens_equal']}")
    settings = {"sessions": sessions, "tokens": args.tokens, "rounds": args.rounds, "servers": 3,
                "max_batch": [BATCHED, ALONE], "prompt_tokens": "16-256"}
    write_results(args.out, "concurrency", settings, {"results": results})


if __name__ == "__main__":
    main()
