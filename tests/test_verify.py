"""Verification's pure parts (tolerances, when to check, who lied), the ledger of checks and bans,
and the generation loop's recovery from a session that forgets positions (a liar's)."""

from __future__ import annotations

import io
import json
import math
import random

import pytest
import torch
from rich.console import Console

from swarm.cli.render import status_view
from swarm.engine.client import ClientModel, local_sessions
from swarm.engine.generation import GenerationConfig, Rewound, generate
from swarm.engine.speculative import NgramDrafter
from swarm.p2p.ledger import Ban, Ledger, read_ledger
from swarm.p2p.status import status_report
from swarm.p2p.table import ServerInfo
from swarm.p2p.verify import (
    PRECISION_ERROR,
    Precision,
    VerifyPolicy,
    blame,
    disagreement,
    first_disagreeing,
    relative_error,
    tolerance,
)

DTYPES = ("float32", "bfloat16")
QUANTS = ("none", "int8", "nf4")


@pytest.mark.parametrize(
    "agree, expected",
    [
        ((True, None, None), "none"),
        ((False, None, None), "unknown"),
        ((False, False, True), "primary"),
        ((False, True, False), "checker"),
        ((False, False, False), "unknown"),
        ((False, True, True), "unknown"),  # cannot both agree with a third and disagree with each other
        ((False, None, True), "unknown"),
    ],
)
def test_blame_is_the_one_the_others_agree_against(agree, expected):
    assert blame(*agree) == expected


@pytest.mark.parametrize(
    "mode, passed, pending, draw, due",
    [
        ("off", 0, 5, 0.0, False),
        ("strict", 100, 1, 0.99, True),
        ("strict", 0, 0, 0.0, False),  # nothing to check
        ("sample", 0, 1, 0.99, True),  # a new server: always
        ("sample", 2, 1, 0.99, True),
        ("sample", 3, 1, 0.99, False),  # past its first checks: drawn
        ("sample", 3, 1, 0.01, True),
        ("sample", 50, 64, 0.99, True),  # too long unchecked
    ],
)
def test_policy_checks_new_servers_then_samples(mode, passed, pending, draw, due):
    assert VerifyPolicy(mode, rate=0.05).due(passed, pending, draw) is due


def test_policy_flags_are_checked():
    with pytest.raises(ValueError, match="--verify must be one of off, sample, strict"):
        VerifyPolicy("sometimes")
    with pytest.raises(ValueError, match="--verify-rate"):
        VerifyPolicy("sample", rate=1.5)


def test_disagreement_is_relative_to_what_the_blocks_changed():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16) * 10
    out = x + torch.randn(2, 5, 16)
    assert disagreement(x, out, out).max() == 0
    noisy = out.clone()
    noisy[1, 3] += 0.1 * torch.randn(16)  # one row of one position
    errors = disagreement(x, out, noisy)
    assert errors[3] > 0.02 and errors[[0, 1, 2, 4]].max() == 0
    assert first_disagreeing(errors, 0.01) == 3 and first_disagreeing(errors, 10.0) is None
    broken = out.clone()
    broken[0, 2, 0] = float("nan")
    assert first_disagreeing(disagreement(x, out, broken), 1e9) == 2


@pytest.mark.parametrize("a", [(d, q) for d in DTYPES for q in QUANTS])
@pytest.mark.parametrize("b", [(d, q) for d in DTYPES for q in QUANTS])
def test_tolerance_covers_both_sides_and_is_symmetric(a, b):
    pa, pb = Precision(*a), Precision(*b)
    assert tolerance(pa, pb) == tolerance(pb, pa)
    assert tolerance(pa, pb) > PRECISION_ERROR[a] + PRECISION_ERROR[b]
    assert tolerance(Precision(), Precision()) < 0.01  # float32 servers: a small lie is caught


def test_unknown_precision_is_the_most_lenient():
    assert Precision("float8", "none").error >= max(PRECISION_ERROR.values())


