"""Where a hop's software time goes: one frame sent and echoed back between two libp2p hosts in
one process (each host on its own trio thread, as in every swarm process), three ways, alternating
block by block:

- **swarm's path**: frames written and read from asyncio (``write_frame``/``read_frame``: encoding,
  the hand-off to the host's trio thread and back), yamux over Noise, the echo handler on the
  other host's asyncio loop, as servers and clients exchange hidden states today;
- **trio only**: the same bytes over the same yamux and Noise, written and read on the hosts' trio
  threads (no asyncio, no encoding): what py-libp2p itself costs, the floor for a hop whose
  frames never leave libp2p's thread but to be computed;
- **swarm's path over mplex**: as the first, with py-libp2p's other stream muxer instead of yamux
  (its only alternative that runs over the same TCP and Noise here).

Medians over the round trips of each frame size (1 KB: a decode step's hidden state of the
default model in bfloat16; 16 KB: the 1.1B model's in float32; 1 MB: a prefill's).

    python scripts/bench_wire.py [--repeats 200] [--out scripts/results/wire.json]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import struct
import time

import swarm  # noqa: F401  (first: it sets OpenMP's spin count, which must precede PyTorch)
import swarm.p2p.host as host_module
import torch
from bench_common import add_out, write_results
from libp2p.custom_types import TProtocol
from swarm.p2p.host import Host
from swarm.p2p.loop import run
from swarm.p2p.streams import Stream
from swarm.p2p.wire import Frame, read_frame, write_frame

ECHO, RAW = "/swarm-bench/echo/1.0.0", "/swarm-bench/raw/1.0.0"
SIZES = (("1 KB", 256), ("16 KB", 4096), ("1 MB", 2**18))
PATHS = ("swarm", "trio", "mplex")


@contextlib.contextmanager
def muxer(name: str):
    """Hosts started inside use ``name`` ("yamux" or "mplex") as their only stream muxer (the
    product's hosts speak yamux only: this swaps the module's choice for the benchmark)."""
    saved = host_module.YAMUX_PROTOCOL_ID, host_module.Yamux
    if name == "mplex":
        from libp2p.stream_muxer.mplex.mplex import MPLEX_PROTOCOL_ID, Mplex

        host_module.YAMUX_PROTOCOL_ID, host_module.Yamux = MPLEX_PROTOCOL_ID, Mplex
    try:
        yield
    finally:
        host_module.YAMUX_PROTOCOL_ID, host_module.Yamux = saved


class Pair:
    """Two connected hosts with an echo stream served from asyncio and one served on trio."""

    async def start(self) -> Pair:
        self.a, self.b = await Host.start(), await Host.start()

        async def echo(stream) -> None:
            while True:
                frame = await read_frame(stream, timeout=60)
                await write_frame(stream, frame, timeout=60)

        async def raw_echo(net_stream) -> None:  # trio side: no asyncio, no encoding
            stream = Stream(self.b._bridge, net_stream, RAW)
            while True:
                message = await stream._read_message(1 << 26, None, None)
                await stream._write(struct.pack(">I", len(message)) + bytes(message))

        self.b.set_stream_handler(ECHO, echo)
        self.b._bridge.run_soon(self.b._lp.set_stream_handler, TProtocol(RAW), raw_echo)
        await self.a.connect(self.b.addrs[0], timeout=10)
        self.echo = await self.a.open_stream(self.b.peer_id, ECHO, timeout=10)
        self.raw = await self.a.open_stream(self.b.peer_id, RAW, timeout=10)
        return self

    async def swarm_round_trips(self, numel: int, n: int) -> list[float]:
        frame = Frame("result", {}, [torch.randn(numel)])
        times = []
        for _ in range(n):
            t = time.perf_counter()
            await write_frame(self.echo, frame, timeout=60)
            await read_frame(self.echo, timeout=60)
            times.append(time.perf_counter() - t)
        return times

    async def trio_round_trips(self, numel: int, n: int) -> list[float]:
        payload = torch.randn(numel).numpy().tobytes()
        message = struct.pack(">I", len(payload)) + payload

        async def loop() -> list[float]:  # on host a's trio thread
            times = []
            for _ in range(n):
                t = time.perf_counter()
                await self.raw._write(message)
                await self.raw._read_message(1 << 26, None, None)
                times.append(time.perf_counter() - t)
            return times

        return await self.a._bridge.call(loop, timeout=600, what="round trips")

    async def close(self) -> None:
        await self.a.close()
        await self.b.close()


async def measure(repeats: int, blocks: int = 4) -> list[dict]:
    with muxer("yamux"):
        yamux = await Pair().start()
    with muxer("mplex"):
        mplex = await Pair().start()
    times: dict[tuple[str, str], list[float]] = {(p, label): [] for p in PATHS for label, _ in SIZES}
    try:
        for block in range(blocks):  # alternating, so the machine's drift hits all alike
            for label, numel in SIZES:
                n = max(5, repeats // blocks // (1 if numel < 10**5 else 8))
                order = PATHS if block % 2 == 0 else PATHS[::-1]
                for path in order:
                    if path == "trio":
                        got = await yamux.trio_round_trips(numel, n)
                    else:
                        got = await (yamux if path == "swarm" else mplex).swarm_round_trips(numel, n)
                    times[(path, label)] += got[1:]  # the first of a block warms up
    finally:
        await yamux.close()
        await mplex.close()
    return [{"path": p, "frame": label, "round_trip_ms": round(statistics.median(times[(p, label)]) * 1e3, 3),
             "samples": len(times[(p, label)])} for label, _ in SIZES for p in PATHS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    add_out(parser, "wire")
    args = parser.parse_args()
    rows = run(measure(args.repeats))
    print("one frame sent and echoed back between two hosts in one process (median round trip, ms):")
    print(f"  {'frame':<8}" + "".join(f"{p:>10}" for p in PATHS))
    for label, _ in SIZES:
        print(f"  {label:<8}" + "".join(f"{r['round_trip_ms']:>10.3f}" for r in rows if r["frame"] == label))
    write_results(args.out, "wire", {"repeats": args.repeats, "sizes": [s for s, _ in SIZES]}, {"rows": rows})


if __name__ == "__main__":
    main()
