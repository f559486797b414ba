"""`swarm serve` as a user runs it: what -v logs."""

from __future__ import annotations

import re

import pytest

from swarm_utils import cli_json, running_swarm


@pytest.mark.slow
def test_verbose_server_logs_each_session_open_and_close(tmp_path, tiny_checkpoints):
    model = tiny_checkpoints["llama"]
    with running_swarm(model, ["0:4"], tmp_path, extra=("-v",)) as servers:
        cli_json(["--model", str(model), "--initial-peers", servers[0].maddr, "--max-new-tokens", "3", "Hi"], tmp_path)
        servers[0].stop()
        log = servers[0].log_path.read_text()
    opened = re.findall(r"session (\w{8}) opened by \w+: blocks 0:4, batch 1, max_length \d+", log)
    ended = re.findall(r"session (\w{8}) of \w+ ended \(closed\) after 3 steps", log)
    assert opened and opened == ended, log[-2000:]
