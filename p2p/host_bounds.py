"""py-libp2p 0.8.1's connections, bounded: what a peer can make a host hold.

:func:`bound_connections` patches a host's network (once, as it starts) so that an inbound
connection's handler ends with the connection (py-libp2p keeps it, and its slot of the 250-slot
limiter, until the whole host stops) and a yamux stream's receive buffer cannot grow past
:data:`STREAM_BUFFER_LIMIT` (py-libp2p only logs a peer that ignores the window, and buffers on).
"""

from __future__ import annotations

import contextvars

import trio
from libp2p.stream_muxer.yamux.yamux import MAX_WINDOW_SIZE as YAMUX_MAX_WINDOW

STREAM_BUFFER_LIMIT = YAMUX_MAX_WINDOW + (1 << 20)  # unread bytes a yamux stream may hold (a window's worth)


class _FlowControlViolation(ConnectionAbortedError):
    """A peer sent more on a stream than its receive window allows (yamux then drops the connection)."""


class _StreamBuffer(bytearray):
    """A yamux stream's receive buffer that refuses to grow past any window a peer may use."""

    def extend(self, data) -> None:
        if len(self) + len(data) > STREAM_BUFFER_LIMIT:
            raise _FlowControlViolation(f"a peer sent {len(self) + len(data)} unread bytes on one stream")
        super().extend(data)


class _StreamBuffers(dict):
    def __init__(self, buffers: dict):
        super().__init__()
        for stream_id, buffer in buffers.items():
            self[stream_id] = buffer

    def __setitem__(self, stream_id, buffer) -> None:
        super().__setitem__(stream_id, buffer if isinstance(buffer, _StreamBuffer) else _StreamBuffer(buffer))


class _InboundConn:
    """The connection an inbound handler task set up, once it exists (see :func:`bound_connections`)."""

    def __init__(self):
        self.conn = None
        self.ready = trio.Event()


_INBOUND: contextvars.ContextVar[_InboundConn | None] = contextvars.ContextVar("swarm_inbound", default=None)


def bound_connections(network) -> None:
    """Make py-libp2p 0.8.1's inbound handlers end when their connection closes, and bound every
    connection's yamux stream buffers.

    Each inbound connection takes a slot of the swarm's limiter (250) and its handler task then
    waits for the whole swarm to finish, not for the connection: after 250 connections in its
    lifetime (every `swarm generate` is a new one) a server refused every peer. Here the handler
    runs beside a watcher that cancels it once the connection it registered closes, which frees
    the slot and the task."""
    handle, add_conn = network._do_handle_inbound_connection, network.add_conn

    async def registering_add_conn(muxed_conn, direction="unknown"):
        if isinstance(getattr(muxed_conn, "stream_buffers", None), dict):
            # py-libp2p's yamux only logs a warning when a peer ignores the receive window, and
            # keeps buffering (measured: +100 MiB/s of RSS from one stream): a stream's buffer
            # past the largest window ends that connection instead (an OSError in its reader)
            muxed_conn.stream_buffers = _StreamBuffers(muxed_conn.stream_buffers)
        conn = await add_conn(muxed_conn, direction)
        seen = _INBOUND.get()
        if seen is not None and seen.conn is None:
            seen.conn = conn
            seen.ready.set()
        return conn

    async def bounded_handle(read_write_closer, maddr, failure_event) -> None:
        seen = _InboundConn()
        _INBOUND.set(seen)
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                await seen.ready.wait()
                await seen.conn.event_closed.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await handle(read_write_closer, maddr, failure_event)
            nursery.cancel_scope.cancel()

    network.add_conn = registering_add_conn
    network._do_handle_inbound_connection = bounded_handle
