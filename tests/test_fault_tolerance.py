"""Fault-tolerant inference over real server processes: servers killed (SIGKILL) or frozen
(SIGSTOP) mid-generation, replaced from the client's history; output identical to undisturbed.

The client runs in this process (so a hook can kill whichever server is serving at a given
token); the servers are real `swarm serve` processes on loopback."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import pytest

from conftest import write_tiny_checkpoint
from swarm.engine.client import ClientModel, generate_local
from swarm.engine.generation import GenerationConfig
from swarm.p2p.client import RemoteChain, SwarmError
from swarm_utils import ServerProcess, cli, running_swarm, swarm_generate

PROMPT = "The capital of France is"

pytestmark = pytest.mark.slow  # real server processes killed and frozen


@pytest.fixture(scope="module")
def tiny6(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny6"), "llama", num_hidden_layers=6)


def _peer_of(server: ServerProcess) -> str:
    return server.maddr.rsplit("/p2p/", 1)[1]


def _serving(chain, block: int) -> str:
    return next(s.span.peer_id for s in chain.sessions if s.span.start <= block < s.span.end)


def test_kill_and_freeze_middle_servers_output_unchanged(tiny6, tmp_path, caplog, monkeypatch):
    # small replay frames, so a replay is sent as several frames (as a long context would be)
    monkeypatch.setattr("swarm.p2p.chain.REPLAY_FRAME_BYTES", 4096)
    cfg = GenerationConfig(max_new_tokens=40, eos_token_ids=())
    client_model = ClientModel.load(tiny6)
    expected = generate_local(client_model, client_model.encode(PROMPT), cfg)
    ranges = ["0:2", "2:4", "4:6", "2:4", "2:4", "2:6", "2:4"]
    with running_swarm(tiny6, ranges, tmp_path) as servers:
        by_peer = {_peer_of(s): s for s in servers}
        events = []

        def on_token(i, chain):
            if i in (6, 14, 22):  # kill -9 whichever server now runs block 2
                victim = by_peer[_serving(chain, 2)]
                victim.proc.kill()
                victim.proc.wait()
                events.append(("kill", victim.blocks))
            if i == 30:  # freeze the one serving block 3: detected by the step timeout
                victim = by_peer[_serving(chain, 3)]
                os.kill(victim.proc.pid, signal.SIGSTOP)
                events.append(("stop", victim.blocks))

        with caplog.at_level("WARNING", logger="swarm.client"):
            started = time.monotonic()
            tokens = swarm_generate(tiny6, servers[0].maddr, cfg, on_token, step_timeout=2.0, wait_timeout=20.0)
            elapsed = time.monotonic() - started
        for s in servers:
            if s.proc.poll() is None:
                os.kill(s.proc.pid, signal.SIGCONT)
    assert [e[0] for e in events] == ["kill", "kill", "kill", "stop"]
    assert tokens == expected
    recoveries = [r.getMessage() for r in caplog.records if "recovered blocks" in r.getMessage()]
    assert len(recoveries) == 4, recoveries
    assert elapsed < 30, f"four recoveries took {elapsed:.1f} s"


def test_only_server_of_a_range_killed_fails_naming_the_range(tiny6, tmp_path):
    cfg = GenerationConfig(max_new_tokens=30, eos_token_ids=())
    with running_swarm(tiny6, ["0:2", "2:4", "4:6"], tmp_path) as servers:
        middle = servers[1]

        def on_token(i, chain):
            if i == 3:
                middle.proc.kill()
                middle.proc.wait()

        started = time.monotonic()
        with pytest.raises(SwarmError, match=r"blocks 2:4 .*swarm serve --blocks 2:4"):
            swarm_generate(tiny6, servers[0].maddr, cfg, on_token, step_timeout=2.0, wait_timeout=3.0)
        assert time.monotonic() - started < 3.0 + 10


def test_cli_reports_missing_range_after_the_only_server_dies(tiny6, tmp_path):
    with running_swarm(tiny6, ["0:2", "2:4", "4:6"], tmp_path) as servers:
        servers[1].stop()
        started = time.monotonic()
        proc = cli(["generate", "--model", str(tiny6), "--initial-peers", servers[0].maddr,
                    "--timeout", "2", "--step-timeout", "2", PROMPT], tmp_path)  # the command, in this process
        elapsed = time.monotonic() - started
    assert proc.exit_code == 1
    assert "2:4" in proc.stderr and "swarm serve --blocks 2:4" in proc.stderr
    assert elapsed < 2 + 15


def test_concurrent_clients_on_a_small_budget(tiny6, tmp_path):
    """8 clients at once; the small server holds 2 sessions of 64 tokens, the rest go elsewhere or
    wait; every output is right and the small server's budget is whole again afterwards."""
    cfg = GenerationConfig(max_new_tokens=24, eos_token_ids=())
    client_model = ClientModel.load(tiny6)
    prompt = client_model.encode(PROMPT)
    budget = 2 * (len(prompt) + 24)
    (tmp_path / "big").mkdir()
    with running_swarm(tiny6, ["0:6"], tmp_path, extra=("--cache-tokens", str(budget))) as small:
        with running_swarm(tiny6, ["0:6"], tmp_path / "big", extra=("--initial-peers", small[0].maddr)) as big:
            results, errors = {}, []

            def one(i):
                try:
                    results[i] = swarm_generate(tiny6, small[0].maddr, cfg, wait_timeout=60.0)
                except Exception as exc:  # collected and asserted below
                    errors.append(repr(exc))

            threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=240)
            deadline = time.monotonic() + 20
            while True:  # `swarm status --json`, in this process: a poll every 0.1 s
                status = json.loads(cli(["status", "--json", "--initial-peers", small[0].maddr], tmp_path).stdout)
                left = {s["peer_id"]: s["cache_tokens_left"] for s in status["servers"]}
                if left.get(_peer_of(small[0])) == budget or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert big[0].proc.poll() is None
    expected = generate_local(client_model, prompt, cfg)
    assert not errors, errors
    assert len(results) == 8 and all(r == expected for r in results.values())
    assert left[_peer_of(small[0])] == budget, "the small server's cache did not return to its full budget"


