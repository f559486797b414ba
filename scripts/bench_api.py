"""`swarm api` against the Python API and `swarm generate`: time to first token and decode speed of
one streamed request, and aggregate tokens/s with 1, 4, 8 and 16 requests at once.

3 `swarm serve` processes on loopback each hold a third of the default model's blocks; one `swarm
api` process joins them. Each round, alternating (this machine's speed drifts), the same greedy
generation four ways:

- through the API, streamed (TTFT: from sending the request to its first text chunk);
- in this process by one :func:`swarm.open` client joined before the rounds and reused, as the API
  holds its own (TTFT from calling ``generate_ids``: opening a chain, the prefill);
- in this process by a fresh :func:`swarm.open` per request, what `swarm generate` does after its
  interpreter starts (TTFT from calling ``swarm.open``: loading the client's part of the model,
  joining the swarm, opening a chain);
- by the `swarm generate --chat` command itself (TTFT from starting the process to its first
  printed text: interpreter, imports, model load and joining included).

Decode tokens/s: the tokens after the first over the time after the first. Then 1, 4, 8 and 16
concurrent streamed requests through the API: aggregate tokens/s (all tokens over the wall time of
the batch) and their mean TTFT. Writes scripts/results/api.json (``--out``).

    python scripts/bench_api.py [--tokens 32] [--rounds 3] [--concurrency 1,4,8,16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import swarm  # first: it sets OpenMP's spin count, which must precede PyTorch
import httpx

from bench_common import add_out, write_results  # a sibling script (its folder is on sys.path)

from swarm.engine.checkpoint import Checkpoint
from swarm.engine.default_model import ensure_default_model
from swarm.launch import even_ranges, running_swarm

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
URL = re.compile(r"at (http://\S+) \(OpenAI API")


def start_api(path: Path, first: str, home: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "SWARM_HOME": home}
    args = ["api", "--model", str(path), "--initial-peers", first, "--port", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "swarm.cli.main", *args],
                            stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        match = URL.search(line)
        if match:
            return proc, match.group(1)
    raise RuntimeError("swarm api failed to start")


def stream_once(url: str, tokens: int, chat: bool = True) -> tuple[float, float, int, str]:
    """One streamed greedy request: (TTFT s, total s, completion tokens, text)."""
    body = {"model": "SmolLM2-135M-Instruct", "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    body.update({"messages": [{"role": "user", "content": PROMPT}]} if chat else {"prompt": PROMPT})
    path = "/v1/chat/completions" if chat else "/v1/completions"
    began, first, used, parts = time.perf_counter(), None, 0, []
    with httpx.stream("POST", url + path, json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                text = choice["delta"].get("content") if chat else choice["text"]
                if text:
                    first = first or time.perf_counter()
                    parts.append(text)
    return first - began, time.perf_counter() - began, used, "".join(parts)


def decode_rate(ttft: float, total: float, tokens: int) -> float:
    return (tokens - 1) / (total - ttft) if tokens > 1 and total > ttft else float("nan")


def facade_once(client: swarm.Swarm, tokens: int, began: float | None = None) -> tuple[float, float, int, str]:
    """One greedy generation by ``client``: (TTFT s, total s, tokens, text), timed from ``began``
    (default: the call)."""
    began = time.perf_counter() if began is None else began
    stamps: list[float] = []
    cfg = client.generation_config(max_new_tokens=tokens)
    prompt_ids = client.encode(PROMPT, chat=True)
    out = client.generate_ids(prompt_ids, cfg, on_token=lambda _: stamps.append(time.perf_counter()))
    return stamps[0] - began, stamps[-1] - began, len(out), client.decode(out)


def fresh_once(path: Path, first: str, tokens: int) -> tuple[float, float, int, str, float]:
    """A fresh :func:`swarm.open` for one generation, as `swarm generate` does: (TTFT s, total s,
    tokens, text, seconds of ``swarm.open`` alone), all from calling ``swarm.open``."""
    began = time.perf_counter()
    with swarm.open(path, initial_peers=[first]) as client:
        opened = time.perf_counter() - began
        return (*facade_once(client, tokens, began), opened)


def cli_once(path: Path, first: str, home: str, tokens: int) -> tuple[float, float]:
    """`swarm generate --chat`: (TTFT from process start to the first printed text, time of the
    last printed text)."""
    env = {**os.environ, "SWARM_HOME": home, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "swarm.cli.main", "generate", "--model", str(path), "--chat", "--initial-peers", first,
            "--max-new-tokens", str(tokens), PROMPT]
    began = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    first_byte = last_byte = None
    while chunk := proc.stdout.read1(4096):
        last_byte = time.perf_counter()
        if first_byte is None and chunk.strip():
            first_byte = last_byte
    proc.wait()
    return first_byte - began, last_byte - began


def concurrent_batch(url: str, tokens: int, n: int) -> tuple[float, float]:
    """``n`` streamed requests at once: (aggregate tokens/s, mean TTFT s)."""
    barrier = threading.Barrier(n)

    def one(_):
        barrier.wait()
        return stream_once(url, tokens)

    began = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - began
    return sum(r[2] for r in results) / wall, statistics.mean(r[0] for r in results)


PATHS = {  # key -> what the row is
    "api": "swarm api (persistent client), streamed",
    "reused": "swarm.open reused in-process (a chain per request)",
    "fresh": "swarm.open per request in-process (load + join + chain)",
    "cli": "swarm generate command (process start included)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--dtype", default="float32")
    add_out(parser, "api")
    args = parser.parse_args()
    path = ensure_default_model()
    ranges = even_ranges(Checkpoint(path).num_blocks, 3)
    with (
        tempfile.TemporaryDirectory(prefix="swarm-bench-api-") as home,
        running_swarm(path, ranges, home, ("--dtype", args.dtype)) as servers,
    ):
        first, api = servers[0].maddr, None
        try:
            api, url = start_api(path, first, home)
            stream_once(url, 4)  # warm up: the API's chain and the servers' first sessions
            rows: dict[str, list[tuple[float, float, int]]] = {key: [] for key in PATHS}
            opens: list[float] = []
            same = True
            with swarm.open(path, initial_peers=[first]) as reused:
                facade_once(reused, 4)  # warm up, as the API was
                for _ in range(args.rounds):
                    ttft, total, used, text = stream_once(url, args.tokens)
                    rows["api"].append((ttft, total, used))
                    *timing, reused_text = facade_once(reused, args.tokens)
                    rows["reused"].append(tuple(timing))
                    *timing, fresh_text, opened = fresh_once(path, first, args.tokens)
                    rows["fresh"].append(tuple(timing))
                    opens.append(opened)
                    same = same and reused_text == text and fresh_text == text
                    rows["cli"].append((*cli_once(path, first, home, args.tokens), used))  # the same greedy tokens
            print(f"one streamed request, {args.tokens} new tokens (greedy), 3 loopback servers of SmolLM2-135M "
                  f"({args.dtype}), median of {args.rounds} alternating rounds:")
            print(f"  {'path':<58}{'TTFT ms':>10}{'decode tok/s':>14}")
            paths = []
            for key, name in PATHS.items():
                ttft = statistics.median(r[0] for r in rows[key])
                rate = statistics.median(decode_rate(*r) for r in rows[key])
                print(f"  {name:<58}{ttft * 1e3:>10.0f}{rate:>14.1f}", flush=True)
                rounds = [{"ttft_ms": r[0] * 1e3, "total_ms": r[1] * 1e3, "tokens": r[2]} for r in rows[key]]
                paths.append({"path": key, "label": name, "ttft_ms": ttft * 1e3, "decode_tok_s": rate, "rounds": rounds})
            print(f"  swarm.open alone (load + join): {statistics.median(opens) * 1e3:.0f} ms")
            print(f"  the API's text equals the Python API's in every round: {'yes' if same else 'NO'}")
            print(f"\nconcurrent streamed requests through swarm api, {args.tokens} new tokens each:")
            print(f"  {'requests':>8}{'aggregate tok/s':>17}{'mean TTFT ms':>14}")
            concurrency = []
            for n in (int(x) for x in args.concurrency.split(",")):
                rate, ttft = concurrent_batch(url, args.tokens, n)
                print(f"  {n:>8}{rate:>17.1f}{ttft * 1e3:>14.0f}", flush=True)
                concurrency.append({"requests": n, "aggregate_tok_s": rate, "mean_ttft_ms": ttft * 1e3})
        finally:
            if api:
                api.terminate()
                api.wait(15)
    settings = {"tokens": args.tokens, "rounds": args.rounds, "concurrency": [c["requests"] for c in concurrency],
                "dtype": args.dtype, "servers": 3, "model": "SmolLM2-135M", "prompt": PROMPT}
    write_results(args.out, "api", settings, {"paths": paths, "open_ms": statistics.median(opens) * 1e3,
                                              "same_text": same, "concurrency": concurrency})


if __name__ == "__main__":
    main()
