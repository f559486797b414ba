"""Load balancing decisions (p2p/balance.py): pure functions over snapshots, tested with tables."""

from __future__ import annotations

import importlib.util
import itertools
import random
import sys
from pathlib import Path

import pytest

from swarm.p2p.balance import (
    UNIT,
    Load,
    best_start,
    block_throughputs,
    bottleneck,
    bottleneck_bound,
    choose_blocks_naive,
    choose_blocks_random,
    should_move,
)
from swarm.p2p.routing import choose_blocks
from swarm.p2p.table import ServerInfo
from swarm.p2p.wire import PeerId


def _server(name: str, start: int, end: int, throughput: float = 1.0, state: str = "online") -> ServerInfo:
    return ServerInfo(PeerId(name), (), "m", start, end, state=state, throughput=throughput)


def _table(*servers: ServerInfo) -> dict[PeerId, ServerInfo]:
    return {s.peer_id: s for s in servers}


def _moved(table: dict, name: str, start: int) -> None:
    s = table[name]
    table[name] = _server(name, start, start + s.end - s.start, s.throughput, s.state)


def test_best_start_is_the_lexicographic_rule():
    # the oracle is the rule's literal definition, over every window
    rng = random.Random(0)
    for _ in range(500):
        B, count = rng.randint(1, 12), rng.randint(1, 14)
        totals = [rng.choice([0, 1, 2, 3, 5]) for _ in range(B)]
        n = min(count, B)
        keys = {i: sorted(totals[i : i + n]) for i in range(B - n + 1)}
        expected = min(keys, key=lambda i: (keys[i], i))
        assert best_start(totals, count) == expected
        prefer = rng.randrange(B - n + 1)
        assert best_start(totals, count, prefer=prefer) == (prefer if keys[prefer] == keys[expected] else expected)


@pytest.mark.parametrize(
    "servers, totals, neck",
    [
        ((), [0.0] * 4, 0.0),
        ((_server("a", 0, 2, 1.5), _server("b", 1, 4, 2)), [1.5, 3.5, 2, 2], 1.5),
        ((_server("a", 0, 4), _server("b", 0, 2, 3, state="joining"), _server("c", 2, 4, 9, state="offline")),
         [4, 4, 1, 1], 1.0),
        ((_server("a", 2, 9, 0.25),), [0, 0, 0.25, 0.25], 0.0),  # ranges clipped to the model
        # a server that batches counts with what it carries batched (its capacity), not one session's speed
        ((_server("a", 0, 2, 1.0), ServerInfo(PeerId("b"), (), "m", 1, 4, throughput=1.0, capacity=4.0)),
         [1, 5, 4, 4], 1.0),
    ],
)
def test_block_throughputs_and_bottleneck(servers, totals, neck):
    assert block_throughputs(_table(*servers), 4) == totals
    assert bottleneck(_table(*servers), 4) == neck


@pytest.mark.parametrize(
    "servers, num_blocks, bound",
    [
        ((), 10, 0.0),
        ((_server("a", 0, 10, 2),), 10, 2.0),  # one server holding the whole model
        ((_server("a", 0, 5), _server("b", 0, 5, 3)), 10, 2.0),  # even spread: (1·5 + 3·5) / 10
        # windows of 60 out of 80 blocks can never hold both block 0 and block 61: half, not 3/4
        ((_server("a", 0, 60, 1), _server("b", 20, 80, 1)), 80, 1.0),
        ((_server("a", 0, 60, 1), _server("b", 20, 80, 1), _server("c", 0, 60, 1)), 80, 1.5),
        # sizes 3 on 4 blocks: blocks 0 and 3 are never in one window, so at most (1+1+1)/2
        ((_server("a", 0, 3), _server("b", 0, 3), _server("c", 1, 4)), 4, 1.5),
    ],
)
def test_bound_is_the_even_spread_capped_by_contiguity(servers, num_blocks, bound):
    assert bottleneck_bound(_table(*servers), num_blocks) == pytest.approx(bound)


def test_no_placement_beats_the_bound():
    rng = random.Random(1)
    for _ in range(30):
        B = rng.randint(2, 7)
        sizes = [rng.randint(1, B) for _ in range(rng.randint(1, 3))]
        throughputs = [rng.choice([1, 2, 5]) for _ in sizes]
        placements = itertools.product(*[range(B - n + 1) for n in sizes])
        best = max(min(sum(t for s, n, t in zip(starts, sizes, throughputs) if s <= b < s + n) for b in range(B))
                   for starts in placements)
        table = _table(*[_server(f"s{i}", 0, n, t) for i, (n, t) in enumerate(zip(sizes, throughputs))])
        assert best <= bottleneck_bound(table, B) + 1e-9


