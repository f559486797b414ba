"""Swarm vs local decode speed, and the wire's round trip and throughput, in one run.

1. Wire: two libp2p hosts in this process (TCP + Noise + yamux on loopback); a frame holding a
   hidden-state tensor of 16 KB and of 32 MB is sent and echoed back. Prints round trip and MB/s.
2. Decode: the same greedy generation (prompt of 16 tokens, N new tokens) run locally and through
   3 `swarm serve` processes on loopback, each holding a third of the blocks. Prints the median
   per-token time of both and their ratio, for the default model and the random 1.1B Llama, with
   the servers' default thread count and one thread, with and without server-to-server push.
   The swarm side is a client of the public facade (:func:`swarm.open`), joined once per setting.
3. The floor: the same 3 processes and blocks connected by OS pipes in a ring instead of libp2p.

Writes scripts/results/swarm.json (``--out``).

    python scripts/bench_swarm.py [--tokens 48] [--models default,1.1b] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import swarm  # noqa: F401  (first: it sets OpenMP's spin count, which must precede PyTorch)
import torch

from bench_common import add_out, open_swarm, write_results  # sibling scripts (their folder is on sys.path)
from bench_local import random_1b_checkpoint

from swarm.engine.checkpoint import Checkpoint, parse_dtype
from swarm.engine.default_model import ensure_default_model
from swarm.engine.generation import GenerationConfig, LocalSession, generate
from swarm.launch import even_ranges, running_swarm
from swarm.p2p.host import Host
from swarm.p2p.loop import run
from swarm.p2p.wire import Frame, read_frame, write_frame

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


def median_per_token(run_generation) -> float:
    """Median time between tokens of ``run_generation(on_token)``."""
    stamps: list[float] = []
    run_generation(lambda _: stamps.append(time.perf_counter()))
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def per_token(open_session, head, prompt: list[int], tokens: int) -> float:
    cfg = GenerationConfig(max_new_tokens=tokens)
    return median_per_token(lambda on_token: generate(head, open_session, prompt, cfg, on_token=on_token))


def alternate_with_local(ckpt: Checkpoint, dtype, tokens: int, rounds: int, remote) -> dict:
    """Median per-token time of local decoding and of ``remote(head, prompt)`` (which returns its
    own median per-token time), and the median of their ratio, over ``rounds`` alternating runs
    (this machine's speed drifts; alternating keeps the two comparable): ``local_s``, ``remote_s``,
    ``ratio`` and each round's ``local_s_rounds``, ``remote_s_rounds``."""
    head = ckpt.load_head(dtype)
    prompt = list(range(100, 116))
    blocks = ckpt.load_blocks(0, ckpt.num_blocks, dtype)
    local_session = lambda b, n: LocalSession(blocks, b, n)  # noqa: E731
    per_token(local_session, head, prompt, 4)  # warm up
    locals_, remotes = [], []
    for _ in range(rounds):
        locals_.append(per_token(local_session, head, prompt, tokens))
        remotes.append(remote(head, prompt))
    ratio = statistics.median(r / loc for r, loc in zip(remotes, locals_))
    return {"local_s": statistics.median(locals_), "remote_s": statistics.median(remotes), "ratio": ratio,
            "local_s_rounds": locals_, "remote_s_rounds": remotes}


def thirds(num_blocks: int) -> list[int]:
    """Where 3 servers' ranges start and end."""
    return [0, num_blocks // 3, 2 * num_blocks // 3, num_blocks]


def server_flags(dtype: str, threads: int | None) -> tuple[str, ...]:
    return ("--dtype", dtype, *(("--threads", str(threads)) if threads else ()))


def decode_bench(path: Path, dtype_name: str, tokens: int, threads: int | None, push: bool, rounds: int) -> dict:
    """Local against 3 `swarm serve` processes on loopback, through one client of the facade
    joined once (see :func:`alternate_with_local`)."""
    ckpt = Checkpoint(path)
    gen_cfg = GenerationConfig(max_new_tokens=tokens)
    with (
        tempfile.TemporaryDirectory(prefix="swarm-bench-") as home,
        running_swarm(path, even_ranges(ckpt.num_blocks, 3), home, server_flags(dtype_name, threads)) as servers,
        open_swarm(path, [servers[0].maddr], dtype=dtype_name, push=push) as client,
    ):
        def through_swarm(head, prompt: list[int]) -> float:
            return median_per_token(lambda on_token: client.generate_ids(prompt, gen_cfg, on_token=on_token))

        return alternate_with_local(ckpt, parse_dtype(dtype_name), tokens, rounds, through_swarm)


def pipe_server(rfd: int, wfd: int, path: str, start: int, end: int, dtype_name: str, threads: int) -> None:
    """The floor's server: blocks ``[start, end)`` stepping hidden states read from a pipe."""
    if threads:
        torch.set_num_threads(threads)
    blocks = Checkpoint(Path(path)).load_blocks(start, end, parse_dtype(dtype_name))
    session = None
    with os.fdopen(rfd, "rb", buffering=0) as inp, os.fdopen(wfd, "wb", buffering=0) as out:
        while header := inp.read(8):
            n, seq = struct.unpack("<II", header)
            if n == 0:  # a new session (an empty cache); passed on round the ring as the answer
                session = LocalSession(blocks, 1, 1024)
                out.write(header)
                continue
            hidden = torch.frombuffer(bytearray(_read_exactly(inp, n)), dtype=session.blocks.dtype).view(1, seq, -1)
            data = session.step(hidden).contiguous().view(torch.uint8).numpy().tobytes()
            out.write(struct.pack("<II", len(data), seq) + data)


def _read_exactly(f, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            raise EOFError("the pipe closed")
        buf += chunk
    return bytes(buf)


def floor_bench(path: Path, dtype_name: str, tokens: int, threads: int | None, rounds: int) -> dict:
    """The same 3 processes and blocks, connected by OS pipes in a ring instead of libp2p: what
    splitting the model across processes costs on this machine before any network stack."""
    ckpt = Checkpoint(path)
    cuts = thirds(ckpt.num_blocks)
    pipes = [os.pipe() for _ in range(4)]
    procs = []
    for i in range(3):
        r, w = pipes[i][0], pipes[i + 1][1]
        args = [sys.executable, __file__, "--pipe-server", str(r), str(w), str(path), str(cuts[i]), str(cuts[i + 1]),
                dtype_name, str(threads or 0)]
        procs.append(subprocess.Popen(args, pass_fds=(r, w)))
    for i in range(3):
        os.close(pipes[i][0])
        os.close(pipes[i + 1][1])
    to_ring, from_ring = os.fdopen(pipes[0][1], "wb", buffering=0), os.fdopen(pipes[3][0], "rb", buffering=0)

    class RingSession:
        def __init__(self, batch: int = 1, max_length: int = 0):
            to_ring.write(struct.pack("<II", 0, 0))  # every server starts a new session
            _read_exactly(from_ring, 8)  # back round the ring: all servers have loaded and reset

        def step(self, hidden, hypo_ids=None):
            data = hidden.contiguous().view(torch.uint8).numpy().tobytes()
            to_ring.write(struct.pack("<II", len(data), hidden.shape[1]) + data)
            m, seq = struct.unpack("<II", _read_exactly(from_ring, 8))
            return torch.frombuffer(bytearray(_read_exactly(from_ring, m)), dtype=hidden.dtype).view(1, seq, -1)

        def close(self):
            pass

    try:
        RingSession()  # wait for the servers to load before timing anything
        ring = lambda head, prompt: per_token(RingSession, head, prompt, tokens)  # noqa: E731
        return alternate_with_local(ckpt, parse_dtype(dtype_name), tokens, rounds, ring)
    finally:
        to_ring.close()
        from_ring.close()
        for p in procs:
            p.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--models", default="default,1.1b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", default="default,1", help="servers' --threads settings to compare")
    parser.add_argument("--push", default="on,off", help="server-to-server push settings to compare")
    parser.add_argument("--rounds", type=int, default=3, help="alternating local and swarm runs per setting")
    parser.add_argument("--floor", default="on", help="also run the pipe floor (on/off)")
    parser.add_argument("--pipe-server", nargs=7, help=argparse.SUPPRESS)
    add_out(parser, "swarm")
    args = parser.parse_args()
    if args.pipe_server:
        r, w, path, start, end, dtype_name, threads = args.pipe_server
        return pipe_server(int(r), int(w), path, int(start), int(end), dtype_name, int(threads))

    print("wire (TCP + Noise + yamux, loopback, one frame out and echoed back):")
    wire = []
    for label, rtt_ms, mbps in run(wire_bench()):
        print(f"  {label:>6} hidden-state frame: round trip {rtt_ms:8.2f} ms, {mbps:8.1f} MB/s")
        wire.append({"frame": label, "round_trip_ms": rtt_ms, "mb_s": mbps})
    paths = {"default": ("SmolLM2-135M", ensure_default_model), "1.1b": ("Llama-1.1B (random)", random_1b_checkpoint)}
    print(f"\ndecode, {args.dtype}, median per-token time over {args.tokens} tokens, 3 loopback servers,")
    print(f"{args.rounds} alternating local and swarm runs (ratio: the median of the runs' ratios):")
    print(f"  {'model':<22}{'server threads':>15}{'push':>6}{'local ms':>10}{'swarm ms':>10}{'swarm/local':>13}")
    rows = []

    def record(name: str, threads: str, transport: str, r: dict) -> None:
        shown = {"libp2p, push": "on", "libp2p, no push": "off", "pipes": "pipes"}[transport]
        print(f"  {name:<22}{threads:>15}{shown:>6}{r['local_s'] * 1e3:>10.2f}{r['remote_s'] * 1e3:>10.2f}"
              f"{r['ratio']:>13.2f}", flush=True)
        rows.append({"model": name, "threads": threads, "transport": transport, "local_ms": r["local_s"] * 1e3,
                     "swarm_ms": r["remote_s"] * 1e3, "ratio": r["ratio"],
                     "local_ms_rounds": [t * 1e3 for t in r["local_s_rounds"]],
                     "swarm_ms_rounds": [t * 1e3 for t in r["remote_s_rounds"]]})

    for key in args.models.split(","):
        name, get_path = paths[key]
        for threads in args.threads.split(","):
            n = None if threads == "default" else int(threads)
            for push in args.push.split(","):
                r = decode_bench(get_path(), args.dtype, args.tokens, n, push == "on", args.rounds)
                record(name, threads, "libp2p, push" if push == "on" else "libp2p, no push", r)
            if args.floor == "on":
                record(name, threads, "pipes", floor_bench(get_path(), args.dtype, args.tokens, n, args.rounds))
    settings = {"tokens": args.tokens, "prompt": 16, "models": args.models.split(","), "dtype": args.dtype,
                "threads": args.threads.split(","), "push": args.push.split(","), "rounds": args.rounds,
                "floor": args.floor, "servers": 3}
    write_results(args.out, "swarm", settings, {"wire": wire, "decode": rows})


if __name__ == "__main__":
    main()
