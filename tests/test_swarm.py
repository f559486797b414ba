"""Real multi-process swarms on loopback: swarm output equals local output; status; auto blocks.

The servers are `swarm serve` processes; the client commands (`swarm generate`, `swarm status`) run
in this process (:func:`swarm_utils.cli`: the same commands without a fresh interpreter's imports)."""

from __future__ import annotations

import json

import pytest

from conftest import write_tiny_checkpoint
from swarm_utils import cli, cli_json, local_json, running_swarm

PROMPT = "The capital of France is"


@pytest.mark.slow
@pytest.mark.parametrize("family, ranges", [("llama", ["0:2", "2:3", "3:4"]), ("bloom", ["0:1", "1:4"])])
def test_swarm_greedy_equals_local(family, ranges, tmp_path, tiny_checkpoints):
    model = tiny_checkpoints[family]
    local = local_json(["--model", str(model), "--max-new-tokens", "12", PROMPT])
    with running_swarm(model, ranges, tmp_path) as servers:
        remote = cli_json(
            ["--model", str(model), "--initial-peers", servers[0].maddr, "--max-new-tokens", "12", PROMPT], tmp_path
        )
        unpushed = cli_json(
            ["--model", str(model), "--initial-peers", servers[0].maddr, "--max-new-tokens", "12", "--no-push", PROMPT],
            tmp_path,
        )
        beams = cli_json(
            ["--model", str(model), "--initial-peers", servers[-1].maddr, "--max-new-tokens", "8", "--num-beams", "3", PROMPT],
            tmp_path,
        )
    assert remote["token_ids"] == local["token_ids"]
    assert unpushed["token_ids"] == local["token_ids"]
    local_beams = local_json(["--model", str(model), "--max-new-tokens", "8", "--num-beams", "3", PROMPT])
    assert beams["token_ids"] == local_beams["token_ids"]


@pytest.mark.slow
def test_status_and_auto_blocks_cover_a_30_block_model(tmp_path):
    model = write_tiny_checkpoint(tmp_path / "tiny30", "llama", num_hidden_layers=30)
    with running_swarm(model, ["auto", "auto", "auto"], tmp_path, extra=("--num-blocks", "10")) as servers:
        ranges = sorted(s.blocks for s in servers)
        proc = cli(["status", "--json", "--initial-peers", servers[0].maddr], tmp_path)
        assert proc.exit_code == 0, proc.stderr
        status = json.loads(proc.stdout)
    assert ranges == [(0, 10), (10, 20), (20, 30)]
    assert status["num_blocks"] == 30 and status["gaps"] == []
    # the three servers measured the same (cached) throughput: every block is the bottleneck
    assert status["bottleneck"] == {"throughput": min(status["coverage"]), "blocks": [[0, 30]]}
    assert all(s["sessions"] == 0 and s["served"] == 0 for s in status["servers"])
    assert sorted(tuple(s["blocks"]) for s in status["servers"]) == ranges
    assert all(s["state"] == "online" for s in status["servers"])


def test_generate_without_swarm_says_how_to_start_one(tmp_path, tiny_checkpoints):
    proc = cli(["generate", "--model", str(tiny_checkpoints["llama"]), PROMPT], tmp_path)
    assert proc.exit_code == 1
    assert "--initial-peers" in proc.stderr and "swarm serve --new-swarm" in proc.stderr


@pytest.mark.slow
def test_sigterm_announces_offline_and_the_missing_blocks_are_named(tmp_path, tiny_checkpoints):
    """A server stopped (SIGTERM) exits 0 and is gone from the other's table at once; then the
    swarm serves blocks 0:2 only, and `swarm generate` fails naming the missing range and the
    command that serves it."""
    model = tiny_checkpoints["llama"]
    with running_swarm(model, ["0:2", "2:4"], tmp_path) as servers:
        first = servers[0].maddr
        before = json.loads(cli(["status", "--json", "--initial-peers", first], tmp_path).stdout)
        assert servers[1].stop() == 0, servers[1].log()
        # the offline announcement removes it from the first server's table at once (no expiry wait)
        after = json.loads(cli(["status", "--json", "--initial-peers", first], tmp_path).stdout)
        proc = cli(["generate", "--model", str(model), "--initial-peers", first, "--timeout", "1", PROMPT], tmp_path)
    assert len(before["servers"]) == 2
    assert [s["blocks"] for s in after["servers"]] == [[0, 2]] and after["gaps"] == [[2, 4]]
    assert proc.exit_code == 1
    assert "2:4" in proc.stderr and "swarm serve --blocks 2:4" in proc.stderr