def test_ledger_persists_merges_and_expires(tmp_path):
    path = tmp_path / "verify.json"
    one, two = Ledger(path), Ledger(path)
    one.count("A", True, 3)
    one.ban("B", "lied on blocks 0:4", seconds=3600)
    two.count("A", True)
    two.count("C", False)
    two.ban("D", "gone soon", seconds=-1)  # already expired
    one.save()
    two.save()
    three = Ledger(path)
    assert three.checks["A"] == [4, 0] and three.checks["C"] == [0, 1]
    assert three.banned() == {"B"} and "lied" in three.bans["B"].reason
    assert "D" not in json.loads(path.read_text())["bans"]


def test_a_damaged_ledger_is_set_aside(tmp_path):
    path = tmp_path / "verify.json"
    path.write_text("{not json")
    ledger = Ledger(path)
    assert ledger.banned() == set()
    ledger.ban("X", "why", seconds=60)
    assert (tmp_path / "verify.bad").exists() and Ledger(path).banned() == {"X"}


class LyingOnce:
    """A local session whose step ``at`` (counted from 1) raises :class:`Rewound` to ``to``
    after running it: as a chain does when a check finds a liar's positions from there on."""

    def __init__(self, session, at: int, to):
        self.session, self.at, self.to, self.steps = session, at, to, 0

    def step(self, hidden, hypo_ids=None, per_position=False):
        out = self.session.step(hidden, hypo_ids, per_position)
        self.steps += 1
        if self.steps == self.at:
            self.position = self.session.kv.length
            to = self.to(self.position) if callable(self.to) else self.to
            self.session.rewind(to)
            raise Rewound(to, "server …liar")
        return out

    def rewind(self, position):
        self.session.rewind(position)

    def close(self):
        self.session.close()


@pytest.mark.parametrize("draft", [False, True])
@pytest.mark.parametrize("at, to", [(1, 0), (1, 3), (4, lambda p: p - 1), (6, lambda p: p - 4), (9, 0), (5, 12)])
def test_generation_after_a_rewind_gives_the_honest_tokens(tiny_checkpoints, at, to, draft):
    client = ClientModel.load(tiny_checkpoints["llama"])
    blocks = client.checkpoint.load_blocks(0, client.checkpoint.num_blocks, torch.float32)
    opener = local_sessions(blocks)
    prompt = client.encode("the the the cat sat on the mat the cat")
    cfg = GenerationConfig(max_new_tokens=16, draft="ngram" if draft else "none")
    honest = generate(client.head, opener, prompt, cfg)
    shown, rewinds = [], []

    def on_rewind(kept):
        rewinds.append(kept)
        del shown[kept:]

    got = generate(client.head, lambda b, m: LyingOnce(opener(b, m), at, to), prompt, cfg, shown.append,
                   draft=NgramDrafter() if draft else None, on_rewind=on_rewind)
    assert got == honest and shown == honest
    assert all(k < 16 for k in rewinds)


def test_beam_search_starts_over_after_a_rewind(tiny_checkpoints):
    client = ClientModel.load(tiny_checkpoints["llama"])
    blocks = client.checkpoint.load_blocks(0, client.checkpoint.num_blocks, torch.float32)
    opener = local_sessions(blocks)
    prompt = client.encode("a b c")
    cfg = GenerationConfig(max_new_tokens=6, num_beams=3)
    honest = generate(client.head, opener, prompt, cfg)
    opened = []

    def lying(b, m):
        opened.append(1)
        session = opener(b, m)
        return LyingOnce(session, 3, 2) if len(opened) == 1 else session

    assert generate(client.head, lying, prompt, cfg) == honest and len(opened) == 2


def test_policy_draws_are_a_fraction():
    policy, rng = VerifyPolicy("sample", rate=0.1), random.Random(1)
    checked = sum(policy.due(10, 1, policy.draw(rng)) for _ in range(10_000))
    assert 800 < checked < 1200


# ---- `swarm status`: this machine's checks and bans ----------------------------------------------

