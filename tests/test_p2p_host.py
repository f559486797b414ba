"""The libp2p host on its trio thread, driven from asyncio: streams, errors, cancellation, security, pubsub.

Real hosts on loopback (port 0), every one closed in a ``finally``; no fixed sleeps: waits are on
events, or polls with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import stat
import struct
import threading
import time
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from swarm.p2p.host import (
    Host,
    P2PError,
    P2PTimeoutError,
    PeerUnreachableError,
    StreamClosedError,
    load_or_create_identity,
)

ECHO = "/test/echo/1"


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@asynccontextmanager
async def hosts(n: int):
    started: list[Host] = []
    try:
        for _ in range(n):
            started.append(await Host.start())
        yield started
    finally:
        for h in started:
            await h.close()


async def echo_handler(stream) -> None:
    """One request: a 4-byte length and a body, answered with the same body."""
    (n,) = struct.unpack(">I", await stream.read_exactly(4, timeout=10))
    await stream.write(await stream.read_exactly(n, timeout=30), timeout=30)


async def request(host: Host, peer: str, body: bytes) -> bytes:
    async with await host.open_stream(peer, ECHO, timeout=10) as stream:
        await stream.write(struct.pack(">I", len(body)) + body[: 1 << 16], timeout=10)
        if len(body) > 1 << 16:
            await stream.write(body[1 << 16 :], timeout=30)
        return await stream.read_exactly(len(body), timeout=30)


def libp2p_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("libp2p-") or "_background_cleanup" in t.name]


# ---- 1. connect, echo, 32 MB ------------------------------------------------------------------


def test_echo_round_trip_and_32mb_payload():
    async def main():
        loop = asyncio.get_running_loop()
        handler_loops = []

        async def handler(stream):
            handler_loops.append(asyncio.get_running_loop())
            await echo_handler(stream)

        async with hosts(2) as (a, b):
            assert a.peer_id != b.peer_id and b.addrs[0].endswith(f"/p2p/{b.peer_id}")
            b.set_stream_handler(ECHO, handler)
            assert await a.connect(b.addrs[0], timeout=10) == b.peer_id
            assert b.peer_id in a.connected_peers()
            assert await request(a, b.peer_id, b"hello") == b"hello"
            assert handler_loops == [loop]  # handlers run on the loop that started the host

            payload = os.urandom(32 << 20)
            t0 = time.perf_counter()
            assert await request(a, b.peer_id, payload) == payload
            print(f"32 MB echoed in {time.perf_counter() - t0:.2f} s")
            assert 0 < await a.ping(b.peer_id, timeout=5) < 1
        assert libp2p_threads() == []

    run(main(), timeout=60)


def test_messages_written_together_or_in_pieces_are_read_one_by_one():
    """``read_message`` reads ahead: messages that arrive in one piece come out one at a time, a
    message split over several writes comes out whole, and bytes read ahead are not lost to a
    plain ``read`` afterwards."""
    bodies = [b"first", b"", os.urandom(100_000), b"last"]

    async def main():
        got = asyncio.Queue()

        async def handler(stream):
            for _ in bodies:
                await got.put(await stream.read_message(1 << 20, timeout=10))
            await got.put(await stream.read_exactly(5, timeout=10))
            await stream.write(b"done", timeout=10)

        async with hosts(2) as (a, b):
            b.set_stream_handler(ECHO, handler)
            await a.connect(b.addrs[0], timeout=10)
            stream = await a.open_stream(b.peer_id, ECHO, timeout=10)
            framed = [struct.pack(">I", len(body)) + body for body in bodies]
            await stream.write(framed[0] + framed[1] + framed[2][:3], timeout=10)  # one and a bit
            await stream.write(framed[2][3:50_000], timeout=10)
            await stream.write(framed[2][50_000:] + framed[3] + b"tail!", timeout=10)
            assert await stream.read_exactly(4, timeout=10) == b"done"
            await stream.close()
            return [got.get_nowait() for _ in range(len(bodies) + 1)]

    assert run(main()) == [*bodies, b"tail!"]


# ---- 2. identity --------------------------------------------------------------------------------


def test_identity_file_gives_a_stable_peer_id(tmp_path):
    path = tmp_path / "keys" / "deep" / "identity.key"

    async def main():
        first = await Host.start(identity=path)
        await first.close()
        second = await Host.start(identity=path)
        await second.close()
        return first.peer_id, second.peer_id

    first, second = run(main())
    assert first == second
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_identity(path).public_key.to_bytes() == load_or_create_identity(path).public_key.to_bytes()


# ---- 3. timeouts and cancellation --------------------------------------------------------------


def test_read_timeout_and_cancelled_read():
    async def main():
        peer_streams: list = []
        release = asyncio.Event()

        async def silent(stream):  # never writes until released
            peer_streams.append(stream)
            await release.wait()
            await stream.write(b"late")

        async with hosts(2) as (a, b):
            b.set_stream_handler("/test/silent/1", silent)
            b.set_stream_handler(ECHO, echo_handler)
            await a.connect(b.addrs[0])
            stream = await a.open_stream(b.peer_id, "/test/silent/1")
            t0 = time.perf_counter()
            with pytest.raises(P2PTimeoutError, match="timed out after 0.2 s"):
                await stream.read(timeout=0.2)
            assert 0.15 < time.perf_counter() - t0 < 2

            reader = asyncio.create_task(stream.read())
            await asyncio.sleep(0)  # the reader submits its call to trio
            await a.ping(b.peer_id)  # submitted after it (FIFO): the read is now blocked on the trio side
            assert a._bridge.in_flight == 1
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(reader, 5)
            # submitted after the cancellation (FIFO), this returns once every other trio task is
            # blocked, so the cancelled trio read has finished unwinding by then
            await a._bridge.call(trio.testing.wait_all_tasks_blocked, timeout=5, what="settle")
            assert a._bridge.in_flight == 0  # the trio read was cancelled too

            # the host and even the stream still work
            release.set()
            assert await stream.read(timeout=5) == b"late"
            assert await request(a, b.peer_id, b"still alive") == b"still alive"
            await stream.close()

    run(main())


# ---- 4. end of stream ----------------------------------------------------------------------------


def test_peer_closing_its_side_gives_stream_closed_error():
    async def main():
        async def say_bye(stream):
            await stream.write(b"bye")  # returning closes the stream

        async with hosts(2) as (a, b):
            b.set_stream_handler("/test/bye/1", say_bye)
            await a.connect(b.addrs[0])
            stream = await a.open_stream(b.peer_id, "/test/bye/1")
            assert await stream.read_exactly(3, timeout=5) == b"bye"
            with pytest.raises(StreamClosedError, match="/test/bye/1"):
                await stream.read(timeout=5)
            await stream.close()

            stream = await a.open_stream(b.peer_id, "/test/bye/1")
            with pytest.raises(StreamClosedError, match="after 3 of 10 bytes"):
                await stream.read_exactly(10, timeout=5)
            await stream.close()

    run(main())


def test_unreachable_peers_and_unknown_protocols():
    async def main():
        async with hosts(2) as (a, b):
            dead = b.addrs[0]
            await b.close()
            with pytest.raises(PeerUnreachableError, match="no known address"):
                await a.open_stream(b.peer_id, ECHO, timeout=5)
            with pytest.raises(PeerUnreachableError, match="not a multiaddr"):
                await a.connect("/ip4/127.0.0.1/tcp/1", timeout=5)
            for _ in range(2):  # a failed dial does not block the next explicit one
                with pytest.raises(PeerUnreachableError, match="cannot connect"):
                    await a.connect(dead, timeout=5)

        async with hosts(2) as (a, b):
            a.add_addrs(b.peer_id, b.addrs)  # learned from an announcement: open_stream dials
            b.set_stream_handler(ECHO, echo_handler)
            assert await request(a, b.peer_id, b"dialed") == b"dialed"
            with pytest.raises(PeerUnreachableError, match="/test/unknown/1"):
                await a.open_stream(b.peer_id, "/test/unknown/1", timeout=5)

    run(main())


# ---- 5. plaintext refused --------------------------------------------------------------------------


class PlaintextPeer:
    """A raw py-libp2p host on its own trio thread whose only security option is plaintext."""

    def __init__(self):
        self.addr: str | None = None
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        assert self._ready.wait(15), "plaintext host did not start"

    async def _main(self):
        import multiaddr
        from libp2p import generate_new_ed25519_identity, new_host
        from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
        from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX, Yamux

        key_pair = generate_new_ed25519_identity()
        self.host = new_host(
            key_pair=key_pair,
            sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)},
            muxer_opt={YAMUX: Yamux},
        )
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with self.host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            self.addr = str(self.host.get_addrs()[0])
            self._ready.set()
            await self._stop.wait()
            await self.host.close()  # closes its connections (leaving run() alone leaks their sockets)

    async def _dial(self, maddr: str) -> None:
        import multiaddr
        from libp2p.peer.peerinfo import info_from_p2p_addr

        with trio.fail_after(10):
            await self.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(maddr)))

    def dial(self, maddr: str) -> BaseException | None:
        """Blocking (call it from a worker thread): the error of a dial, or None if it connected."""
        try:
            trio.from_thread.run(self._dial, maddr, trio_token=self._token)
        except BaseException as exc:
            return exc
        return None

    def connected(self) -> list[str]:
        return [p.to_base58() for p in trio.from_thread.run_sync(self.host.get_connected_peers, trio_token=self._token)]

    def close(self):
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(10)


def test_plaintext_peers_are_refused_both_ways():
    plain, other_plain = PlaintextPeer(), PlaintextPeer()
    try:
        # control: two plaintext peers do connect, so the refusals below are the Noise-only policy
        assert other_plain.dial(plain.addr) is None

        async def main():
            async with hosts(1) as (ours,):
                with pytest.raises(PeerUnreachableError):
                    await ours.connect(plain.addr, timeout=10)
                error = await asyncio.to_thread(plain.dial, ours.addrs[0])
                assert error is not None, "a plaintext-only peer connected to our host"
                assert ours.connected_peers() == []
                assert ours.peer_id not in await asyncio.to_thread(plain.connected)

        run(main())
    finally:
        plain.close()
        other_plain.close()


# ---- 6. gossipsub ------------------------------------------------------------------------------------


def test_pubsub_over_a_line_of_three_hosts():
    topic = "test/announce"

    async def main():
        async with hosts(3) as (a, b, c):
            await a.connect(b.addrs[0])
            await b.connect(c.addrs[0])
            sub_a = await a.subscribe(topic)
            await b.subscribe(topic)  # the relay must subscribe to forward (gossipsub meshes are per topic)
            sub_c = await c.subscribe(topic)

            # the mesh takes a heartbeat or two to form: re-publish until C hears A
            deadline = time.monotonic() + 15
            while True:
                await a.publish(topic, b"warm-up")
                try:
                    sender, data = await sub_c.get(timeout=0.25)
                    break
                except P2PTimeoutError:
                    assert time.monotonic() < deadline, "C never received A's message"
            assert (sender, data) == (a.peer_id, b"warm-up")

            sent = {f"msg-{i}".encode() for i in range(50)}
            await asyncio.gather(*(a.publish(topic, m) for m in sent))
            got: set[bytes] = set()
            while not sent <= got:
                sender, data = await sub_c.get(timeout=10)
                assert sender == a.peer_id
                got.add(data)

            # A's own messages are not delivered back to A: the first thing A hears is B's
            await b.publish(topic, b"from-b")
            assert await sub_a.get(timeout=10) == (b.peer_id, b"from-b")

            await sub_c.cancel()
            with pytest.raises(P2PError):
                await sub_c.get(timeout=1)
            assert [m async for m in sub_c] == []

    run(main(), timeout=45)


# ---- 7. a failing handler ------------------------------------------------------------------------------


def test_a_raising_handler_does_not_kill_the_host(caplog):
    async def main():
        calls = 0

        async def flaky(stream):
            nonlocal calls
            calls += 1
            if calls == 1:
                # fails once the request is in: a handler raising before that can reset the stream
                # while its opener still negotiates, and the opener's one retry gets a fresh stream
                await stream.read_exactly(5, timeout=10)
                raise RuntimeError("boom")
            await echo_handler(stream)

        async with hosts(2) as (a, b):
            b.set_stream_handler(ECHO, flaky)
            await a.connect(b.addrs[0])
            stream = await a.open_stream(b.peer_id, ECHO)
            await stream.write(b"first", timeout=5)
            with pytest.raises(StreamClosedError):  # reset by the host after the handler raised
                await stream.read(timeout=5)
            await stream.close()
            assert await request(a, b.peer_id, b"second") == b"second"

    run(main())
    assert "boom" in caplog.text


def test_close_fails_pending_calls_and_is_idempotent():
    async def main():
        async def silent(stream):
            await asyncio.Event().wait()

        async with hosts(2) as (a, b):
            b.set_stream_handler("/test/silent/1", silent)
            await a.connect(b.addrs[0])
            stream = await a.open_stream(b.peer_id, "/test/silent/1")
            reader = asyncio.create_task(stream.read())
            await asyncio.sleep(0)
            await a.ping(b.peer_id)  # the read is in flight on the trio side
            await a.close()
            with pytest.raises(P2PError, match="closed"):
                await asyncio.wait_for(reader, 5)
            await a.close()
            with pytest.raises(P2PError, match="closed"):
                await stream.read(timeout=1)

    run(main())


def test_a_taken_port_is_refused():
    # py-libp2p listens with SO_REUSEPORT: without the check, both hosts would "listen" on the port
    async def main():
        async with hosts(1) as (a,):
            port = int(a.addrs[0].split("/")[4])
            with pytest.raises(P2PError, match="cannot listen"):
                await Host.start(port=port)

    run(main())
