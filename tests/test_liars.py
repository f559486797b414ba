"""Real lying servers (scripts/liar_server.py: a real `swarm serve` whose outputs are changed) in a
swarm with an honest one: the client catches the liar, bans it, and its output equals local."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from swarm_utils import ServerProcess

pytestmark = pytest.mark.slow

LIAR = str(Path(__file__).resolve().parents[1] / "scripts" / "liar_server.py")
PROMPT = "The capital of France is"


def generate(model: Path, maddr: str, max_new_tokens: int, on_token=None, chains: list | None = None,
             **options) -> tuple[list[int], list[int]]:
    """(tokens, the `on_rewind` counts) of a greedy generation through the swarm, in this process
    (``on_token(count shown)``: after each token shown; ``chains``: each chain, appended as it opens)."""
    from swarm.config import ClientOptions
    from swarm.engine.client import ClientModel
    from swarm.engine.generation import GenerationConfig
    from swarm.facade import Swarm

    client_model = ClientModel.load(model)
    shown, rewinds = [], []

    def on_rewind(kept: int) -> None:
        rewinds.append(kept)
        del shown[kept:]

    def show(token: int) -> None:
        shown.append(token)
        if on_token is not None:
            on_token(len(shown))

    cfg = GenerationConfig(max_new_tokens=max_new_tokens)
    with Swarm(ClientOptions(model=str(model), initial_peers=(maddr,), **options), client_model, None) as s:
        s.connect()
        s.client.cfg.ping_timeout = 10.0  # a loaded machine's first ping may be slow: the liar must not look unreachable
        s.background.call(_knows_servers(s.client, 2), timeout=40)  # the liar too, before routing
        on_chain = None if chains is None else chains.append
        tokens = s.generate_ids(client_model.encode(PROMPT), cfg, show, on_chain=on_chain, on_rewind=on_rewind)
    assert shown == tokens  # what a streaming consumer ends up showing
    return tokens, rewinds


async def _knows_servers(client, count: int, timeout: float = 30.0) -> None:
    """Until ``client``'s table lists ``count`` servers (an announcement may come late on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while len(client.table.snapshot()) < count:
        assert time.monotonic() < deadline, f"the client knows {len(client.table.snapshot())} of {count} servers"
        await asyncio.sleep(0.1)


def local(model: Path, max_new_tokens: int) -> list[int]:
    from swarm.engine.client import ClientModel, generate_local
    from swarm.engine.generation import GenerationConfig

    client_model = ClientModel.load(model)
    return generate_local(client_model, client_model.encode(PROMPT), GenerationConfig(max_new_tokens=max_new_tokens))


@contextmanager
def swarm_with_liar(model: Path, home: Path, lie: list[str], processes: list | None = None):
    """An honest server and a liar, both holding every block, stopped on leaving; yields the
    honest one's multiaddr and the liar's. The liar announces itself far faster, so clients route
    through it first. ``processes``: the liar's process is added to it."""
    common = ["--model", str(model), "--blocks", "0:4", "--announce-period", "1"]
    with ServerProcess([*common, "--new-swarm", "--throughput", "1"], home, "honest") as honest:
        maddr = honest.wait_ready()
        with ServerProcess([*common, "--initial-peers", maddr, "--throughput", "1000"], home, "liar",
                           prefix=(sys.executable, LIAR, *lie, "--")) as liar:
            if processes is not None:
                processes.append(liar)
            yield maddr, liar.wait_ready()


def banned(home: Path) -> dict:
    """The bans in ``home``'s ledger ({} before the first is saved)."""
    ledger = home / "verify.json"
    return json.loads(ledger.read_text())["bans"] if ledger.exists() else {}


@pytest.mark.parametrize("lie", ["noise:0.01", "permute", "scale:1.3"])
def test_a_server_lying_on_every_step_is_caught_at_once(tiny_checkpoints, tmp_path, monkeypatch, lie):
    monkeypatch.setenv("SWARM_HOME", str(tmp_path))
    model = tiny_checkpoints["llama"]
    expected = local(model, 12)
    with swarm_with_liar(model, tmp_path, ["--lie", lie]) as (maddr, _):
        for _ in range(3):  # until a client routes through the liar (on a loaded machine one may not see it yet)
            tokens, rewinds = generate(model, maddr, 12)
            assert tokens == expected
            if banned(tmp_path):
                break
    assert all(kept < 9 for kept in rewinds)  # caught before the 10th token (here: at the prompt's step)
    # the client's reason, or the honest server's (same machine here) after it recomputed the published evidence
    assert len(banned(tmp_path)) == 1 and "wrong" in next(iter(banned(tmp_path).values()))["reason"]


