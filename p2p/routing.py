"""Decisions over a snapshot of the peer table: which blocks a new server takes, which chain a
client uses. Pure functions, no network: tested with tables of cases."""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass

from swarm.p2p.balance import Load, best_start
from swarm.p2p.table import ServerInfo, gaps
from swarm.p2p.wire import PeerId

DEFAULT_RTT = 0.15  # seconds, for a server never pinged
HOP_OVERHEAD = 0.002  # seconds of serialisation and bookkeeping per hop (measured on loopback)
# of one session's step, per other session in a batched pass (bench_invariance, default model: 0.07 in bfloat16, 0.3 in float32)
BATCH_ROW_COST = 0.1
NO_CACHE_PENALTY = 10.0  # seconds: use a server without cache room only when nothing else serves


class NoRouteError(RuntimeError):
    """Some blocks are served by nobody (``missing``: the uncovered ranges)."""

    def __init__(self, missing: list[tuple[int, int]], num_blocks: int):
        self.missing = missing
        ranges = ", ".join(f"{a}:{b}" for a, b in missing)
        super().__init__(
            f"no server holds block(s) {ranges} of this {num_blocks}-block model; start one with "
            f"`swarm serve --blocks {missing[0][0]}:{missing[0][1]} --initial-peers ...` (or --blocks auto)"
        )


class QuantizedOnlyError(NoRouteError):
    """A client asked for full precision, but only quantized servers hold some blocks."""

    def __init__(self, missing: list[tuple[int, int]], num_blocks: int, holders: Mapping[str, str]):
        self.missing = missing
        ranges = ", ".join(f"{a}:{b}" for a, b in missing)
        quants = "/".join(sorted(set(holders.values()))) or "quantized"
        RuntimeError.__init__(
            self,
            f"--no-quant-servers: block(s) {ranges} of this {num_blocks}-block model are served only by {quants} "
            f"servers; drop --no-quant-servers or start a full-precision one with "
            f"`swarm serve --blocks {missing[0][0]}:{missing[0][1]} --quant none --initial-peers ...`",
        )


@dataclass(frozen=True)
class Span:
    """Blocks ``[start, end)`` to run on ``peer_id``."""

    peer_id: PeerId
    start: int
    end: int


def choose_blocks(servers: Mapping[PeerId, ServerInfo], num_blocks: int, count: int) -> int:
    """Start of the ``count`` blocks where the swarm is weakest: the window whose per-block total
    throughputs (online and joining servers), sorted ascending, are lexicographically smallest (the
    weakest block first; ties go to the smallest start). An empty swarm gives 0. The rule itself is
    :func:`swarm.p2p.balance.best_start`, shared with rebalancing and the swarm simulator."""
    # servers still loading count too, or two servers starting together would take the same range
    return best_start(Load.from_servers(servers, num_blocks).totals, count)


def load_factor(s: ServerInfo) -> float:
    """How much longer a step takes on ``s`` than on it idle, from its announcement: its open
    sessions share its passes (``max_batch`` at a time; a pass of k sessions costs about
    ``1 + (k − 1) · BATCH_ROW_COST`` of one alone), and the work queued now goes first. 1 for an
    idle server."""
    per_pass = max(s.max_batch, 1)
    passes = 1 + s.sessions // per_pass  # rounds of passes our step shares the server with
    others = min(s.sessions, per_pass - 1)  # other sessions in the pass ours rides in
    return passes * (1 + others * BATCH_ROW_COST) + s.queued / per_pass


def find_chain(
    servers: Mapping[PeerId, ServerInfo],
    num_blocks: int,
    *,
    start: int = 0,
    end: int | None = None,
    rtts: Mapping[PeerId, float] | None = None,
    banned: frozenset[PeerId] | set[PeerId] = frozenset(),
    cache_tokens_needed: int = 0,
    full_precision: bool = False,
) -> list[Span]:
    """The chain of least expected per-token latency covering blocks ``[start, end)``.

    Shortest path over block boundaries: an edge ``a → b`` on server ``s`` (``s.start ≤ a < b ≤
    s.end``) costs ``rtt(s) + overhead + (b − a) / block_rate(s)``, plus a penalty when ``s`` has
    no cache room. A server announces the tokens/s it adds to an average chain, whose requests
    use (n + 1) / 2 of its n blocks (``engine.throughput``): its rate per block is its compute
    part times (n + 1) / 2 (the throughput where only that was given), and its network part adds
    1 / network per hop. The compute part grows with the server's announced load
    (:func:`load_factor`), so concurrent clients spread over the servers of a range instead of
    crowding onto the fastest. ``banned`` peers are skipped unless a block has no other server. Raises
    :class:`NoRouteError` naming the uncovered ranges. With ``full_precision`` only servers with
    unquantized weights are used (:class:`QuantizedOnlyError` when quantized ones alone hold some
    of the blocks).
    """
    end = num_blocks if end is None else end
    rtts = rtts or {}
    live = {p: s for p, s in servers.items() if s.state == "online"}
    if full_precision:
        full = {p: s for p, s in live.items() if s.quant == "none"}
        short = [(max(a, start), min(b, end)) for a, b in gaps(full, num_blocks) if a < end and b > start]
        covered = not any(a < end and b > start for a, b in gaps(live, num_blocks))
        if short and covered:
            holders = {p: s.quant for p, s in live.items() if s.quant != "none"
                       and any(s.start < b and a < s.end for a, b in short)}
            raise QuantizedOnlyError(short, num_blocks, holders)
        live = full
    candidates = {p: s for p, s in live.items() if p not in banned}
    for a, b in gaps(candidates, num_blocks):
        if a < end and b > start:  # banning would open a gap here: allow banned servers again
            candidates = live
            break
    missing = [(max(a, start), min(b, end)) for a, b in gaps(candidates, num_blocks) if a < end and b > start]
    if missing:
        raise NoRouteError(missing, num_blocks)

    def hop_cost(s: ServerInfo, blocks: int) -> float:
        measured = s.throughput_source in ("measured", "cached") and s.compute > 0
        block_rate = max(s.compute if measured else s.throughput, 1e-6) * (s.end - s.start + 1) / 2
        cost = rtts.get(s.peer_id, DEFAULT_RTT) + HOP_OVERHEAD + blocks / block_rate * load_factor(s)
        if measured and s.network > 0:
            cost += 1 / s.network  # the hidden state crossing the link, once per hop
        if cache_tokens_needed and s.cache_tokens_left < cache_tokens_needed:
            cost += NO_CACHE_PENALTY
        return cost

    best = {start: 0.0}
    previous: dict[int, tuple[int, Span]] = {}
    queue = [(0.0, start)]
    ordered = [candidates[p] for p in sorted(candidates)]
    while queue:
        cost, a = heapq.heappop(queue)
        if a == end:
            break
        if cost > best.get(a, float("inf")):
            continue
        for s in ordered:
            if not s.start <= a < s.end:
                continue
            for b in range(a + 1, min(s.end, end) + 1):
                new = cost + hop_cost(s, b - a)
                if new < best.get(b, float("inf")):
                    best[b] = new
                    previous[b] = (a, Span(s.peer_id, a, b))
                    heapq.heappush(queue, (new, b))
    if end not in previous and end != start:
        raise NoRouteError([(start, end)], num_blocks)
    chain, b = [], end
    while b != start:
        a, span = previous[b]
        chain.append(span)
        b = a
    return chain[::-1]
