"""Real lying servers (scripts/liar_server.py: a real `swarm serve` whose outputs are changed) in a
swarm with an honest one: the client catches the liar, bans it, and its output equals local."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from swarm_utils import ServerProcess

pytestmark = pytest.mark.slow

LIAR = str(Path(__file__).resolve().parents[1] / "scripts" / "liar_server.py")
PROMPT = "The capital of France is"


def generate(model: Path, maddr: str, max_new_tokens: int, **options) -> tuple[list[int], list[int]]:
    """(tokens, the `on_rewind` counts) of a greedy generation through the swarm, in this process."""
    from swarm.config import ClientOptions
    from swarm.engine.client import ClientModel
    from swarm.engine.generation import GenerationConfig
    from swarm.facade import Swarm

    client_model = ClientModel.load(model)
    shown, rewinds = [], []

    def on_rewind(kept: int) -> None:
        rewinds.append(kept)
        del shown[kept:]

    cfg = GenerationConfig(max_new_tokens=max_new_tokens)
    with Swarm(ClientOptions(model=str(model), initial_peers=(maddr,), **options), client_model, None) as s:
        tokens = s.generate_ids(client_model.encode(PROMPT), cfg, shown.append, on_rewind=on_rewind)
    assert shown == tokens  # what a streaming consumer ends up showing
    return tokens, rewinds


def local(model: Path, max_new_tokens: int) -> list[int]:
    from swarm.engine.client import ClientModel, generate_local
    from swarm.engine.generation import GenerationConfig

    client_model = ClientModel.load(model)
    return generate_local(client_model, client_model.encode(PROMPT), GenerationConfig(max_new_tokens=max_new_tokens))


@contextmanager
def swarm_with_liar(model: Path, home: Path, lie: list[str]):
    """An honest server and a liar, both holding every block, stopped on leaving; yields the
    honest one's multiaddr. The liar announces itself far faster, so clients route through it first."""
    common = ["--model", str(model), "--blocks", "0:4", "--announce-period", "1"]
    with ServerProcess([*common, "--new-swarm", "--throughput", "1"], home, "honest") as honest:
        maddr = honest.wait_ready()
        with ServerProcess([*common, "--initial-peers", maddr, "--throughput", "1000"], home, "liar",
                           prefix=(sys.executable, LIAR, *lie, "--")) as liar:
            liar.wait_ready()
            yield maddr


def banned(home: Path) -> dict:
    return json.loads((home / "verify.json").read_text())["bans"]


@pytest.mark.parametrize("lie", ["noise:0.01", "permute", "scale:1.3"])
def test_a_server_lying_on_every_step_is_caught_at_once(tiny_checkpoints, tmp_path, monkeypatch, lie):
    monkeypatch.setenv("SWARM_HOME", str(tmp_path))
    model = tiny_checkpoints["llama"]
    with swarm_with_liar(model, tmp_path, ["--lie", lie]) as maddr:
        tokens, rewinds = generate(model, maddr, 12)
    assert tokens == local(model, 12)
    assert all(kept < 9 for kept in rewinds)  # caught before the 10th token (here: at the prompt's step)
    assert len(banned(tmp_path)) == 1 and "wrong outputs" in next(iter(banned(tmp_path).values()))["reason"]


def test_a_server_honest_for_a_while_then_lying_sometimes_is_caught(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_HOME", str(tmp_path))
    model = tiny_checkpoints["llama"]
    with swarm_with_liar(model, tmp_path, ["--lie", "noise:0.05", "--after", "30", "--rate", "0.3"]) as maddr:
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