def test_load_stays_exact_under_add_remove_and_move():
    rng = random.Random(2)
    load = Load(16)
    for step in range(2000):
        if load.spans and rng.random() < 0.4:
            load.remove(rng.choice(list(load.spans)))
        elif load.spans and rng.random() < 0.5:
            key = rng.choice(list(load.spans))
            load.move(key, rng.randrange(16 - load.spans[key][1] + 1))
        else:
            n = rng.randint(1, 16)
            load.add(step, rng.randrange(16 - n + 1), n, rng.randint(0, 10**9))
        if step % 97 == 0:
            fresh = Load(16)
            for key, (s, n, w) in load.spans.items():
                fresh.add(key, s, n, w)
            assert fresh.totals == load.totals and fresh.bound() == load.bound()


def _pair():
    # a fixed whole-model server and two movers whose best places depend on each other
    return _table(_server("f", 0, 4, 1), _server("a", 0, 2, 2), _server("b", 0, 2, 1))


@pytest.mark.parametrize(
    "servers, me, quality, expected",
    [
        (_pair(), "a", 0.75, 2),  # bottleneck 1 → 2 (b stays at 0): worth it
        (_pair(), "b", 0.75, 2),
        (_pair(), "a", 0.0, None),  # 0 turns moving off
        ((_server("f", 0, 4, 3), _server("a", 0, 2, 2), _server("b", 0, 2, 1)), "a", 0.75, None),  # 3 → 4: not 4/3
        ((_server("f", 0, 4, 3), _server("a", 0, 2, 2), _server("b", 0, 2, 1)), "a", 0.8, 2),  # 3 → 4 > 3 / 0.8
        # a is the only server of blocks 0–1: leaving would open a gap, though 2–3 is a gap already
        ((_server("a", 0, 2, 5), _server("b", 1, 2, 1)), "a", 1.0, None),
        ((_server("a", 0, 2), _server("b", 2, 4)), "a", 1.0, None),  # already balanced: nowhere weaker
        # c moving to 2–3 would only mirror the weakness (totals 1 1 2 2): a tie stays
        ((_server("a", 0, 2), _server("b", 2, 4), _server("c", 0, 2)), "c", 1.0, None),
        ((_server("a", 0, 2), _server("b", 2, 4), _server("c", 0, 2, 3)), "c", 1.0, None),
        ((_server("a", 0, 3), _server("b", 0, 1), _server("c", 3, 4)), "b", 1.0, None),  # 1 → 1
        ((_server("a", 0, 3), _server("b", 0, 1), _server("c", 2, 3)), "b", 1.0, 3),  # gap → 1
        ((_server("a", 0, 2), _server("b", 2, 4), _server("c", 0, 2)), "d", 1.0, None),  # not announced yet
    ],
)
def test_should_move(servers, me, quality, expected):
    assert should_move(_table(*servers) if isinstance(servers, tuple) else servers, me, 4, quality) == expected


@pytest.mark.parametrize(
    "servers, num_blocks, me, expected",
    [
        # 25–29 unserved; c alone holds 20–24, but 20–29 keeps it and closes the gap (b keeps 15–19)
        ((_server("a", 0, 10), _server("b", 10, 20), _server("c", 15, 25)), 30, "c", 20),
        ((_server("a", 0, 10), _server("b", 10, 20), _server("c", 15, 25)), 30, "b", None),  # 10–14 only b's
        # two gaps (0–1, 6–7): closing one leaves the bottleneck at 0, but one gap fewer is progress
        ((_server("a", 2, 4), _server("b", 3, 5), _server("c", 4, 6)), 8, "b", 0),
        # after departures: 24–29 unserved, only 6–13's server can make room without opening a gap
        ((_server("a", 0, 8, 5), _server("b", 16, 24, 2), _server("c", 14, 22, 4), _server("d", 6, 14, 3)), 30, "b", 22),
    ],
)
def test_servers_close_gaps_while_keeping_what_only_they_hold(servers, num_blocks, me, expected):
    assert should_move(_table(*servers), me, num_blocks, 0.75) == expected


