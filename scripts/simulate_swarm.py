"""Simulate a swarm of N servers on a B-block model to compare block placement rules.

The decisions are the real ones from ``swarm.p2p.balance`` (``best_start``, ``plan_move``), fed an
incrementally kept :class:`~swarm.p2p.balance.Load` instead of a peer-table snapshot (the snapshot
functions build the same Load), so a simulated day of 1,000 servers takes about a minute.

The swarm: servers arrive (a first cohort within ``--join-window``, then Poisson arrivals that keep
about N alive) and live an exponential time (mean ``--lifetime-h``); throughputs are log-normal
with a 5th–95th percentile ratio of ``--spread``; each holds a log-normal number of blocks (median
B/5, its memory). What servers see (the view) lags the truth: announcements arrive after
``--announce-delay`` s, and a server that crashes (``--crash-fraction``) stays in the view until it
expires (``--expiry`` s) while one that leaves cleanly announces offline. ``--shock-h H`` crashes, at hour H, every server holding the middle block (a
correlated failure that leaves a gap for the others to close). A server loads its blocks
for ``--load-s-per-block`` s per block before it serves; a moving one keeps serving its old range
until the new one is loaded.

Rules: ``paper`` (the lexicographic weakest window by throughput at arrival, then a rebalance check
every random 0–2 × ``--balance-period``), ``naive`` (least covered by server count, never moves:
the behaviour before throughputs were compared) and ``random`` (uniform start, never moves).

Reported per rule, from the truth: the bottleneck (least per-block throughput of online servers) ÷
the upper bound of :meth:`Load.bound` (median over samples after ``--warmup-h``), moves per server
per hour (after warm-up), and the longest time a block stayed uncovered after it had been covered.

    python scripts/simulate_swarm.py                  # 1,000 servers, 80 blocks, one day
    python scripts/simulate_swarm.py --json           # [{"rule", "bottleneck_ratio_median", ...}]
    python scripts/simulate_swarm.py --plot out.png   # needs the `plot` extra (matplotlib)
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

from swarm.p2p.balance import Load, best_start, choose_blocks_random, plan_move, units

RULES = ("paper", "naive", "random")
Z95 = 1.6449  # the 95th percentile of a standard normal


@dataclass(frozen=True)
class Params:
    servers: int = 1000
    blocks: int = 80
    hours: float = 24.0
    lifetime_h: float = 2.0
    spread: float = 30.0
    join_window: float = 600.0
    announce_delay: float = 2.0
    expiry: float = 15.0
    crash_fraction: float = 0.25
    load_s_per_block: float = 0.5
    balance_period: float = 60.0
    balance_quality: float = 0.75
    sample_s: float = 60.0
    warmup_h: float = 1.0
    shock_h: float = 0.0  # when > 0: at this hour every server announcing the middle block crashes at once
    seed: int = 0


@dataclass(frozen=True)
class Peer:
    arrive: float
    depart: float
    throughput: float
    blocks: int
    crash: bool


@dataclass
class Result:
    rule: str
    times: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    moves: int = 0
    server_seconds: float = 0.0  # alive server × seconds after warm-up (for moves per server hour)
    max_gap_s: float = 0.0
    gaps: int = 0
    wall_s: float = 0.0

    def summary(self, p: Params) -> dict:
        steady = [r for t, r in zip(self.times, self.ratios) if t >= p.warmup_h * 3600]
        return {
            "rule": self.rule,
            "bottleneck_ratio_median": round(statistics.median(steady), 4) if steady else None,
            "moves_per_server_hour": round(self.moves / (self.server_seconds / 3600), 4) if self.server_seconds else 0.0,
            "max_gap_s": round(self.max_gap_s, 1),
        }


def population(p: Params) -> list[Peer]:
    """The same servers for every rule: a first cohort of N, then arrivals at rate N / lifetime."""
    rng = random.Random(p.seed)
    sigma = math.log(p.spread) / (2 * Z95)
    lifetime, end = p.lifetime_h * 3600, p.hours * 3600
    arrivals = [rng.uniform(0, p.join_window) for _ in range(p.servers)]
    t = p.join_window
    while True:
        t += rng.expovariate(p.servers / lifetime)
        if t >= end:
            break
        arrivals.append(t)
    return [
        Peer(a, a + rng.expovariate(1 / lifetime), rng.lognormvariate(0, sigma),
             max(1, min(p.blocks, round(rng.lognormvariate(math.log(p.blocks / 5), 0.5)))), rng.random() < p.crash_fraction)
        for a in sorted(arrivals)
    ]


def simulate(rule: str, peers: list[Peer], p: Params) -> Result:
    """Run one rule over the population; events are processed in time order (ties in push order)."""
    rng = random.Random(p.seed + 1)
    res, end, warmup = Result(rule), p.hours * 3600, p.warmup_h * 3600
    view = Load(p.blocks)  # what servers see: throughput units (naive: one per server)
    truth = Load(p.blocks)  # online servers as they are
    gap_since: dict[int, float] = {}  # uncovered blocks (that had been covered) → since when
    start_of: dict[int, int] = {}  # each alive server's announced start
    moving: set[int] = set()
    generation: dict[int, int] = {}  # bumps per move, so a stale "loaded" event is ignored
    alive: set[int] = set()
    events: list[tuple[float, int, str, int, int]] = []
    seq = 0

    def push(t: float, kind: str, sid: int, arg: int = 0) -> None:
        nonlocal seq
        if t <= end:
            heapq.heappush(events, (t, seq, kind, sid, arg))
            seq += 1

    def truth_remove(sid: int, now: float) -> None:
        start, count, _ = truth.remove(sid)
        for b in range(start, start + count):
            if truth.totals[b] <= 0 and b not in gap_since:
                gap_since[b] = now

    def truth_add(sid: int, start: int, count: int, now: float) -> None:
        truth.add(sid, start, count, units(peers[sid].throughput))
        for b in range(start, start + count):
            if b in gap_since and truth.totals[b] > 0:
                res.max_gap_s = max(res.max_gap_s, now - gap_since.pop(b))
                res.gaps += 1

    def check_delay() -> float:
        return rng.uniform(0, 2 * p.balance_period)

    for sid, peer in enumerate(peers):
        push(peer.arrive, "arrive", sid)
    t = 0.0
    while t <= end:
        push(t, "sample", -1)
        t += p.sample_s
    if p.shock_h > 0:
        push(p.shock_h * 3600, "shock", -1)

    last = 0.0
    while events:
        now, _, kind, sid, arg = heapq.heappop(events)
        if now > warmup:
            res.server_seconds += len(alive) * (now - max(last, warmup))
        last = now
        if kind == "sample":
            bound = truth.bound()
            res.times.append(now)
            res.ratios.append(truth.bottleneck() / bound if bound > 0 else 0.0)
        elif kind == "arrive":
            peer = peers[sid]
            if rule == "random":
                start = choose_blocks_random(p.blocks, peer.blocks, rng)
            else:
                start = best_start(view.totals, peer.blocks)
            alive.add(sid)
            start_of[sid], generation[sid] = start, 0
            moving.add(sid)
            push(now + p.announce_delay, "view", sid, start)
            push(now + p.load_s_per_block * peer.blocks, "loaded", sid, 0)
            push(peer.depart, "depart", sid)
            if rule == "paper":
                push(now + check_delay(), "check", sid)
        elif kind == "view":
            if sid in view.spans:
                view.move(sid, arg)
            elif sid in alive:
                view.add(sid, arg, peers[sid].blocks, 1 if rule == "naive" else units(peers[sid].throughput))
        elif kind == "loaded":
            if sid in alive and generation[sid] == arg:
                if sid in truth.spans:
                    truth_remove(sid, now)  # the old range drains as the new one comes online
                truth_add(sid, start_of[sid], peers[sid].blocks, now)
                moving.discard(sid)
        elif kind == "shock":
            middle = p.blocks // 2
            for victim in [v for v in alive if start_of[v] <= middle < start_of[v] + peers[v].blocks]:
                push(now, "depart", victim, 1)
        elif kind == "depart" and sid in alive:
            alive.discard(sid)
            moving.discard(sid)
            if sid in truth.spans:
                truth_remove(sid, now)
            crash = peers[sid].crash or arg == 1
            push(now + (p.expiry if crash else p.announce_delay), "unview", sid)
        elif kind == "unview":
            if sid in view.spans:
                view.remove(sid)
        elif kind == "check" and sid in alive:
            if sid not in moving:
                new = plan_move(view, sid, p.balance_quality)
                if new is not None:
                    if now >= warmup:
                        res.moves += 1
                    start_of[sid] = new
                    generation[sid] += 1
                    moving.add(sid)
                    push(now + p.announce_delay, "view", sid, new)
                    push(now + p.load_s_per_block * peers[sid].blocks, "loaded", sid, generation[sid])
            push(now + check_delay(), "check", sid)
    for since in gap_since.values():  # still open at the end
        res.max_gap_s = max(res.max_gap_s, end - since)
    return res


def plot(results: list[Result], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("--plot needs matplotlib: pip install 'swarm-llm[plot]'")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in results:
        ax.plot([t / 3600 for t in r.times], r.ratios, label=r.rule, linewidth=1)
    ax.set_xlabel("simulated time (h)")
    ax.set_ylabel("bottleneck ÷ upper bound")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    defaults = Params()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, value in vars(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--rules", default=",".join(RULES), help="comma-separated subset of " + ", ".join(RULES))
    parser.add_argument("--json", action="store_true", help="print the summary as a JSON list, one object per rule")
    parser.add_argument("--plot", metavar="PNG", help="write bottleneck ÷ bound over time (needs matplotlib)")
    args = parser.parse_args()
    p = Params(**{k: getattr(args, k) for k in vars(defaults)})
    rules = [r for r in args.rules.split(",") if r]
    for r in rules:
        if r not in RULES:
            parser.error(f"--rules: unknown rule {r!r} (one of {', '.join(RULES)})")
    if not 0 <= p.balance_quality <= 1:
        parser.error(f"--balance-quality must be between 0 and 1, got {p.balance_quality}")
    if p.servers < 1 or p.blocks < 1 or p.hours <= 0 or p.lifetime_h <= 0 or p.balance_period <= 0:
        parser.error("--servers, --blocks, --hours, --lifetime-h and --balance-period must be positive")
    peers = population(p)
    results = []
    for rule in rules:
        began = time.perf_counter()
        res = simulate(rule, peers, p)
        res.wall_s = time.perf_counter() - began
        results.append(res)
    summaries = [r.summary(p) for r in results]
    if args.json:
        print(json.dumps(summaries))
    else:
        print(f"{p.servers} servers (mean lifetime {p.lifetime_h} h), {p.blocks} blocks, {p.hours} h simulated, "
              f"{len(peers)} arrivals; steady state after {p.warmup_h} h")
        print(f"{'rule':<8} {'bottleneck/bound':>17} {'p10':>6} {'moves/server/h':>15} {'max gap s':>10} {'wall s':>7}")
        for r, s in zip(results, summaries):
            steady = sorted(x for t, x in zip(r.times, r.ratios) if t >= p.warmup_h * 3600)
            p10 = steady[len(steady) // 10] if steady else float("nan")
            print(f"{r.rule:<8} {s['bottleneck_ratio_median']:>17.3f} {p10:>6.3f} {s['moves_per_server_hour']:>15.3f} "
                  f"{s['max_gap_s']:>10.1f} {r.wall_s:>7.1f}")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
