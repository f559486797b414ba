"""A hostile peer: a real libp2p host with a valid Noise identity that attacks one server with
everything a stranger can send, for testing that the server stays within its bounds.

    python scripts/hostile_peer.py /ip4/127.0.0.1/tcp/PORT/p2p/ID --seconds 60

Run it only against servers you own. Each round, on fresh connections (and now and then a fresh
identity), it runs at once:

- partial frames on every protocol: a length prefix announcing up to the server's largest frame,
  part of the body, then a stall, a reset or a disconnect;
- oversized frames (lengths past the maximum) and garbage;
- opens that try to hold the whole KV budget (the largest sessions allowed, never stepped);
- floods of steps on open sessions (valid ones as fast as the server takes them, then a wrong
  position), and floods of info requests and pushes to sessions that do not exist;
- then an abrupt disconnect of everything.

It prints what the server answered (error codes and how streams ended) when it is done.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import struct
import time
from collections import Counter
from pathlib import Path

import swarm  # noqa: E402,F401  (before torch: its OpenMP settings)
import torch  # noqa: E402

from swarm.p2p import protocols  # noqa: E402
from swarm.p2p.host import Host, P2PError  # noqa: E402
from swarm.p2p.wire import Frame, WireError, read_frame, write_frame  # noqa: E402

MAX_SENT = 64 << 20  # bytes of one partial frame actually sent (its length may announce more)
PROTOCOLS = [protocols.INFO, protocols.INFERENCE, protocols.PUSH, protocols.FORWARD, protocols.BACKWARD, protocols.PROBE]


class HostilePeer:
    def __init__(self, maddr: str, seed: int = 0, identity: Path | None = None):
        self.maddr = maddr
        self.rng = random.Random(seed)
        self.identity = identity
        self.outcomes: Counter = Counter()
        self.info: dict = {}

    def _note(self, what: str) -> None:
        self.outcomes[what] += 1

    async def attack(self, seconds: float) -> Counter:
        """Attack for ``seconds`` in rounds of a few seconds each; returns the outcomes seen."""
        deadline = time.monotonic() + seconds
        round_ = 0
        while time.monotonic() < deadline:
            fresh_identity = round_ % 3 == 2  # now and then a new peer id (a second stranger)
            host = await Host.start(identity=None if fresh_identity or self.identity is None else self.identity)
            try:
                peer = await host.connect(self.maddr, timeout=10)
                if not self.info:
                    self.info = (await protocols.request(host, peer, protocols.INFO, Frame("info"), 10))["info"]
                left = max(0.5, min(5.0, deadline - time.monotonic()))
                tasks = [
                    *(self._partial(host, peer, p) for p in PROTOCOLS for _ in range(2)),
                    *(self._garbage(host, peer, p) for p in PROTOCOLS),
                    self._hold_cache(host, peer),
                    self._flood_steps(host, peer, left),
                    self._flood_info(host, peer, left),
                    self._flood_push(host, peer, left),
                ]
                await asyncio.wait([asyncio.ensure_future(t) for t in tasks], timeout=left)
            except P2PError as exc:
                self._note(f"round failed: {type(exc).__name__}")
            finally:
                await host.close()  # abrupt: every stream and connection of this round just ends
            round_ += 1
        return self.outcomes

    # ---- attacks --------------------------------------------------------------------------------

    async def _stream(self, host, peer, protocol):
        return await host.open_stream(peer, protocol, timeout=10)

    async def _partial(self, host, peer, protocol) -> None:
        """Announce a big frame, send part of it, then stall or reset."""
        try:
            stream = await self._stream(host, peer, protocol)
            if protocol == protocols.INFERENCE:
                await self._open(stream, max_length=8)
            length = self.rng.choice([1 << 16, 1 << 20, 32 << 20, self.info.get("limits", {}).get("max_frame", 1 << 28)])
            sent = min(self.rng.randrange(length // 2, length), MAX_SENT)
            await stream.write(struct.pack(">I", length), timeout=10)
            chunk = os.urandom(1 << 16)
            while sent > 0:
                await stream.write(chunk[: min(sent, len(chunk))], timeout=10)
                sent -= len(chunk)
            if self.rng.random() < 0.3:
                await stream.reset()
                self._note("partial frame: reset")
                return
            self._note(f"partial frame: {await self._how_it_ends(stream, 60)}")
        except (P2PError, WireError) as exc:
            self._note(f"partial frame: {type(exc).__name__}")

    async def _garbage(self, host, peer, protocol) -> None:
        payloads = [
            struct.pack(">I", 0xFFFFFFFF) + b"x" * 64,  # past any maximum
            os.urandom(self.rng.randrange(1, 4096)),
            struct.pack(">IH", 10, 200) + b"\x80" * 8,  # header length past the frame
        ]
        for payload in payloads:
            try:
                stream = await self._stream(host, peer, protocol)
                await stream.write(payload, timeout=10)
                self._note(f"garbage: {await self._how_it_ends(stream, 10)}")
                await stream.reset()
            except (P2PError, WireError) as exc:
                self._note(f"garbage: {type(exc).__name__}")

    async def _open(self, stream, max_length: int, batch: int = 1) -> Frame:
        start, end = self.info.get("start", 0), self.info.get("end", 1)
        frame = Frame("open", {"start": start, "end": end, "batch": batch, "max_length": max_length})
        await write_frame(stream, frame, timeout=10)
        return await read_frame(stream, timeout=10)

    async def _hold_cache(self, host, peer) -> None:
        """Open the largest sessions the server allows and never step them."""
        limits = self.info.get("limits", {})
        context = limits.get("context") or 2048
        batch = max(1, min(limits.get("max_batch", 1), limits.get("cache_tokens", context) // context))
        streams = []
        for _ in range(limits.get("max_peer_sessions", 8) + 2):
            try:
                stream = await self._stream(host, peer, protocols.INFERENCE)
                reply = await self._open(stream, context, batch)
                self._note(f"hold cache: {reply.kind if reply.kind != 'error' else reply['code']}")
                streams.append(stream)
            except (P2PError, WireError) as exc:
                self._note(f"hold cache: {type(exc).__name__}")
        await asyncio.sleep(3600)  # held until the round ends the connection

    async def _flood_steps(self, host, peer, seconds: float) -> None:
        hidden_size = self.info["hidden_size"]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                stream = await self._stream(host, peer, protocols.INFERENCE)
                reply = await self._open(stream, max_length=64)
                if reply.kind != "opened":
                    self._note(f"flood: open {reply.fields.get('code')}")
                    await stream.reset()
                    await asyncio.sleep(0.2)
                    continue
                x = torch.randn(1, 1, hidden_size)
                for position in range(64):
                    await write_frame(stream, Frame("step", {"step_id": f"s{position}", "position": position}, [x]), 10)
                await write_frame(stream, Frame("step", {"step_id": "bad", "position": 999}, [x]), 10)
                self._note(f"flood: {await self._how_it_ends(stream, 30, skip='output')}")
                await stream.reset()
            except (P2PError, WireError) as exc:
                self._note(f"flood: {type(exc).__name__}")

    async def _flood_info(self, host, peer, seconds: float) -> None:
        deadline = time.monotonic() + seconds

        async def one() -> None:
            try:
                reply = await protocols.request(host, peer, protocols.INFO, Frame("info"), 10)
                self._note(f"info flood: {reply.kind if reply.kind != 'error' else reply['code']}")
            except (P2PError, WireError) as exc:
                self._note(f"info flood: {type(exc).__name__}")

        while time.monotonic() < deadline:
            await asyncio.gather(*(one() for _ in range(16)))

    async def _flood_push(self, host, peer, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        try:
            stream = await self._stream(host, peer, protocols.PUSH)
            x = torch.randn(1, 1, self.info["hidden_size"])
            i = 0
            while time.monotonic() < deadline:
                frame = Frame("step", {"session": os.urandom(16).hex(), "step_id": str(i), "position": 0}, [x])
                await write_frame(stream, frame, timeout=10)
                i += 1
            self._note("push flood: sent")
        except (P2PError, WireError) as exc:
            self._note(f"push flood: {type(exc).__name__}")

    @staticmethod
    async def _how_it_ends(stream, timeout: float, skip: str | None = None) -> str:
        try:
            while True:
                frame = await read_frame(stream, timeout=timeout)
                if frame.kind != skip:
                    return frame.fields.get("code", frame.kind) if frame.kind == "error" else frame.kind
        except P2PError as exc:
            return type(exc).__name__
        except WireError:
            return "bad reply"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("maddr", help="the server's multiaddr (.../p2p/ID)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from swarm.p2p.loop import run

    attacker = HostilePeer(args.maddr, args.seed)
    outcomes = run(attacker.attack(args.seconds))
    for what, count in sorted(outcomes.items()):
        print(f"{count:6d}  {what}")


if __name__ == "__main__":
    main()