def test_should_move_rejects_a_bad_quality():
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="--balance-quality"):
            should_move(_pair(), "a", 4, bad)


def _run_periods(table: dict, num_blocks: int, quality: float, periods: int, rng: random.Random) -> list[int]:
    """Every period each server in random order checks on a fresh snapshot and moves if told to;
    returns the moves per period."""
    counts = []
    for _ in range(periods):
        moves = 0
        for name in rng.sample(sorted(table), len(table)):
            new = should_move(table, name, num_blocks, quality)
            if new is not None:
                _moved(table, name, new)
                moves += 1
        counts.append(moves)
    return counts


def test_two_interdependent_servers_do_not_swap_back_and_forth():
    table = _pair()
    counts = _run_periods(table, 4, 1.0, 200, random.Random(3))
    assert sum(counts) == 1 and {table["a"].start, table["b"].start} == {0, 2}


def test_random_swarms_settle_without_revisiting_a_placement():
    rng = random.Random(4)
    for _ in range(15):
        B = rng.randint(4, 12)
        table = {}
        for i in range(rng.randint(2, 8)):
            n = rng.randint(1, B)
            s = rng.randrange(B - n + 1)
            table[PeerId(f"s{i}")] = _server(f"s{i}", s, s + n, rng.choice([0.5, 1, 1, 2, 4]))
        seen = {tuple(sorted((p, s.start) for p, s in table.items()))}
        for _ in range(40):
            if not _run_periods(table, B, 1.0, 1, rng)[0]:
                break
            placement = tuple(sorted((p, s.start) for p, s in table.items()))
            assert placement not in seen
            seen.add(placement)
        assert _run_periods(table, B, 1.0, 5, rng) == [0] * 5


def test_naive_rule_counts_servers_and_random_stays_in_range():
    # blocks 2–3 have one fast server, 0–1 two slow ones: by count 2–3 is weaker, by throughput 0–1
    table = _table(_server("a", 0, 2, 1), _server("b", 0, 2, 1), _server("c", 2, 4, 50))
    assert choose_blocks_naive(table, 4, 2) == 2
    assert choose_blocks(table, 4, 2) == 0
    rng = random.Random(5)
    assert {choose_blocks_random(10, 4, rng) for _ in range(500)} == set(range(7))
    assert choose_blocks_random(3, 9, rng) == 0


def test_throughputs_round_to_units():
    assert block_throughputs(_table(_server("a", 0, 1, 0.1)), 1) == [round(0.1 / UNIT) * UNIT]


def _simulator():
    path = Path(__file__).resolve().parents[1] / "scripts" / "simulate_swarm.py"
    spec = importlib.util.spec_from_file_location("simulate_swarm", path)
    sim = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sim  # dataclasses look their module up
    spec.loader.exec_module(sim)
    return sim


def test_swarm_simulator_ranks_the_rules():
    # small, short runs of scripts/simulate_swarm.py (the real decision functions inside)
    sim = _simulator()
    p = sim.Params(servers=200, hours=2.0, warmup_h=0.5, seed=7)
    peers = sim.population(p)
    out = {rule: sim.simulate(rule, peers, p).summary(p) for rule in sim.RULES}
    assert out["paper"]["bottleneck_ratio_median"] >= 0.85
    assert out["paper"]["bottleneck_ratio_median"] > out["naive"]["bottleneck_ratio_median"]
    assert out["naive"]["bottleneck_ratio_median"] > out["random"]["bottleneck_ratio_median"]
    assert out["paper"]["moves_per_server_hour"] < 1 and out["paper"]["max_gap_s"] <= 2 * p.balance_period


def test_simulated_servers_move_to_close_a_gap():
    # every server holding the middle block crashes at once: the others cover it again by moving,
    # within two balance periods (the view only drops a crashed server after its expiry)
    sim = _simulator()
    p = sim.Params(servers=100, hours=1.0, warmup_h=0.5, shock_h=0.7, seed=8)
    peers = sim.population(p)
    paper, naive = (sim.simulate(rule, peers, p).summary(p) for rule in ("paper", "naive"))
    assert 0 < paper["moves_per_server_hour"] < 1
    assert 0 < paper["max_gap_s"] <= 2 * p.balance_period and paper["max_gap_s"] < naive["max_gap_s"]
