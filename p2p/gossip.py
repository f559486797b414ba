"""Gossipsub as the host uses it: roomier outbound queues, messages handed straight to the host,
and :class:`Subscription`, a topic's messages on the asyncio side (see :mod:`swarm.p2p.host`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from libp2p.pubsub.pubsub import Pubsub

from swarm.p2p.bridge import P2PError, P2PTimeoutError

if TYPE_CHECKING:
    from swarm.p2p.host import Host

OUTBOUND_QUEUE = 4096  # RPCs queued per pubsub peer before drops (py-libp2p: 32)


class _RoomyQueues(dict):
    """``Pubsub.peer_queues`` whose new per-peer outbound queues hold OUTBOUND_QUEUE RPCs, not 32:
    a burst of announcements would otherwise be dropped silently."""

    def __setitem__(self, peer_id, queue) -> None:
        queue._queue.max_size = OUTBOUND_QUEUE
        super().__setitem__(peer_id, queue)


class _Pubsub(Pubsub):
    """Pubsub that hands each received message straight to ``on_message`` (on the trio thread),
    instead of a 32-slot channel per topic that drops when full."""

    def __init__(self, host, router, on_message: Callable[[object], None]):
        super().__init__(host, router)
        self.peer_queues = _RoomyQueues()
        self._on_message = on_message

    def notify_subscriptions(self, publish_message) -> None:
        if any(topic in self.topic_ids for topic in publish_message.topicIDs):
            self._on_message(publish_message)


class Subscription:
    """Messages on one gossipsub topic, as ``(sender peer id, data)``; an async iterator.

    Messages this host published itself are not delivered here. Up to ``limit`` (default
    SUBSCRIPTION_QUEUE) messages queue until read; beyond that new ones are dropped (gossip is best effort). Iteration ends when the subscription is cancelled or the host closes (unread
    messages are then dropped).
    """

    def __init__(self, host: Host, topic: str, limit: int | None = None):
        self.topic, self.limit = topic, limit
        self._host = host
        self._queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        self._closed = False

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> tuple[str, bytes]:
        try:
            return await self.get()
        except _SubscriptionEnded:
            raise StopAsyncIteration from None

    async def get(self, timeout: float | None = None) -> tuple[str, bytes]:
        """The next message. P2PTimeoutError after ``timeout`` seconds; P2PError once cancelled."""
        if timeout is None:
            item = await self._queue.get()
        else:
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout)
            except asyncio.TimeoutError:
                raise P2PTimeoutError(f"no message on {self.topic!r} within {timeout:g} s") from None
        if item is None:
            self._queue.put_nowait(None)  # wake every other reader too
            raise _SubscriptionEnded(f"subscription to {self.topic!r} is cancelled")
        return item

    async def cancel(self) -> None:
        """Stop receiving; the topic is left when its last subscription is cancelled."""
        if not self._closed:
            self._end()
            await self._host._unsubscribe(self)

    def _end(self) -> None:  # unread messages are dropped; readers wake up to P2PError
        self._closed = True
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)


class _SubscriptionEnded(P2PError):
    pass


