"""Bounds on the memory one peer can make this process hold with the frames it sends.

Any peer that passes the Noise handshake may announce a frame of up to the reader's maximum and
then send it slowly, or most of it and vanish, on as many streams as it likes. So every byte of a
frame being received (and of a received frame not yet dealt with) is counted against a
:class:`FrameBudget`, per peer and in total, as it arrives (a megabyte ahead of it), until the
frame is done with; bytes that do not fit end the frame's stream (:class:`FrameBudgetError`).
A length prefix alone holds only that first megabyte, so announcing huge frames costs the
announcer the bytes it must really send.
"""

from __future__ import annotations

import threading

from swarm.p2p.bridge import P2PError


class FrameBudgetError(P2PError):
    """A frame does not fit in what its sender, or all peers together, may have in flight now."""


class Grant:
    """Bytes taken from a :class:`FrameBudget`; :meth:`release` gives them back (idempotent).
    Release it when the frame's data is no longer held: after its reply, or when it is dropped."""

    __slots__ = ("_budget", "nbytes", "peer")

    def __init__(self, budget: FrameBudget | None, peer: str, nbytes: int):
        self._budget, self.peer, self.nbytes = budget, peer, nbytes

    def grow(self, nbytes: int) -> None:
        """Take ``nbytes`` more for the same frame, or raise :class:`FrameBudgetError`."""
        if self._budget is None:
            raise FrameBudgetError("this grant was released")
        self._budget._reserve(self.peer, nbytes)
        self.nbytes += nbytes

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._give_back(self.peer, self.nbytes)


class FrameBudget:
    """Bytes of frames in flight, bounded per peer (``per_peer``) and in total (``total``).
    Thread-safe: frames are read on the libp2p thread and released on the asyncio one."""

    def __init__(self, total: int, per_peer: int):
        if total <= 0 or per_peer <= 0:
            raise ValueError(f"frame budgets must be positive, got total {total} and per peer {per_peer}")
        self.total, self.per_peer = total, per_peer
        self._used = 0
        self._by_peer: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, peer: str, nbytes: int) -> Grant:
        """Reserve ``nbytes`` for a frame from ``peer``, or raise :class:`FrameBudgetError`."""
        self._reserve(peer, nbytes)
        return Grant(self, peer, nbytes)

    def _reserve(self, peer: str, nbytes: int) -> None:
        with self._lock:
            mine = self._by_peer.get(peer, 0)
            if mine + nbytes > self.per_peer:
                raise FrameBudgetError(
                    f"a frame of {nbytes} bytes would bring this peer's frames in flight to {mine + nbytes} "
                    f"bytes; at most {self.per_peer} are allowed per peer"
                )
            if self._used + nbytes > self.total:
                raise FrameBudgetError(
                    f"busy: {self._used} bytes of frames from all peers are in flight; a frame of {nbytes} "
                    f"bytes does not fit in {self.total}"
                )
            self._used += nbytes
            self._by_peer[peer] = mine + nbytes

    def used(self, peer: str | None = None) -> int:
        with self._lock:
            return self._used if peer is None else self._by_peer.get(peer, 0)

    def _give_back(self, peer: str, nbytes: int) -> None:
        with self._lock:
            self._used -= nbytes
            left = self._by_peer.get(peer, 0) - nbytes
            if left > 0:
                self._by_peer[peer] = left
            else:
                self._by_peer.pop(peer, None)