NOW = 1_700_000_000.0
DAY = 86400.0


def _fabricated_ledger() -> Ledger:
    ledger = Ledger()
    ledger.checks = {"peerAAAAAA": [12, 0], "peerBBBBBB": [7, 1], "peerGONE01": [3, 1], "peerOLD001": [1, 1]}
    ledger.bans = {
        "peerBBBBBB": Ban(until=NOW + 6 * DAY, reason="lied on blocks 2:4 from position 5", since=NOW - DAY),
        "peerGONE01": Ban(until=NOW + 3 * DAY, reason="lied as a checker on blocks 0:2", since=NOW - 4 * DAY),
        "peerOLD001": Ban(until=NOW - 1, reason="expired", since=NOW - 8 * DAY),
    }
    return ledger


def _fabricated_report(ledger: Ledger | None) -> dict:
    servers = {p: ServerInfo(peer_id=p, addrs=(), model="m", start=s, end=e)
               for p, s, e in [("peerAAAAAA", 0, 2), ("peerBBBBBB", 2, 4), ("peerCCCCCC", 0, 4)]}
    return status_report("m", 4, servers, {p: 0.001 for p in servers}, ledger=ledger, now=NOW)


@pytest.mark.parametrize(
    "peer, checks, ban_reason",
    [
        ("peerAAAAAA", {"passed": 12, "failed": 0}, None),
        ("peerBBBBBB", {"passed": 7, "failed": 1}, "lied on blocks 2:4 from position 5"),
        ("peerCCCCCC", None, None),  # never checked here
    ],
)
def test_status_rows_carry_this_machines_checks_and_bans(peer, checks, ban_reason):
    row = next(r for r in _fabricated_report(_fabricated_ledger())["servers"] if r["peer_id"] == peer)
    assert row["checks"] == checks
    assert (row["ban"] or {}).get("reason") == ban_reason


def test_status_lists_bans_in_force_newest_first_in_the_swarm_or_not():
    bans = _fabricated_report(_fabricated_ledger())["bans"]
    assert [(b["peer_id"], b["in_swarm"]) for b in bans] == [("peerBBBBBB", True), ("peerGONE01", False)]
    assert bans[0] == {"peer_id": "peerBBBBBB", "reason": "lied on blocks 2:4 from position 5", "since": NOW - DAY,
                       "until": NOW + 6 * DAY, "in_swarm": True}
    json.dumps(bans)  # `swarm status --json`


def test_status_without_a_ledger_has_no_verification_keys():
    data = _fabricated_report(None)
    assert "bans" not in data and all("checks" not in r and "ban" not in r for r in data["servers"])
    assert _fabricated_report(Ledger())["bans"] == []


def _rendered(data: dict) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(status_view(data, now=NOW))
    return console.export_text()


def test_status_view_shows_checks_and_the_bans_section():
    text = _rendered(_fabricated_report(_fabricated_ledger()))
    rows = {line.split()[1]: line for line in text.splitlines() if line.startswith("│ …")}
    assert "12 ✓ 0 ✗" in rows["…AAAAAA"] and "banned 7 ✓ 1 ✗" in rows["…BBBBBB"] and "—" in rows["…CCCCCC"]
    banned = text[text.index("Banned by this machine"):]
    assert "…BBBBBB" in banned and "lied on blocks 2:4 from position 5" in banned
    assert "24 h ago" in banned and "for 6 days more" in banned
    assert "…GONE01 (not in the swarm now)" in banned and "4 days ago" in banned and "for 3 days more" in banned
    assert "expired" not in text and "…OLD001" not in text


def test_status_view_without_bans_or_ledger_adds_nothing():
    assert "Banned by this machine" not in _rendered(_fabricated_report(Ledger()))
    plain = _rendered(_fabricated_report(None))
    assert "checks" not in plain and "Banned" not in plain