def test_a_server_honest_for_a_while_then_lying_sometimes_is_caught(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_HOME", str(tmp_path))
    model = tiny_checkpoints["llama"]
    with swarm_with_liar(model, tmp_path, ["--lie", "noise:0.05", "--after", "30", "--rate", "0.3"]) as (maddr, _):
        tokens, rewinds = generate(model, maddr, 150)
    assert tokens == local(model, 150)
    assert rewinds and len(banned(tmp_path)) == 1


def test_honest_servers_are_never_accused(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_HOME", str(tmp_path))
    model = tiny_checkpoints["llama"]
    common = ["--model", str(model), "--blocks", "0:4", "--announce-period", "1"]
    with ServerProcess([*common, "--new-swarm"], tmp_path, "first") as first:
        maddr = first.wait_ready()
        with ServerProcess([*common, "--initial-peers", maddr, "--threads", "1"], tmp_path, "second") as second:
            second.wait_ready()
            tokens, rewinds = generate(model, maddr, 60, verify="strict")
    assert tokens == local(model, 60) and rewinds == []
    checks = json.loads((tmp_path / "verify.json").read_text())
    assert checks["bans"] == {} and all(failed == 0 for _, failed in checks["checks"].values())
    assert sum(passed for passed, _ in checks["checks"].values()) >= 60


def train(model: Path, data: Path, out: Path, **options) -> dict:
    """A LoRA trained on ``data`` in this process (through the swarm, or ``local=True``): its tensors."""
    from safetensors.torch import load_file

    from swarm.train import finetune

    finetune(data, output=out, model=str(model), epochs=4, batch_size=4, lr=1e-2, max_length=64, eval_fraction=0,
             save_every=0, quiet=True, **options)
    return load_file(out / "adapter_model.safetensors")


def facts(tmp_path: Path, n: int = 8) -> Path:
    facts = Path(__file__).resolve().parents[1] / "scripts" / "data" / "facts.jsonl"
    data = tmp_path / "d.jsonl"
    data.write_text("".join(line + "\n" for line in facts.read_text().splitlines()[:n]))
    return data


def test_a_lora_trained_through_a_lying_server_equals_one_trained_honestly(tiny_checkpoints, tmp_path, monkeypatch):
    """The liar (noise on every forward and backward) is the client's first choice: its first pass
    is checked, the liar caught and banned, that pass's honest result used, and the rest of the
    run goes through the honest server: the adapter is a local run's."""
    monkeypatch.setenv("SWARM_HOME", str(tmp_path))
    model, data = tiny_checkpoints["llama"], facts(tmp_path)
    with swarm_with_liar(model, tmp_path, ["--lie", "noise:0.01"]) as (maddr, liar):
        swarm = train(model, data, tmp_path / "swarm", initial_peers=maddr)
    want = train(model, data, tmp_path / "local", local=True)
    assert max((swarm[k] - want[k]).abs().max().item() for k in want) <= 1e-5
    assert list(banned(tmp_path)) == [liar.rsplit("/p2p/", 1)[1]]


def test_a_liar_caught_after_unchecked_passes_stops_the_training_naming_it(tiny_checkpoints, tmp_path, monkeypatch):
    """Honest for its first passes (which pass their checks), lying after: the lies that went
    unchecked may be in the adapter already, so the run stops with an error naming the liar (or,
    had the first lie been checked, ends with an honest run's adapter)."""
    from swarm.p2p.chain import SwarmError

    monkeypatch.setenv("SWARM_HOME", str(tmp_path))
    model, data = tiny_checkpoints["llama"], facts(tmp_path)
    with swarm_with_liar(model, tmp_path, ["--lie", "noise:0.01", "--after", "4"]) as (maddr, liar):
        liar_id = liar.rsplit("/p2p/", 1)[1]
        try:
            swarm = train(model, data, tmp_path / "swarm", initial_peers=maddr)
        except SwarmError as exc:
            assert liar_id[-6:] in str(exc) and "may have learned from wrong results" in str(exc), exc
        else:
            want = train(model, data, tmp_path / "local", local=True)
            assert max((swarm[k] - want[k]).abs().max().item() for k in want) <= 1e-5
    assert list(banned(tmp_path)) == [liar_id]


def test_a_liar_that_dies_after_unchecked_lies_is_found_out_by_its_replacements_replay(
        tiny_checkpoints, tmp_path, monkeypatch):
    """Honest for the prompt (its first check passes), lying after, killed before any later check
    (none comes: rate 0): the replacement's replay of its history disagrees with what it returned,
    the tokens from the first lie are computed again, and the output equals local."""
    from swarm.config import ClientOptions
    from swarm.p2p.verify import VerifyPolicy

    monkeypatch.setenv("SWARM_HOME", str(tmp_path))
    monkeypatch.setattr(ClientOptions, "verify_policy",
                        lambda self: VerifyPolicy("sample", rate=0.0, first=1, max_pending=10**6))
    model = tiny_checkpoints["llama"]
    liar, chains = [], []

    def kill_after_6(shown: int) -> None:  # only while the liar serves (and has lied to) this client
        if shown == 6 and liar[0].proc.poll() is None and liar_id in {s.peer_id for s in chains[-1].spans}:
            liar[0].proc.kill()
            liar[0].proc.wait()

    expected = local(model, 16)
    with swarm_with_liar(model, tmp_path, ["--lie", "noise:0.05", "--after", "8"], liar) as (maddr, liar_maddr):
        liar_id = liar_maddr.rsplit("/p2p/", 1)[1]
        for _ in range(3):  # until a client routes through the liar (on a loaded machine one may not see it in time)
            chains.clear()
            tokens, rewinds = generate(model, maddr, 16, on_token=kill_after_6, chains=chains)
            assert tokens == expected
            # caught: killed in the chain and its replacement's replay disagreed with what it returned
            # (or dropped as too slow after lying, and the replay caught it the same way)
            if rewinds:
                break
    assert rewinds, "no client kept the liar in its chain until it lied"  # its lies were shown, then replaced
