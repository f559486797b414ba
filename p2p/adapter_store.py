"""Adapters a server keeps for its clients' training passes, by content digest.

A client trains an adapter it owns (LoRA, deep prompts); every forward and backward of a step
needs that adapter's tensors on each server of the route. Sending them with every request would
cost the adapter's size per request, so a request names the adapter by the digest of its tensors
(:func:`~swarm.engine.adapters.adapter_digest` without a spec) and carries the tensors only when
the server does not keep them yet; an unknown digest gets an ``unknown_adapter`` reply and the
client sends the tensors. The server computes the digest of what it receives itself and refuses a
mismatch, so no peer can make a digest stand for other tensors than its content.

The spec (scale, dropout, seed) comes with every request and is not part of the digest: a client
may draw new dropout masks for every micro-batch without sending its tensors again.

Every peer is a stranger: kept adapters are bounded in bytes, in total and per peer, and evicted
first-in first-out; entries are keyed by (peer, digest), so one peer neither reads nor evicts
another's entries beyond the shared total.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from swarm.engine.adapters import AdapterSpec, adapter_digest, check_tensors
from swarm.engine.checkpoint import BlockRange
from swarm.p2p.wire import UNKNOWN_ADAPTER, Frame, WireError, named_tensors

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
DIGEST_IN_THREAD = 1 << 20  # adapters larger than this are hashed off the event loop


class UnknownAdapterError(WireError):
    """A request names an adapter by a digest that is not (or no longer) kept here: the client
    must send the tensors (answered with ``unknown_adapter``)."""

    def __init__(self, digest: str):
        super().__init__(f"adapter {digest[:12]}… is not kept here (evicted or never sent); send its tensors",
                         code=UNKNOWN_ADAPTER)


@dataclass(frozen=True)
class KeptAdapter:
    tensors: dict[str, torch.Tensor]
    nbytes: int


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def read_adapter_field(frame: Frame, base: int) -> tuple[str | None, AdapterSpec | None, dict[str, torch.Tensor] | None]:
    """The ``adapter`` field of an open/forward/backward ``frame`` and the tensors after its first
    ``base``: ``(digest, spec, tensors by name)``, with ``tensors`` None when the frame names the
    adapter by its digest alone, and ``(None, None, None)`` without an adapter. Raises
    :class:`WireError` for a malformed field (not a map, a digest that is not sha256 hex, tensors
    without distinct names) and ``ValueError`` for a bad spec."""
    field = frame.fields.get("adapter")
    extra = frame.tensors[base:]
    if field is None:
        if extra:
            raise WireError(f"a {frame.kind} frame's {len(extra)} extra tensor(s) need an adapter field naming them")
        return None, None, None
    if not isinstance(field, dict):
        raise WireError("the adapter field must be a map")
    digest, names = field.get("digest"), field.get("names")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise WireError("the adapter digest must be 64 lowercase hex digits (sha256)")
    spec = AdapterSpec.from_wire(field.get("spec"))
    if names is None:
        if extra:
            raise WireError(f"a {frame.kind} frame's {len(extra)} adapter tensor(s) need their names")
        return digest, spec, None
    return digest, spec, named_tensors(names, extra, frame.kind)


class AdapterStore:
    """Adapters by (peer, digest), at most ``total_bytes`` in all and ``peer_bytes`` per peer;
    adding one past a bound evicts the oldest entries first (the peer's own when over its share,
    anyone's when over the total). Used from the server's event loop; a lock makes each call
    atomic should another thread call it too."""

    def __init__(self, total_bytes: int, peer_bytes: int):
        self.total_bytes = total_bytes
        self.peer_bytes = min(peer_bytes, total_bytes)
        self._entries: OrderedDict[tuple[str, str], KeptAdapter] = OrderedDict()
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, peer: str, digest: str) -> KeptAdapter | None:
        with self._lock:
            return self._entries.get((peer, digest))

    def held(self, peer: str) -> int:
        """Bytes of adapters kept for ``peer``."""
        with self._lock:
            return self._held.get(peer, 0)

    def put(self, peer: str, digest: str, tensors: dict[str, torch.Tensor]) -> KeptAdapter:
        """Keep an adapter (``ValueError`` if it alone exceeds the per-peer bound)."""
        nbytes = tensor_bytes(tensors)
        if nbytes > self.peer_bytes:
            raise ValueError(f"adapter tensors of {nbytes} bytes exceed this server's bound of {self.peer_bytes} bytes per peer")
        kept = KeptAdapter(tensors, nbytes)
        with self._lock:
            self._drop((peer, digest))
            self._entries[(peer, digest)] = kept
            self._held[peer] = self._held.get(peer, 0) + nbytes
            self.bytes += nbytes
            while self._held[peer] > self.peer_bytes:
                self._drop(next(k for k in self._entries if k[0] == peer))
            while self.bytes > self.total_bytes:
                self._drop(next(iter(self._entries)))
        return kept

    def _drop(self, key: tuple[str, str]) -> None:
        kept = self._entries.pop(key, None)
        if kept is None:
            return
        self.bytes -= kept.nbytes
        left = self._held[key[0]] - kept.nbytes
        if left:
            self._held[key[0]] = left
        else:
            del self._held[key[0]]

    async def resolve(self, peer: str, frame: Frame, base: int, blocks: BlockRange) -> tuple[dict[str, torch.Tensor], AdapterSpec | None]:
        """The adapter a forward/backward ``frame`` asks for (its ``adapter`` field and the
        tensors after its first ``base``), checked against ``blocks``; ``({}, None)`` without one.

        Raises :class:`WireError` for a malformed field, :class:`UnknownAdapterError` for a digest
        without tensors that is not kept, ``ValueError`` (a bad request, naming the bound or the
        tensor) for tensors over the per-peer bound, tensors the blocks cannot apply, or a digest
        that is not the tensors' own."""
        digest, spec, tensors = read_adapter_field(frame, base)
        if digest is None:
            return {}, None
        if tensors is None:
            kept = self.get(peer, digest)
            if kept is None:
                raise UnknownAdapterError(digest)
            check_tensors(blocks, kept.tensors)  # kept for another range, maybe
            return kept.tensors, spec
        nbytes = tensor_bytes(tensors)
        if nbytes > self.peer_bytes:
            raise ValueError(
                f"adapter tensors of {nbytes} bytes exceed this server's bound of {self.peer_bytes} bytes per peer"
            )
        check_tensors(blocks, tensors)
        if nbytes > DIGEST_IN_THREAD:
            actual = await asyncio.to_thread(adapter_digest, tensors)
        else:
            actual = adapter_digest(tensors)
        if actual != digest:
            raise ValueError(f"adapter digest {digest[:12]}… is not that of the tensors sent ({actual[:12]}…)")
        self.put(peer, digest, tensors)
        return tensors, spec
