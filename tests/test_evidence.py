"""Evidence of lies (p2p/evidence.py): servers sign their forward and backward replies; a client
that catches a liar publishes the signed lie; servers that hold the blocks recompute it and ban
the liar only when their own computation contradicts it. Forged accusations (a bad signature, or
a signed honest result called a lie) ban no one anywhere."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from swarm.p2p.evidence import (
    EVIDENCE_WIRE,
    Evidence,
    Recomputations,
    evidence_positions,
    evidence_topic,
    pass_digest,
    signed_by,
)
from swarm_utils import ServerProcess

LIAR = str(Path(__file__).resolve().parents[1] / "scripts" / "liar_server.py")


class _Key:
    """An Ed25519 key pair and its peer id, as a server's."""

    def __init__(self):
        from libp2p.crypto.ed25519 import create_new_key_pair
        from libp2p.peer.id import ID

        self.key_pair = create_new_key_pair()
        self.peer_id = ID.from_pubkey(self.key_pair.public_key).to_base58()


def test_a_signature_is_the_peer_ids_and_covers_every_byte(tmp_path):
    me, other = _Key(), _Key()
    x, y = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    P = ("float32", "none")
    digest = pass_digest("m", "forward", 0, 4, EVIDENCE_WIRE, None, [x], [y], P)
    signature = me.key_pair.private_key.sign(digest)
    assert signed_by(me.peer_id, digest, signature)
    assert not signed_by(other.peer_id, digest, signature)  # someone else's key
    changed = y.clone()
    changed.view(torch.int32)[0, 2, 3] += 1  # one bit of the output
    for other_digest in [
        pass_digest("m", "forward", 0, 4, EVIDENCE_WIRE, None, [x], [changed], P),
        pass_digest("m", "forward", 0, 3, EVIDENCE_WIRE, None, [x], [y], P),
        pass_digest("m2", "forward", 0, 4, EVIDENCE_WIRE, None, [x], [y], P),
        pass_digest("m", "forward", 0, 4, "bfloat16", None, [x], [y], P),
        pass_digest("m", "forward", 0, 4, EVIDENCE_WIRE, {"digest": "d", "spec": {}}, [x], [y], P),
        pass_digest("m", "forward", 0, 4, EVIDENCE_WIRE, None, [y], [x], P),
        pass_digest("m", "forward", 0, 4, EVIDENCE_WIRE, None, [x], [y], ("bfloat16", "none")),
    ]:
        assert other_digest != digest and not signed_by(me.peer_id, other_digest, signature)
    for junk in [b"", b"x" * 64, None, "text"]:
        assert not signed_by(me.peer_id, digest, junk)
    assert not signed_by("not-a-peer-id", digest, signature)


def test_evidence_round_trips_and_malformed_ones_are_refused(tmp_path):
    me = _Key()
    x, y = torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    ev = Evidence("m", me.peer_id, 1, 3, x, y, b"sig", ("bfloat16", "int8"), "because")
    back = Evidence.from_bytes(ev.to_bytes(), 16)
    assert (back.model, back.accused, back.start, back.end, back.signature, back.precision, back.reason) == (
        "m", me.peer_id, 1, 3, b"sig", ("bfloat16", "int8"), "because")
    assert torch.equal(back.inputs, x) and torch.equal(back.output, y) and back.digest() == ev.digest()
    import msgpack

    good = msgpack.unpackb(ev.to_bytes())
    bad = [b"", b"\x00" * 10, msgpack.packb([1, 2]), msgpack.packb({**good, "shape": [1, 3, 8]}),
           msgpack.packb({**good, "shape": [2, 3, 16]}), msgpack.packb({**good, "inputs": good["inputs"][:-2]}),
           msgpack.packb({**good, "start": 3, "end": 3}), msgpack.packb({**good, "signature": "text"}),
           msgpack.packb({k: v for k, v in good.items() if k != "output"}), b"\x00" * 2_000_000,
           msgpack.packb({**good, "inputs": torch.full((1, 3, 16), float("nan")).numpy().tobytes()})]
    for data in bad:
        with pytest.raises(ValueError):
            Evidence.from_bytes(data, 16)
    assert evidence_positions(2048) * 8 * 2048 <= 900_000 and evidence_positions(64) > 1000


def test_each_accusation_is_judged_once_and_recomputations_are_spaced():
    judged = Recomputations(interval=10)
    assert not judged.judged(b"a") and judged.judged(b"a") and not judged.judged(b"b")
    assert judged.wait(now=0) == 0  # the first at once
    assert judged.wait(now=4) == 6  # the next one 10 s after
    assert judged.wait(now=30) == 0
    assert judged.loud("x", now=0) and not judged.loud("x", now=30) and judged.loud("y", now=30) and judged.loud("x", now=61)


