"""The KV cache of a process: one budget in tokens shared by every session.

A session asks for ``batch × max_length`` tokens when it opens and gets, for each of the blocks it
runs, a key and a value buffer of shape ``[batch, kv_heads, max_length, head_dim]``. Memory is taken
up front so a session that was admitted can never run out half-way through a generation; a session
that does not fit fails at once with :class:`CacheFullError` (so a client can go elsewhere), and
closing a session gives its tokens back.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch


_CLOSING = threading.Lock()  # a session may be closed from two threads at once (its server's loop and memory thread)


class CacheFullError(RuntimeError):
    """The process's KV budget cannot hold the session asked for."""


@dataclass(frozen=True)
class LayerKVShape:
    """What one block keeps per token: ``num_kv_heads`` keys and values of ``head_dim`` each."""

    num_kv_heads: int
    head_dim: int


class KVCacheBudget:
    """A per-process budget of cache tokens (``batch × max_length`` summed over open sessions),
    optionally bounded per owner too (a server gives each peer at most a share of the budget, so
    one peer cannot hold all of it).

    Thread-safe: sessions are opened and closed from whichever thread serves them.
    """

    def __init__(self, max_tokens: int):
        if max_tokens <= 0:
            raise ValueError(f"the KV cache budget must be positive, got {max_tokens} tokens")
        self.max_tokens = max_tokens
        self._used = 0
        self._by_owner: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def tokens_left(self) -> int:
        with self._lock:
            return self.max_tokens - self._used

    def used_by(self, owner: str) -> int:
        with self._lock:
            return self._by_owner.get(owner, 0)

    def allocate(
        self,
        *,
        batch: int,
        max_length: int,
        layers: Sequence[LayerKVShape],
        dtype: torch.dtype,
        device: torch.device | str | Sequence[torch.device] = "cpu",
        owner: str | None = None,
        owner_limit: int | None = None,
    ) -> SessionKV:
        """Reserve ``batch × max_length`` tokens and allocate the buffers for ``layers``.

        ``owner`` (a peer id) may hold at most ``owner_limit`` tokens across its sessions.
        Raises :class:`CacheFullError` when the budget (or the owner's share) cannot hold them;
        nothing is taken then.
        """
        if batch <= 0 or max_length <= 0:
            raise ValueError(f"a session needs batch ≥ 1 and max_length ≥ 1, got {batch} × {max_length}")
        tokens = batch * max_length
        with self._lock:
            left = self.max_tokens - self._used
            if tokens > left:
                raise CacheFullError(
                    f"KV cache full: the session needs {tokens} tokens (batch {batch} × max_length "
                    f"{max_length}) but only {left} of {self.max_tokens} are free; close other "
                    f"sessions, ask for a shorter max_length, or raise --cache-tokens"
                )
            mine = self._by_owner.get(owner, 0) if owner is not None else 0
            if owner_limit is not None and mine + tokens > owner_limit:
                raise CacheFullError(
                    f"KV cache share used up: the session needs {tokens} tokens (batch {batch} × max_length "
                    f"{max_length}) and your open sessions here hold {mine} of the {owner_limit} tokens "
                    f"one peer may hold; close sessions or ask for a shorter max_length"
                )
            self._used += tokens
            if owner is not None:
                self._by_owner[owner] = mine + tokens
        try:
            return SessionKV(
                self, batch=batch, max_length=max_length, layers=layers, dtype=dtype, device=device, owner=owner
            )
        except BaseException:
            self._release(tokens, owner)
            raise

    def _release(self, tokens: int, owner: str | None = None) -> None:
        with self._lock:
            self._used -= tokens
            assert self._used >= 0, "KV budget released more tokens than it gave"
            if owner is not None:
                left = self._by_owner.get(owner, 0) - tokens
                if left > 0:
                    self._by_owner[owner] = left
                else:
                    self._by_owner.pop(owner, None)


class SessionKV:
    """The keys and values of one session for a run of blocks, plus how many positions are filled.

    ``keys[i]`` / ``values[i]``: ``[batch, kv_heads, max_length, head_dim]`` for the i-th block of
    the run, on ``device`` (one for all blocks, or one per block). The blocks write positions ``[length, length + seq)`` and then the caller advances
    ``length`` once for the whole run (see :meth:`advance`).
    """

    def __init__(
        self,
        budget: KVCacheBudget | None,
        *,
        batch: int,
        max_length: int,
        layers: Sequence[LayerKVShape],
        dtype: torch.dtype,
        device: torch.device | str | Sequence[torch.device] = "cpu",
        owner: str | None = None,
    ):
        self._budget, self._owner = budget, owner
        self.batch = batch
        self.max_length = max_length
        self.length = 0
        # zeros: decoding attends over whole buckets of positions, the unwritten ones included
        try:
            devices = list(device) if isinstance(device, (list, tuple)) else [device] * len(layers)
            self.keys = [torch.zeros(batch, s.num_kv_heads, max_length, s.head_dim, dtype=dtype, device=d)
                         for s, d in zip(layers, devices, strict=True)]
            self.values = [torch.zeros_like(k) for k in self.keys]
        except (RuntimeError, MemoryError) as exc:  # the allocator's "can't allocate memory" (a GPU's: OutOfMemoryError)
            raise CacheFullError(
                f"cannot allocate a KV cache of batch {batch} × {max_length} positions for {len(layers)} blocks "
                f"({str(exc).splitlines()[0]}); ask for fewer positions (e.g. a smaller --max-new-tokens)"
            ) from None
        self._closed = False

    @property
    def tokens(self) -> int:
        return self.batch * self.max_length

    def check_room(self, seq_len: int) -> None:
        """Raise ``ValueError`` if ``seq_len`` more positions do not fit in ``max_length``."""
        if self._closed:
            raise RuntimeError("this KV cache session is closed")
        if self.length + seq_len > self.max_length:
            raise ValueError(
                f"the session was opened with max_length {self.max_length}; {self.length} positions are "
                f"cached and {seq_len} more do not fit; open the session with a larger max_length"
            )

    def rewind(self, length: int) -> None:
        """Forget the positions from ``length`` on."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a cache of {self.length} positions to {length}")
        for buffers in (self.keys, self.values):
            for buf in buffers:
                buf[:, :, length : self.length] = 0  # decoding reads padding positions: keep them zero
        self.length = length

    def advance(self, seq_len: int) -> None:
        self.length += seq_len

    def reorder(self, hypo_ids: torch.Tensor) -> None:
        """Reorder batch rows (beam search): row ``i`` becomes old row ``hypo_ids[i]``."""
        if hypo_ids.shape != (self.batch,):
            raise ValueError(f"hypo_ids must have shape [{self.batch}], got {list(hypo_ids.shape)}")
        n = self.length
        for buffers in (self.keys, self.values):
            for buf in buffers:
                buf[:, :, :n] = buf[:, :, :n].index_select(0, hypo_ids.to(buf.device))

    def close(self) -> None:
        """Give the tokens back to the budget (idempotent, thread-safe) and drop the buffers."""
        with _CLOSING:
            if self._closed:
                return
            self._closed = True
        self.keys, self.values = [], []
        if self._budget is not None:
            self._budget._release(self.tokens, self._owner)

    def __enter__(self) -> SessionKV:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
