"""One libp2p stream used from asyncio, and the errors of reading and writing it.

A :class:`Stream` wraps a py-libp2p stream that lives on the host's trio thread: every call is
handed to that thread (:class:`~swarm.p2p.bridge.TrioThread`) and bounded by its timeout. Reading a
message (a big-endian u32 length, then the body) is the part strangers can abuse, so it takes a
deadline per message from its first byte and, optionally, a :class:`~swarm.p2p.limits.FrameBudget`
that the announced length must fit in before any of the body is read; whatever ends a read, the
bytes it received are freed at once.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from contextlib import contextmanager

import trio
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.stream.exceptions import StreamEOF, StreamReset

from swarm.p2p.bridge import P2PError, P2PTimeoutError, TrioThread
from swarm.p2p.limits import FrameBudget, Grant

READ_AHEAD = 1 << 16  # bytes a message read asks yamux for at once (what is past the message waits)
MIN_FRAME_RATE = 1 << 20  # bytes/s: a message of n bytes gets n / MIN_FRAME_RATE s on top of its frame timeout
BUDGET_STEP = 1 << 20  # bytes of a message taken from the budget ahead of those received
CLOSE_TIMEOUT = 5.0  # for a graceful stream close or reset


class MessageTooLargeError(P2PError):
    """A length-prefixed message announced more bytes (``length``) than the reader accepts."""

    def __init__(self, length: int, max_bytes: int):
        super().__init__(f"a message of {length} bytes exceeds the maximum of {max_bytes} bytes")
        self.length = length


class StreamClosedError(P2PError):
    """End of stream or reset while reading or writing (a killed peer looks like a clean EOF)."""


class FrameStalledError(P2PTimeoutError):
    """A message started but did not complete within its frame timeout."""


class Message(bytearray):
    """A received message; ``grant`` holds its bytes in the reader's :class:`FrameBudget` (if
    any) until the caller releases it."""

    grant: Grant | None = None

    def release(self) -> None:
        if self.grant is not None:
            self.grant.release()


def _release_message(message: Message) -> None:  # a message read for a caller that went away
    message.release()
    message.clear()


@contextmanager
def _stream_errors(what: str):
    """Turn libp2p's end-of-stream, reset and connection errors into StreamClosedError."""
    try:
        yield
    except StreamEOF:
        raise StreamClosedError(f"{what}: stream closed by the peer (EOF)") from None
    except StreamReset:
        raise StreamClosedError(f"{what}: stream reset") from None
    except (BaseLibp2pError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise StreamClosedError(f"{what}: {type(exc).__name__}: {exc}") from exc


async def _quietly(fn: Callable[[], Awaitable[object]]) -> None:
    """Best effort close/reset: the stream may already be gone."""
    with trio.move_on_after(CLOSE_TIMEOUT):
        try:
            await fn()
        except (BaseLibp2pError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


class Stream:
    """One libp2p stream, used from asyncio. Not safe for concurrent reads (or concurrent writes).

    A read or write that timed out or was cancelled may have consumed or sent part of the data:
    reset the stream after one rather than reuse it.
    """

    def __init__(self, bridge: TrioThread, net_stream, protocol: str):
        self._bridge = bridge
        self._ns = net_stream
        self.remote_peer_id: str = net_stream.muxed_conn.peer_id.to_base58()
        self.protocol = protocol
        self._finished = False  # closed or reset by us
        self._pending = bytearray()  # read but not yet returned

    def __repr__(self) -> str:
        return f"<Stream {self.protocol} with {self.remote_peer_id}>"

    @property
    def relayed(self) -> bool:
        """Whether the stream's connection goes through a relay (its remote address is the relay's)."""
        try:
            return any("/p2p-circuit" in str(a) for a in self._ns.muxed_conn.get_transport_addresses())
        except Exception:
            return False

    @property
    def remote_address(self) -> tuple[str, int] | None:
        """The (ip, port) the peer's connection comes from, as this host sees it (None: unknown)."""
        try:
            return self._ns.get_remote_address()
        except Exception:  # a connection that has gone
            return None

    def _what(self, op: str) -> str:
        return f"{op} {self.protocol} with {self.remote_peer_id}"

    async def read(self, max_bytes: int = 1 << 20, timeout: float | None = None) -> bytes:
        """1..max_bytes bytes, as soon as any arrive. StreamClosedError at EOF or reset."""
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        return await self._bridge.call(self._read, max_bytes, timeout=timeout, what=self._what("read from"))

    async def read_exactly(self, n: int, timeout: float | None = None) -> bytes:
        """Exactly ``n`` bytes; StreamClosedError if the stream ends first. ``timeout`` covers the
        whole call."""
        return await self._bridge.call(self._read_exactly, n, timeout=timeout, what=self._what("read from"))

    async def read_message(
        self,
        max_bytes: int,
        timeout: float | None = None,
        frame_timeout: float | None = None,
        budget: FrameBudget | None = None,
    ) -> Message:
        """One message framed by a big-endian u32 length, read in a single call to the libp2p
        thread (the prefix and the body together).

        ``timeout`` bounds the whole call, the wait for the message to start included;
        ``frame_timeout`` bounds the message itself from its first byte on (plus a second per
        :data:`MIN_FRAME_RATE` bytes it announces), so a peer cannot hold a half-sent message
        for as long as an idle stream may last. With a ``budget``, the announced length is
        taken from it before any of the body is read (and returned when the read fails); the
        message's ``grant`` holds it until the caller releases it.

        Raises :class:`MessageTooLargeError` when the prefix announces more than ``max_bytes``,
        :class:`FrameBudgetError` when the budget has no room for it (the body is left unread in
        both cases: reset the stream), :class:`FrameStalledError` past ``frame_timeout``,
        StreamClosedError if the stream ends first. Whatever ends a read, the bytes it received
        are freed at once."""
        return await self._bridge.call(
            self._read_message,
            max_bytes,
            frame_timeout,
            budget,
            timeout=timeout,
            what=self._what("read from"),
            orphan=_release_message,
        )

    async def write(self, data: bytes, timeout: float | None = None) -> None:
        """Write all of ``data`` (any bytes-like object), waiting for the peer's flow-control window."""
        await self._bridge.call(self._write, data, timeout=timeout, what=self._what("write to"))

    async def close(self) -> None:
        """Graceful close of our side (the peer reads EOF after what we wrote). Best effort: never
        raises for a dead stream or a closed host."""
        await self._finish(self._ns.close, "close")

    async def reset(self) -> None:
        """Abort the stream in both directions (the peer's reads and writes fail). Best effort."""
        await self._finish(self._ns.reset, "reset")

    async def _finish(self, how, op: str) -> None:
        if not self._finished:
            self._finished = True
            try:
                await self._bridge.call(_quietly, how, timeout=None, what=self._what(op))
            except P2PError:
                pass

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await (self.close() if exc_type is None else self.reset())

    # ---- on the host's trio thread itself (the hot path of inference sessions) ---------------

    async def read_message_here(self, max_bytes: int, frame_timeout: float | None, budget: FrameBudget | None) -> Message:
        """:meth:`read_message` from the trio thread (the caller bounds the wait)."""
        return await self._read_message(max_bytes, frame_timeout, budget)

    async def write_here(self, data) -> None:
        """:meth:`write` from the trio thread (the caller bounds the wait)."""
        await self._write(data)

    async def reset_here(self) -> None:
        """:meth:`reset` from the trio thread."""
        if not self._finished:
            self._finished = True
            await _quietly(self._ns.reset)

    # trio side
    async def _read(self, n: int) -> bytes:
        if self._pending:  # read ahead by _read_message
            data = bytes(self._pending[:n])
            del self._pending[:n]
            return data
        return await self._read_net(n)

    async def _read_net(self, n: int) -> bytes:
        with _stream_errors(self._what("read from")):
            data = await self._ns.read(n)
        if not data:
            raise StreamClosedError(f"{self._what('read from')}: stream closed by the peer (EOF)")
        return data

    async def _read_exactly(self, n: int) -> bytes:
        buf = bytearray()
        try:
            while len(buf) < n:
                try:
                    buf += await self._read(n - len(buf))
                except StreamClosedError as exc:
                    raise StreamClosedError(f"{exc} after {len(buf)} of {n} bytes") from None
        except BaseException:
            buf.clear()  # a traceback may keep this frame alive: do not let it keep the bytes too
            raise
        return bytes(buf)

    async def _read_message(self, max_bytes: int, frame_timeout: float | None, budget: FrameBudget | None) -> Message:
        # a small message's prefix and body usually sit in yamux's buffer together: one read
        # takes both (each read costs several of trio's scheduling rounds), the rest waits here
        if not self._pending:  # between messages: waiting here is bounded by the caller's timeout
            self._pending += await self._read_net(READ_AHEAD)
        started = trio.current_time()
        progress = [0, 0]  # bytes of the body received, announced
        with trio.CancelScope() as scope:
            if frame_timeout is not None:
                scope.deadline = started + frame_timeout
            return await self._read_body(max_bytes, budget, scope, frame_timeout, started, progress)
        raise FrameStalledError(
            f"{self._what('read from')}: a message of {progress[1]} bytes was not complete "
            f"{trio.current_time() - started:.1f} s after it started ({progress[0]} bytes received)"
        )

    async def _read_body(self, max_bytes, budget, scope, frame_timeout, started, progress) -> Message:
        while len(self._pending) < 4:
            try:
                self._pending += await self._read_net(READ_AHEAD)
            except StreamClosedError as exc:
                raise StreamClosedError(f"{exc} after {len(self._pending)} of 4 bytes") from None
        (length,) = struct.unpack_from(">I", self._pending)
        if length > max_bytes:
            raise MessageTooLargeError(length, max_bytes)
        progress[1] = length
        # the budget is charged as bytes arrive (a step ahead of them), not for the length a peer
        # announces: four bytes of a prefix cannot hold the budget for everyone else
        grant = budget.take(self.remote_peer_id, min(length, BUDGET_STEP)) if budget is not None else None
        if frame_timeout is not None:
            scope.deadline = started + frame_timeout + length / MIN_FRAME_RATE
        message = Message()
        try:
            message += self._pending[4 : 4 + length]
            del self._pending[: 4 + len(message)]
            while len(message) < length:
                progress[0] = len(message)
                if grant is not None and grant.nbytes < min(length, len(message) + BUDGET_STEP):
                    grant.grow(min(length, len(message) + BUDGET_STEP) - grant.nbytes)
                try:
                    message += await self._read_net(min(length - len(message), BUDGET_STEP))
                except StreamClosedError as exc:
                    raise StreamClosedError(f"{exc} after {len(message)} of {length} bytes") from None
            if grant is not None and grant.nbytes < length:
                grant.grow(length - grant.nbytes)
        except BaseException:
            message.clear()  # freed now, whatever keeps this frame (a traceback) alive
            if grant is not None:
                grant.release()
            raise
        message.grant = grant
        return message

    async def _write(self, data) -> None:
        with _stream_errors(self._what("write to")):
            await self._ns.write(data if isinstance(data, bytes) else bytes(data))
