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

And a server's hop itself: decode steps (1 KB hidden states) sent by a client on this process's
asyncio loop to an in-process ``BlockServer`` of one small block, which reads, computes and answers
them as it serves any session, with the server's timestamps (:mod:`swarm.p2p.hop_trace`): from the
step read and decoded on the libp2p thread to its compute starting on the compute thread, and from
its compute done to its answer written, back on the libp2p thread. Those two stretches and
py-libp2p's read of the frame (half a trio-only round trip) are the software of a hop.

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
from bench_local import TINYLLAMA, random_llama_checkpoint
from libp2p.custom_types import TProtocol
from swarm.p2p import hop_trace, protocols
from swarm.p2p.host import Host
from swarm.p2p.loop import run
from swarm.p2p.server import BlockServer, ServerConfig
from swarm.p2p.streams import Stream
from swarm.p2p.wire import Frame, expect, read_frame, write_frame
from swarm.engine.default_model import swarm_home

ECHO, RAW = "/swarm-bench/echo/1.0.0", "/swarm-bench/raw/1.0.0"
SIZES = (("1 KB", 256), ("16 KB", 4096), ("1 MB", 2**18))
PATHS = ("swarm", "trio", "mplex")
# a server's step, between the timestamps of swarm.p2p.hop_trace
STAGES = {
    "read → compute starts": ("read", "started"),  # queued, the compute thread woken
    "compute": ("started", "done"),
    "compute done → answer written": ("done", "written"),  # the libp2p thread woken, encoded, yamux + Noise
}
# one block whose decode step's hidden state is 1 KB in float32 (256 values): the compute is small
STEP_MODEL = {**TINYLLAMA, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512, "dtype": "float32"}


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


class StepServer:
    """An in-process server of one small block, and a client host connected to it."""

    async def start(self) -> StepServer:
        path = random_llama_checkpoint(swarm_home() / "bench" / "llama-1-block-256", STEP_MODEL)
        cfg = ServerConfig(model_dir=path, blocks="0:1", new_swarm=True, dtype="float32", throughput=100.0)
        self.server = await BlockServer.start(cfg)
        self.host = await Host.start()
        self.peer = await self.host.connect(self.server.host.addrs[0], timeout=10)
        self.stages: dict[str, list[float]] = {}  # seconds per step, by stage (see STAGES)
        return self

    async def round_trips(self, n: int) -> list[float]:
        """``n`` decode steps of one session, each sent once its previous answer is read."""
        stream = await self.host.open_stream(self.peer, protocols.INFERENCE, timeout=10)
        await write_frame(stream, Frame("open", {"start": 0, "end": 1, "batch": 1, "max_length": n}), 10)
        expect(await read_frame(stream, timeout=10), "opened")
        x = torch.randn(1, 1, STEP_MODEL["hidden_size"])
        times = []
        hop_trace.marks = {}
        for i in range(n):
            t = time.perf_counter()
            await write_frame(stream, Frame("step", {"step_id": str(i), "position": i}, [x]), 60)
            expect(await read_frame(stream, timeout=60), "output")
            times.append(time.perf_counter() - t)
        marks, hop_trace.marks = hop_trace.marks, None
        await write_frame(stream, Frame("close"), 10)
        expect(await read_frame(stream, timeout=10), "closed")
        await stream.close()
        for name, (a, b) in STAGES.items():
            self.stages.setdefault(name, []).extend(y - x for x, y in zip(marks[a][1:], marks[b][1:]))
        return times

    async def close(self) -> None:
        await self.host.close()
        await self.server.stop()


async def measure(repeats: int, blocks: int = 4) -> tuple[list[dict], dict]:
    with muxer("yamux"):
        yamux = await Pair().start()
    with muxer("mplex"):
        mplex = await Pair().start()
    stepper = await StepServer().start()
    times: dict[tuple[str, str], list[float]] = {(p, label): [] for p in PATHS for label, _ in SIZES}
    step_times: dict[str, list[float]] = {"step": []}
    try:
        for block in range(blocks):  # alternating, so the machine's drift hits all alike
            n = max(5, repeats // blocks)
            step_times["step"] += (await stepper.round_trips(n))[1:]
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
        await stepper.close()
    rows = [{"path": p, "frame": label, "round_trip_ms": round(statistics.median(times[(p, label)]) * 1e3, 3),
             "samples": len(times[(p, label)])} for label, _ in SIZES for p in PATHS]
    step = {k: round(statistics.median(v) * 1e3, 3) for k, v in step_times.items()}
    step["samples"] = len(step_times["step"])
    step["stages"] = {k: round(statistics.median(v) * 1e3, 3) for k, v in stepper.stages.items()}
    trio_read = next(r["round_trip_ms"] for r in rows if r["path"] == "trio" and r["frame"] == "1 KB") / 4
    step["software_per_hop_ms"] = round(
        trio_read + step["stages"]["read → compute starts"] + step["stages"]["compute done → answer written"], 3
    )
    return rows, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    add_out(parser, "wire")
    args = parser.parse_args()
    rows, step = run(measure(args.repeats))
    print("one frame sent and echoed back between two hosts in one process (median round trip, ms):")
    print(f"  {'frame':<8}" + "".join(f"{p:>10}" for p in PATHS))
    for label, _ in SIZES:
        print(f"  {label:<8}" + "".join(f"{r['round_trip_ms']:>10.3f}" for r in rows if r["frame"] == label))
    print(f"a decode step through an in-process server of one block (1 KB hidden state): {step['step']:.3f} ms round trip; "
          "the server's stretches (median ms): " + ", ".join(f"{k} {v:.3f}" for k, v in step["stages"].items()))
    print(f"software of a server's hop (py-libp2p's read, a quarter of the trio-only 1 KB round trip, and the two "
          f"stretches around the compute): {step['software_per_hop_ms']:.3f} ms")
    write_results(args.out, "wire", {"repeats": args.repeats, "sizes": [s for s, _ in SIZES]}, {"rows": rows, "step": step})


if __name__ == "__main__":
    main()