def test_a_refused_request_fails_at_once_without_banning(tiny6, tmp_path):
    cfg = GenerationConfig(max_new_tokens=4, num_beams=65, eos_token_ids=())  # servers take batch ≤ 64
    with running_swarm(tiny6, ["0:6"], tmp_path) as servers:
        started = time.monotonic()
        with pytest.raises(SwarmError, match="refused the request: batch must be 1..64"):
            swarm_generate(tiny6, servers[0].maddr, cfg, wait_timeout=30.0)
    assert time.monotonic() - started < 15, "a refused request must not wait for a failover"


def test_lost_pushes_are_sent_directly(tiny6, tmp_path, caplog, monkeypatch):
    """Pushes that never arrive (here: routed to a session id the next server does not hold):
    the client sends each overdue step itself, stops asking for pushes after three such steps,
    and the output is unchanged."""
    monkeypatch.setattr("swarm.p2p.chain.PUSH_GRACE", 0.2)
    monkeypatch.setattr("swarm.p2p.chain.FIRST_PUSH_GRACE", 0.2)
    original = RemoteChain._route_after

    def misrouted(self, i):
        route = original(self, i)
        return [{**hop, "session": "0" * 32} for hop in route] if route else route

    monkeypatch.setattr(RemoteChain, "_route_after", misrouted)
    cfg = GenerationConfig(max_new_tokens=10, eos_token_ids=())
    client_model = ClientModel.load(tiny6)
    expected = generate_local(client_model, client_model.encode(PROMPT), cfg)
    with running_swarm(tiny6, ["0:2", "2:4", "4:6"], tmp_path) as servers:
        with caplog.at_level(logging.INFO, logger="swarm.client"):
            tokens = swarm_generate(tiny6, servers[0].maddr, cfg)
    assert tokens == expected
    assert "no reply to a pushed step within 0.20 s; sending the step to each server directly" in caplog.text
    assert "3 times in a row: this chain stops asking servers to push" in caplog.text
