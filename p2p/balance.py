"""Load balancing over a snapshot of the peer table: where the swarm is weakest, whether a server
should move there, and how good any placement could be. Pure functions, no network.

The swarm's *bottleneck* is the smallest per-block total throughput (online and joining servers):
a chain can go no faster than its weakest block. Servers pick the window whose per-block totals,
sorted ascending, are lexicographically smallest (the paper's rule, :func:`best_start`), and every
balance period each asks :func:`should_move` whether moving would leave fewer blocks unserved or,
with none unserved, raise the bottleneck enough. A server never leaves blocks only it serves
(the paper's "if removing yourself opens a gap, stay"), but unlike the paper's rule it may still
move to a window that keeps them all: otherwise a gap next to such a server can stay open for
good although the servers could close it.

Why it cannot oscillate: a server only ever moves to a window that is *strictly* weaker (in that
lexicographic order, its own contribution removed) than the one it holds; ties stay (the windows
keeping its lone blocks include its own, so this holds for them too). Such a move
strictly raises the sorted vector of all per-block totals in lexicographic order (the blocks it
leaves end up above the weakest block it joins), and a finite set of placements has no infinite
strictly rising chain, so on a common, current view two servers can never swap back and forth.
The acceptance test (fewer gaps, or the ``balance_quality`` threshold) only removes moves, so it
keeps the property.
What it cannot rule out is two servers deciding at the same instant on the same stale view; the
random 0–2 × period check interval is what makes that rare.

Throughputs are summed in integer units of 2⁻²⁰ tokens/s (:data:`UNIT`), so removing a server
and adding it back gives exactly the totals before: "removing myself opens a gap" is an exact test
and a simulator can keep totals incrementally without drift.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Hashable, Mapping, Sequence

from swarm.p2p.table import ServerInfo
from swarm.p2p.wire import PeerId

UNIT = 2.0**-20  # tokens/s of one integer throughput unit
STATES = ("online", "joining")  # servers that count: joining ones too, or two starters would take one range
MAX_ROUNDS = 3  # rounds of the other servers' reactions simulated before judging a move


def units(throughput: float) -> int:
    """A throughput in integer units (:data:`UNIT`), so sums are exact."""
    return round(throughput / UNIT)


class Load:
    """Per-block totals of a set of spans ``key → (start, count, units)``, kept exact by
    :meth:`add`, :meth:`remove` and :meth:`move` (O(count) each), plus the capacity by window size
    that :meth:`bound` needs. A simulator keeps one and updates it per event; the snapshot functions
    below build one per call."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.totals = [0] * num_blocks
        self.spans: dict[Hashable, tuple[int, int, int]] = {}
        self._by_count = [0] * (num_blocks + 1)  # units of throughput held by windows of each size
        self._bound: float | None = None

    @classmethod
    def from_servers(cls, servers: Mapping[PeerId, ServerInfo], num_blocks: int, *, by_count: bool = False) -> Load:
        """The online and joining servers of a snapshot (each counted as one unit with
        ``by_count``: the naive rule). Ranges are clipped to the model's blocks."""
        load = cls(num_blocks)
        for peer_id in sorted(servers):
            s = servers[peer_id]
            if s.state in STATES and s.start < num_blocks:
                end = min(s.end, num_blocks)
                load.add(peer_id, s.start, end - s.start, 1 if by_count else units(s.carries))
        return load

    def add(self, key: Hashable, start: int, count: int, weight: int) -> None:
        totals = self.totals
        for b in range(start, start + count):
            totals[b] += weight
        self.spans[key] = (start, count, weight)
        self._by_count[count] += weight
        self._bound = None

    def remove(self, key: Hashable) -> tuple[int, int, int]:
        start, count, weight = span = self.spans.pop(key)
        totals = self.totals
        for b in range(start, start + count):
            totals[b] -= weight
        self._by_count[count] -= weight
        self._bound = None
        return span

    def move(self, key: Hashable, start: int) -> None:
        kept = self._bound  # same throughputs and sizes: same bound
        _, count, weight = self.remove(key)
        self.add(key, start, count, weight)
        self._bound = kept

    def copy(self) -> Load:
        other = Load(self.num_blocks)
        other.totals, other.spans, other._by_count = list(self.totals), dict(self.spans), list(self._by_count)
        other._bound = self._bound
        return other

    def bottleneck(self) -> int:
        return min(self.totals)

    def bound(self) -> float:
        """An upper bound, in units, on the bottleneck of ANY placement of these spans (same
        throughputs and window sizes), cached until the set of spans changes (moves keep it).

        Evenly spread, every block would get Σ tᵢ·nᵢ / B (the mean, which no minimum exceeds).
        Contiguity caps it further: take k blocks spaced d apart (0, d, 2d, …; k = ⌈B/d⌉). A
        window of nᵢ consecutive blocks holds at most min(k, ⌈nᵢ/d⌉) of them, so those k blocks
        get at most Σ tᵢ·min(k, ⌈nᵢ/d⌉) in total and the weakest of them at most that ÷ k. The
        bound is the least of these over d = 1 … B (d = 1 is the even spread; of the spacings giving
        the same k only the widest matters, so about 2√B of them are tried). Example: servers
        that each hold 60 of 80 blocks can never cover both block 0 and block 61 (d = 61, k = 2),
        so the bottleneck is at most half their throughput, not the 3/4 the mean suggests.
        """
        if self._bound is None:
            sizes = [(n, w) for n, w in enumerate(self._by_count) if w]
            self._bound = min(
                (sum(w * min(k, -(-n // d)) for n, w in sizes) / k for d, k in _spacings(self.num_blocks)),
                default=0.0,
            ) if sizes else 0.0
        return self._bound


@functools.cache
def _spacings(num_blocks: int) -> tuple[tuple[int, int], ...]:
    """(d, k): for each count k = ⌈B/d⌉ of blocks spaced d apart, the widest such spacing d."""
    widest: dict[int, int] = {}
    for d in range(1, num_blocks + 1):
        widest[-(-num_blocks // d)] = d
    return tuple((d, k) for k, d in widest.items())


def best_start(totals: Sequence[float], count: int, prefer: int | None = None,
               within: tuple[int, int] | None = None) -> int:
    """The paper's rule: the start of the ``count``-block window whose totals, sorted ascending,
    are lexicographically smallest (the weakest block first). Ties go to ``prefer`` (a server's
    current start: staying costs nothing) when it is among them, else to the smallest start.
    ``within=(lo, hi)`` only considers starts lo … hi.

    Only windows holding a weakest block can win (the first key is the window's minimum), so only
    those are sorted: O(count²) for a unique weakest block instead of O(B·count)."""
    B = len(totals)
    count = min(count, B)
    last = B - count
    if within is not None:
        candidates = set(range(max(0, within[0]), min(last, within[1]) + 1))
    else:
        low = min(totals)
        candidates = set()
        for b, t in enumerate(totals):
            if t == low:
                candidates.update(range(max(0, b - count + 1), min(b, last) + 1))
    best, best_key = -1, None
    for s in sorted(candidates):
        key = sorted(totals[s : s + count])
        if best_key is None or key < best_key:
            best, best_key = s, key
    if prefer is not None and prefer in candidates and sorted(totals[prefer : prefer + count]) == best_key:
        return prefer
    return best


def best_response(load: Load, key: Hashable) -> int:
    """Where the server ``key`` of ``load`` would go now: :func:`best_start` of the others'
    totals, ties staying put. Blocks of its own that nobody else serves (leaving would open a
    gap there) must stay inside the new window: then only windows holding all of them count
    (often none but the current one). ``load`` is left as it was."""
    kept = load._bound
    start, count, weight = load.remove(key)
    try:
        alone = [b for b in range(start, start + count) if load.totals[b] <= 0]
        if not alone:
            return best_start(load.totals, count, prefer=start)
        return best_start(load.totals, count, prefer=start, within=(alone[-1] - count + 1, alone[0]))
    finally:
        load.add(key, start, count, weight)
        load._bound = kept


def react(load: Load, max_rounds: int = MAX_ROUNDS) -> int:
    """Let every server of ``load`` in turn (sorted by key, so every peer simulates the same) move
    to its :func:`best_response`, until a round moves nobody or after ``max_rounds`` rounds.
    Mutates ``load``; returns the number of moves. Each move strictly raises the sorted totals, so
    this terminates even without the round bound, which only caps the cost."""
    moves = 0
    order = sorted(load.spans)
    for _ in range(max_rounds):
        moved = 0
        for key in order:
            new = best_response(load, key)
            if new != load.spans[key][0]:
                load.move(key, new)
                moved += 1
        moves += moved
        if not moved:
            break
    return moves


def gaps(load: Load) -> int:
    """Blocks nobody serves."""
    return sum(1 for t in load.totals if t <= 0)


def plan_move(load: Load, key: Hashable, balance_quality: float, max_rounds: int = MAX_ROUNDS) -> int | None:
    """The new start of server ``key`` if it should move, else None; ``load`` is left as it was.

    Moves only when (1) a strictly weaker window exists (ties stay) that keeps every block only
    this server holds (:func:`best_response`), and (2) after simulating the move and the others'
    reactions (:func:`react`) the swarm is better: fewer blocks unserved, or as few (none) and a
    bottleneck larger than the current one by more than a factor ``1 / balance_quality``. While
    gaps remain the bottleneck is 0 whatever happens, so closing one gap of several counts by
    itself. A ``balance_quality`` of 0 never moves. Step (2) costs O(servers · rounds · count²),
    so it runs only when it could succeed (gaps, or a current bottleneck below
    ``balance_quality`` × :meth:`Load.bound`): in a balanced swarm a check is O(B). Raises
    ``ValueError`` for a quality outside [0, 1]."""
    if not 0 <= balance_quality <= 1:
        raise ValueError(f"--balance-quality must be between 0 and 1, got {balance_quality}")
    if balance_quality == 0 or key not in load.spans:
        return None
    current, holes = load.bottleneck(), gaps(load)
    if not holes and current >= balance_quality * load.bound() * (1 + 1e-9):  # no placement could gain enough
        return None
    new = best_response(load, key)
    if new == load.spans[key][0]:
        return None
    future = load.copy()
    future.move(key, new)
    react(future, max_rounds)
    future_holes = gaps(future)
    if future_holes != holes:
        return new if future_holes < holes else None
    return new if future.bottleneck() * balance_quality > current else None


# ---- the same decisions over a snapshot of the peer table ----------------------------------------


def block_throughputs(servers: Mapping[PeerId, ServerInfo], num_blocks: int) -> list[float]:
    """Total throughput (tokens/s) of online and joining servers per block; 0 marks a gap."""
    return [t * UNIT for t in Load.from_servers(servers, num_blocks).totals]


def bottleneck(servers: Mapping[PeerId, ServerInfo], num_blocks: int) -> float:
    """The weakest block's total throughput: what a chain through the whole model can get at most."""
    return Load.from_servers(servers, num_blocks).bottleneck() * UNIT


def bottleneck_bound(servers: Mapping[PeerId, ServerInfo], num_blocks: int) -> float:
    """An upper bound on the bottleneck of any placement of these servers (see :meth:`Load.bound`)."""
    return Load.from_servers(servers, num_blocks).bound() * UNIT


def should_move(
    servers: Mapping[PeerId, ServerInfo], me: PeerId, num_blocks: int, balance_quality: float,
    max_rounds: int = MAX_ROUNDS,
) -> int | None:
    """The start ``me`` should move to, or None to stay (see :func:`plan_move`). A server whose
    own announcement is not in the snapshot yet stays. Raises ``ValueError`` for a quality
    outside [0, 1]."""
    return plan_move(Load.from_servers(servers, num_blocks), me, balance_quality, max_rounds)


def choose_blocks_naive(servers: Mapping[PeerId, ServerInfo], num_blocks: int, count: int) -> int:
    """The rule before throughputs were compared: the window least covered by server COUNT
    (the same lexicographic order, each server weighing one). For comparison in the simulator."""
    return best_start(Load.from_servers(servers, num_blocks, by_count=True).totals, count)


def choose_blocks_random(num_blocks: int, count: int, rng: random.Random) -> int:
    """A uniformly random start: the baseline that knows nothing of the swarm."""
    return rng.randrange(num_blocks - min(count, num_blocks) + 1)
