"""The client's side of scripts/bench_paper.py, run on the client's emulated host: measures the
link to each server and the swarm's speed, and prints one JSON object per measurement.

    python scripts/paper_client.py MODEL_DIR --peers MADDR,MADDR,MADDR [--steps 8]
                                   [--table decode_128,decode_1024,forward_1x128,forward_16x128] [--sweep RTT_MS,...]

- ``link``: the round trip to each server (libp2p ping, median of 5) and the link's Mbit/s (the
  servers' own timed 1 MiB echo, best of 12 back to back against the first server).
- ``--table``: single-sequence decode steps/s after a 128- or a 1,024-token prompt (median time
  between tokens; the prefill's time reported apart), the stateless forward's tokens/s for
  batches of 1×128 or 16×128 (best of 2).
- ``--sweep``: decode steps/s after a 128-token prompt at each round trip; before each, the line
  ``set-rtt MS`` asks the caller to change the emulated latency, and a line on stdin says done.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import swarm  # first: it sets OpenMP's spin count, which must precede PyTorch
import torch

from bench_common import open_swarm  # a sibling script (its folder is on sys.path)

from swarm.engine.checkpoint import Checkpoint
from swarm.engine.generation import GenerationConfig
from swarm.p2p.bandwidth import measure_bandwidth
from swarm.p2p.client import ClientConfig
from swarm.p2p.remote_blocks import RemoteBlocks

SEQ = 128


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def measure_link(remote: RemoteBlocks, peers: list[str]) -> dict:
    host = remote.client.host

    async def link() -> dict:
        ids = [await host.connect(p, timeout=30) for p in peers]
        rtts = []
        for peer in ids:
            times = [await host.ping(peer, timeout=10) for _ in range(6)][1:]  # the first may open a stream
            rtts.append(statistics.median(times) * 1e3)
        # back to back on one connection: TCP's window grows over the first echoes
        mbit = max([await measure_bandwidth(host, ids[0], timeout=60) for _ in range(6)])
        return {"rtt_ms": [round(r, 2) for r in rtts], "mbit": round(mbit, 1)}

    return remote.background.call(link(), timeout=300)


def decode(client: swarm.Swarm, prompt_len: int, steps: int) -> dict:
    """Greedy decoding of ``steps`` tokens after a random prompt of ``prompt_len`` tokens, by
    ``client`` (a joined :class:`swarm.Swarm`)."""
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(100, client.checkpoint.config.vocab_size - 100, (prompt_len,), generator=g).tolist()
    stamps = [time.perf_counter()]
    gen = GenerationConfig(max_new_tokens=steps + 1, eos_token_ids=())
    client.generate_ids(prompt, gen, on_token=lambda _: stamps.append(time.perf_counter()))
    between = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return {"steps_per_s": round(1 / statistics.median(between), 3), "prefill_s": round(stamps[1] - stamps[0], 3),
            "step_ms": [round(t * 1e3, 1) for t in between]}


def forward(remote: RemoteBlocks, hidden_size: int, batch: int) -> dict:
    """Tokens/s of one stateless forward of ``batch × 128`` random hidden states (best of 2)."""
    hidden = torch.randn(batch, SEQ, hidden_size, generator=torch.Generator().manual_seed(batch)).to(torch.bfloat16)
    times = []
    with torch.no_grad():
        for _ in range(2):
            t = time.perf_counter()
            remote(hidden)
            times.append(time.perf_counter() - t)
    return {"tokens_per_s": round(batch * SEQ / min(times), 1), "seconds": [round(t, 3) for t in times]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--peers", required=True, help="the servers' announced multiaddrs, comma-separated")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--table", default="", help="measurements, comma-separated: decode_128, decode_1024, forward_1x128, forward_16x128")
    parser.add_argument("--sweep", default="", help="round trips in ms, comma-separated")
    args = parser.parse_args()
    peers = args.peers.split(",")
    checkpoint = Checkpoint(args.model_dir)
    cfg = ClientConfig(initial_peers=peers[:1], request_timeout=60, step_timeout=120, wait_timeout=60)

    def decode_fresh(prompt_len: int) -> dict:
        """:func:`decode` by a client of the facade joined for it (through the links as they are now)."""
        with open_swarm(checkpoint.path, peers[:1], dtype="bfloat16", step_timeout=120, timeout=60) as client:
            return decode(client, prompt_len, args.steps)

    with RemoteBlocks.connect(checkpoint, cfg=cfg) as remote:
        emit(what="link", **measure_link(remote, peers))
        for name in [m for m in args.table.split(",") if m]:
            kind, size = name.split("_")
            if kind == "decode":
                emit(what=name, **decode_fresh(int(size)))
            else:
                batch = int(size.split("x")[0])
                emit(what=name, **forward(remote, checkpoint.config.hidden_size, batch))
    for rtt in [float(r) for r in args.sweep.split(",") if r]:
        emit(what="set-rtt", rtt_ms=rtt)
        sys.stdin.readline()
        with RemoteBlocks.connect(checkpoint, cfg=cfg) as remote:  # fresh connections: through the new delay
            link = measure_link(remote, peers)
        emit(what="sweep", set_rtt_ms=rtt, **link, **decode_fresh(SEQ))


if __name__ == "__main__":
    main()