def test_stand_ins_keep_the_norms_and_not_the_values():
    from swarm.p2p.evidence import stand_in

    x = torch.randn(1, 7, 32) * torch.arange(1, 8).view(1, 7, 1)
    y = stand_in(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    assert cos.abs().max() < 0.9


def _bans(home: Path) -> dict:
    path = home / "verify.json"
    return json.loads(path.read_text())["bans"] if path.exists() else {}


def _wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _generate(model: Path, maddr: str, tokens: int) -> list[int]:
    from swarm.config import ClientOptions
    from swarm.engine.client import ClientModel
    from swarm.engine.generation import GenerationConfig
    from swarm.facade import Swarm

    client_model = ClientModel.load(model)
    with Swarm(ClientOptions(model=str(model), initial_peers=(maddr,)), client_model, None) as s:
        return s.generate_ids(client_model.encode("The capital of France is"), GenerationConfig(max_new_tokens=tokens))


@pytest.mark.slow
def test_a_caught_liar_is_banned_by_the_servers_that_recompute_its_signed_lie(tiny_checkpoints, tmp_path, monkeypatch):
    model = tiny_checkpoints["llama"]
    # the client gathers its evidence as it closes, 10 s at most by default: a loaded machine may need more
    monkeypatch.setattr("swarm.p2p.client.ACCUSE_GRACE", 60.0)
    homes = {name: tmp_path / name for name in ("one", "two", "liar", "client")}
    for home in homes.values():
        home.mkdir()
    monkeypatch.setenv("SWARM_HOME", str(homes["client"]))
    common = ["--model", str(model), "--blocks", "0:4", "--announce-period", "1"]
    with ServerProcess([*common, "--new-swarm", "--throughput", "1"], homes["one"], "one") as one:
        maddr = one.wait_ready()
        with ServerProcess([*common, "--initial-peers", maddr, "--throughput", "1"], homes["two"], "two") as two, \
                ServerProcess([*common, "--initial-peers", maddr, "--throughput", "1000"], homes["liar"], "liar",
                              prefix=(sys.executable, LIAR, "--lie", "noise:0.05", "--")) as liar:
            two.wait_ready()
            liar_id = liar.wait_ready().rsplit("/p2p/", 1)[1]
            for _ in range(5):  # until a client routes through the liar (one that has not pinged it yet may not)
                _generate(model, maddr, 8)
                if _bans(homes["client"]):
                    break
            assert list(_bans(homes["client"])) == [liar_id]  # caught by the client
            for name in ("one", "two"):  # and by both servers, from the evidence
                _wait_for(lambda name=name: liar_id in _bans(homes[name]), f"server {name} never banned the liar")
                assert "recomputed by this server" in _bans(homes[name])[liar_id]["reason"]
    assert _bans(homes["liar"]) == {}


async def _forge(model: Path, maddr: str, victim: str, home: Path) -> tuple[Evidence, Evidence]:
    """Two accusations against the honest ``victim``: its real signed forward with a bad
    signature, and its real signed forward (honest) called a lie."""
    from swarm.engine.checkpoint import Checkpoint
    from swarm.p2p.client import ClientConfig, SwarmClient
    from swarm.p2p.evidence import ask_forward
    from swarm.p2p.table import model_id

    ckpt = Checkpoint(model)
    client = await SwarmClient.start(model_id(ckpt), ckpt.num_blocks, ClientConfig(initial_peers=[maddr], ledger=home / "verify.json"))
    try:
        x = torch.randn(1, 6, ckpt.config.hidden_size)
        sent, out, signature, signed = await ask_forward(client, victim, 0, 4, x)
        assert signed_by(victim, pass_digest(client.model, "forward", 0, 4, EVIDENCE_WIRE, None, [sent], [out], signed),
                         signature)
        forged = bytes([signature[0] ^ 1]) + signature[1:]
        return (Evidence(client.model, victim, 0, 4, sent, out, forged, signed, "made up"),
                Evidence(client.model, victim, 0, 4, sent, out, signature, signed, "made up"))
    finally:
        await client.close()


async def _publish_until(model_id: str, maddr: str, evidence: Evidence, done) -> None:
    """Publish ``evidence`` (from a fresh peer, as a Sybil would) until ``done()``."""
    from swarm.p2p.host import Host

    host = await Host.start(listen_host="127.0.0.1", port=0)
    try:
        await host.connect(maddr, timeout=10)
        await host.subscribe(evidence_topic(model_id))  # joins the topic's mesh
        deadline = time.monotonic() + 60
        while not done():
            assert time.monotonic() < deadline, "the servers never judged the accusation"
            await host.publish(evidence_topic(model_id), evidence.to_bytes())
            await asyncio.sleep(0.5)
    finally:
        await host.close()


@pytest.mark.slow
def test_forged_accusations_ban_no_one(tiny_checkpoints, tmp_path):
    model = tiny_checkpoints["llama"]
    homes = {name: tmp_path / name for name in ("one", "two", "sybil")}
    for home in homes.values():
        home.mkdir()
    common = ["--model", str(model), "--blocks", "0:4", "--announce-period", "1"]
    with ServerProcess([*common, "--new-swarm"], homes["one"], "one") as one:
        maddr = one.wait_ready()
        victim = maddr.rsplit("/p2p/", 1)[1]
        with ServerProcess([*common, "--initial-peers", maddr], homes["two"], "two") as two:
            two.wait_ready()
            bad_signature, honest = asyncio.run(_forge(model, maddr, victim, homes["sybil"]))
            log = homes["two"] / "two.log"
            asyncio.run(_publish_until(bad_signature.model, two.maddr, bad_signature,
                                       lambda: "has a bad signature" in log.read_text()))
            asyncio.run(_publish_until(honest.model, two.maddr, honest,
                                       lambda: "does not hold up" in log.read_text()))
    assert _bans(homes["one"]) == {} and _bans(homes["two"]) == {}
