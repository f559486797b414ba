"""`swarm api` against `swarm generate`: time to first token and decode speed of one streamed
request, and aggregate tokens/s with 1, 4 and 8 requests at once.

3 `swarm serve` processes on loopback each hold a third of the default model's blocks; one `swarm
api` process joins them. Each round, alternating (this machine's speed drifts): one streamed
greedy request through the API (TTFT: from sending the request to its first text chunk), then the
same generation by `swarm generate`'s library path in this process (:func:`generate_swarm`: it
joins the swarm, opens a chain, generates; TTFT from the call), then the `swarm generate` command
itself (TTFT from starting the process to its first printed text: interpreter, model load and
joining included). Decode tokens/s: the tokens after the first over the time after the first.
Then 1, 4 and 8 concurrent streamed requests through the API: aggregate tokens/s (all tokens
over the wall time of the batch) and their mean TTFT.

    python scripts/bench_api.py [--tokens 32] [--rounds 3] [--concurrency 1,4,8]
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

import swarm  # noqa: F401  (first: it sets OpenMP's spin count, which must precede PyTorch)
import httpx

from swarm.engine.client import ClientModel
from swarm.engine.default_model import ensure_default_model
from swarm.engine.generation import GenerationConfig
from swarm.launch import even_ranges, running_swarm
from swarm.p2p.client import ClientConfig, generate_swarm
from swarm.p2p.table import model_id

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


def library_once(client: ClientModel, first: str, prompt_ids: list[int], tokens: int) -> tuple[float, float, int, str]:
    stamps: list[float] = []
    cfg = GenerationConfig(max_new_tokens=tokens, eos_token_ids=client.eos_token_ids)
    began = time.perf_counter()
    out = generate_swarm(client, model_id(client.checkpoint), prompt_ids, cfg, ClientConfig(initial_peers=[first]),
                         on_token=lambda _: stamps.append(time.perf_counter()))
    return stamps[0] - began, stamps[-1] - began, len(out), client.decode(out)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    path = ensure_default_model()
    client = ClientModel.load(path)
    prompt_ids = client.encode(PROMPT, chat=True)
    ranges = even_ranges(client.checkpoint.num_blocks, 3)
    with (
        tempfile.TemporaryDirectory(prefix="swarm-bench-api-") as home,
        running_swarm(path, ranges, home, ("--dtype", args.dtype)) as servers,
    ):
        first, api = servers[0].maddr, None
        try:
            api, url = start_api(path, first, home)
            stream_once(url, 4)  # warm up: the API's chain and the servers' first sessions
            rows: dict[str, list[tuple[float, float, int]]] = {"api": [], "library": [], "cli": []}
            same = True
            for _ in range(args.rounds):
                ttft, total, used, text = stream_once(url, args.tokens)
                rows["api"].append((ttft, total, used))
                *lib, lib_text = library_once(client, first, prompt_ids, args.tokens)
                rows["library"].append(tuple(lib))
                same = same and lib_text == text
                rows["cli"].append((*cli_once(path, first, home, args.tokens), used))  # the same greedy tokens
            print(f"one streamed request, {args.tokens} new tokens (greedy), 3 loopback servers of SmolLM2-135M "
                  f"({args.dtype}), median of {args.rounds} alternating rounds:")
            print(f"  {'path':<52}{'TTFT ms':>10}{'decode tok/s':>14}")
            names = {"api": "swarm api (persistent client), streamed",
                     "library": "swarm generate's path in-process (join + chain)",
                     "cli": "swarm generate command (process start included)"}
            for key, name in names.items():
                ttft = statistics.median(r[0] for r in rows[key])
                rate = statistics.median(decode_rate(*r) for r in rows[key])
                print(f"  {name:<52}{ttft * 1e3:>10.0f}{rate:>14.1f}", flush=True)
            print(f"  the API's text equals generate_swarm's in every round: {'yes' if same else 'NO'}")
            print(f"\nconcurrent streamed requests through swarm api, {args.tokens} new tokens each:")
            print(f"  {'requests':>8}{'aggregate tok/s':>17}{'mean TTFT ms':>14}")
            for n in (int(x) for x in args.concurrency.split(",")):
                rate, ttft = concurrent_batch(url, args.tokens, n)
                print(f"  {n:>8}{rate:>17.1f}{ttft * 1e3:>14.0f}", flush=True)
        finally:
            if api:
                api.terminate()
                api.wait(15)


if __name__ == "__main__":
    main()