def test_status_reads_the_ledger_without_touching_it(tmp_path):
    assert read_ledger(tmp_path).checks == {} and not list(tmp_path.iterdir())  # missing: nothing checked
    path = tmp_path / "verify.json"
    for bad in ["{not json", "[1, 2]", '{"checks": {"A": "x"}}', '{"bans": {"A": {"reason": "no until"}}}']:
        path.write_text(bad)
        ledger = read_ledger(tmp_path)
        assert (ledger.checks, ledger.bans) == ({}, {})
        assert path.read_text() == bad and sorted(p.name for p in tmp_path.iterdir()) == ["verify.json"]
    writer = Ledger(path := tmp_path / "fresh" / "verify.json")
    writer.count("A", True, 2)
    writer.ban("B", "lied", seconds=60)
    ledger = read_ledger(path.parent)
    assert ledger.checks == {"A": [2, 0]}
    assert ledger.banned() == {"B"} and ledger.bans["B"].reason == "lied"
    ledger.count("A", False)
    ledger.save()  # a snapshot: saving writes nothing
    assert read_ledger(path.parent).checks["A"] == [2, 0]


# ---- fine-tuning's passes (p2p/pass_checks.py) -------------------------------------------------


def test_relative_error_of_gradients():
    g = torch.randn(2, 5, 16)
    assert relative_error(g, g) == 0.0
    assert relative_error(g, g * 1.01) == pytest.approx(0.01 / 1.01, rel=1e-3)
    assert relative_error(g, -g) == pytest.approx(2.0)
    assert relative_error(torch.zeros(3), torch.zeros(3)) == 0.0
    bad = g.clone()
    bad[0, 0, 0] = float("nan")
    assert relative_error(g, bad) == math.inf


def test_a_pass_check_compares_outputs_and_every_gradient():
    from swarm.p2p.pass_checks import PassChecks

    x = torch.randn(1, 4, 8)
    y = x + torch.randn(1, 4, 8)
    assert PassChecks._error("forward", x, y, y.clone()) == 0.0
    assert PassChecks._error("forward", x, y, x + 1.3 * (y - x)) == pytest.approx(0.3 / 1.3, rel=1e-4)
    g, parts = torch.randn(1, 4, 8), {"a": torch.randn(3, 2), "b": torch.randn(2)}
    assert PassChecks._error("backward", x, (g, parts), (g.clone(), dict(parts))) == 0.0
    off = {**parts, "b": parts["b"] * 2}  # one adapter gradient wrong: that is the error
    assert PassChecks._error("backward", x, (g, parts), (g, off)) == pytest.approx(0.5)
    assert PassChecks._error("backward", x, (g, parts), (g, {"a": parts["a"]})) == math.inf  # a gradient missing
    # gradients have tolerances of their own: a zero or unrelated gradient (error 1) is caught
    # between float32 and bfloat16 or int8 servers; nothing can be told from an nf4 one's
    from swarm.p2p.verify import grad_tolerance

    f32, bf16, int8, nf4 = Precision(), Precision("bfloat16"), Precision("float32", "int8"), Precision("bfloat16", "nf4")
    assert PassChecks._limit("backward", bf16, f32) == grad_tolerance(bf16, f32) < 0.3
    assert PassChecks._limit("forward", bf16, f32) == tolerance(bf16, f32)
    assert grad_tolerance(int8, f32) < 1 < grad_tolerance(int8, int8) and grad_tolerance(nf4, f32) >= 2
    assert grad_tolerance(f32, f32) < 1e-3


def test_training_checks_come_at_least_every_8_passes():
    policy = VerifyPolicy("sample", rate=0.0)
    from dataclasses import replace

    from swarm.p2p.verify import MAX_PENDING_PASSES

    training = replace(policy, max_pending=min(policy.max_pending, MAX_PENDING_PASSES))
    assert [training.due(5, n, 0.99) for n in (1, 7, 8)] == [False, False, True]
    assert training.due(0, 1, 0.99)  # a new server's first passes: always
    assert VerifyPolicy("sample").blocking(0) and not VerifyPolicy("sample").blocking(1)
    assert VerifyPolicy("strict").blocking(100)
