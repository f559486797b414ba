"""Swarm vs local decode speed, and the wire's round trip and throughput, in one run.

1. Wire: two libp2p hosts in this process (TCP + Noise + yamux on loopback); a frame holding a
   hidden-state tensor of 16 KB and of 32 MB is sent and echoed back. Prints round trip and MB/s.
2. Decode: the same greedy generation (prompt of 16 tokens, N new tokens) run locally and through
   3 `swarm serve` processes on loopback, each holding a third of the blocks. Prints the median
   per-token time of both and their ratio, for the default model and the random 1.1B Llama, with
   the servers' default thread count and one thread, with and without server-to-server push.

    python scripts/bench_swarm.py [--tokens 48] [--models default,1.1b] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import swarm  # noqa: F401  (first: it sets OpenMP's spin count, which must precede PyTorch)
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_local import random_1b_checkpoint  # noqa: E402

from swarm.engine.checkpoint import Checkpoint, parse_dtype  # noqa: E402
from swarm.engine.default_model import ensure_default_model  # noqa: E402
from swarm.engine.generation import GenerationConfig, LocalSession, generate  # noqa: E402
from swarm.p2p.client import ClientConfig, generate_swarm  # noqa: E402
from swarm.p2p.host import Host  # noqa: E402
from swarm.p2p.loop import run  # noqa: E402
from swarm.p2p.table import model_id  # noqa: E402
from swarm.p2p.wire import Frame, read_frame, write_frame  # noqa: E402

READY = re.compile(r"serving blocks \S+ of \S+ at (/ip4/\S+)")
ECHO = "/swarm-bench/echo/1.0.0"


async def wire_bench(repeats: int = 20) -> list[tuple[str, float, float]]:
    a, b = await Host.start(), await Host.start()

    async def echo(stream):
        while True:
            frame = await read_frame(stream, timeout=30)
            await write_frame(stream, frame, timeout=30)

    b.set_stream_handler(ECHO, echo)
    results = []
    try:
        await a.connect(b.addrs[0], timeout=10)
        stream = await a.open_stream(b.peer_id, ECHO, timeout=10)
        for label, numel in (("16 KB", 4096), ("32 MB", 8 * 2**20)):
            frame = Frame("result", {}, [torch.randn(numel)])
            times = []
            for _ in range(repeats if numel < 10**6 else 5):
                t = time.perf_counter()
                await write_frame(stream, frame, timeout=30)
                await read_frame(stream, timeout=30)
                times.append(time.perf_counter() - t)
            rtt = statistics.median(times)
            results.append((label, rtt * 1e3, 2 * numel * 4 / rtt / 1e6))
        await stream.reset()
    finally:
        await a.close()
        await b.close()
    return results


def per_token_times(open_session, head, prompt: list[int], tokens: int) -> list[float]:
    stamps = []
    cfg = GenerationConfig(max_new_tokens=tokens)
    generate(head, open_session, prompt, cfg, on_token=lambda _: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])]


def start_servers(path: Path, dtype: str, home: str, threads: int | None) -> tuple[list[subprocess.Popen], str]:
    n = Checkpoint(path).num_blocks
    cuts = [0, n // 3, 2 * n // 3, n]
    env = {**os.environ, "SWARM_HOME": home}
    procs, first = [], None
    for i in range(3):
        args = [sys.executable, "-m", "swarm.cli.main", "serve", "--model", str(path), "--dtype", dtype,
                "--blocks", f"{cuts[i]}:{cuts[i + 1]}", "--identity", f"{home}/id-{i}.key"]
        args += ["--threads", str(threads)] if threads else []
        args += ["--new-swarm"] if first is None else ["--initial-peers", first]
        procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env))
        for line in procs[-1].stdout:
            match = READY.search(line)
            if match:
                first = first or match.group(1)
                break
        else:
            raise RuntimeError("a server failed to start")
    return procs, first


def decode_bench(path: Path, dtype_name: str, tokens: int, threads: int | None, push: bool) -> tuple[float, float]:
    dtype = parse_dtype(dtype_name)
    ckpt = Checkpoint(path)
    head = ckpt.load_head(dtype)
    prompt = list(range(100, 116))
    blocks = ckpt.load_blocks(0, ckpt.num_blocks, dtype)
    per_token_times(lambda b, n: LocalSession(blocks, b, n), head, prompt, 4)  # warm up
    local = statistics.median(per_token_times(lambda b, n: LocalSession(blocks, b, n), head, prompt, tokens))
    del blocks
    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as home:
        procs, first = start_servers(path, dtype_name, home, threads)
        try:
            client = SimpleNamespace(head=head, checkpoint=ckpt)
            model = model_id(path, ckpt.raw_config)
            cfg = ClientConfig(initial_peers=[first], push=push)
            stamps: list[float] = []
            generate_swarm(client, model, prompt, GenerationConfig(max_new_tokens=tokens), cfg,
                           on_token=lambda _: stamps.append(time.perf_counter()))
            swarm = statistics.median([b - a for a, b in zip(stamps, stamps[1:])])
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(15)
    return local, swarm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--models", default="default,1.1b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", default="default,1", help="servers' --threads settings to compare")
    parser.add_argument("--push", default="on,off", help="server-to-server push settings to compare")
    args = parser.parse_args()

    print("wire (TCP + Noise + yamux, loopback, one frame out and echoed back):")
    for label, rtt_ms, mbps in run(wire_bench()):
        print(f"  {label:>6} hidden-state frame: round trip {rtt_ms:8.2f} ms, {mbps:8.1f} MB/s")
    paths = {"default": ("SmolLM2-135M", ensure_default_model), "1.1b": ("Llama-1.1B (random)", random_1b_checkpoint)}
    print(f"\ndecode, {args.dtype}, median per-token time over {args.tokens} tokens, 3 loopback servers:")
    print(f"  {'model':<22}{'server threads':>15}{'push':>6}{'local ms':>10}{'swarm ms':>10}{'swarm/local':>13}")
    for key in args.models.split(","):
        name, get_path = paths[key]
        for threads in args.threads.split(","):
            for push in args.push.split(","):
                n = None if threads == "default" else int(threads)
                local, swarm = decode_bench(get_path(), args.dtype, args.tokens, n, push == "on")
                print(
                    f"  {name:<22}{threads:>15}{push:>6}{local * 1e3:>10.2f}{swarm * 1e3:>10.2f}{swarm / local:>13.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
