"""`swarm.train.finetune` (``swarm.finetune``): the library call `swarm finetune` runs.

The gates: a bad keyword, bad data and bad values are refused before any model loads, with the
command's messages; the peers fall back to SWARM_INITIAL_PEERS; a local call and the command give
the same adapter; a call through real servers equals a local one and leaves the swarm behind it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import swarm
from conftest import write_tiny_checkpoint
from swarm.cli.main import app
from swarm.engine.finetune_data import DataError
from swarm.train import NO_PEERS, finetune
from swarm_utils import running_swarm

FACTS = Path(__file__).resolve().parents[1] / "scripts" / "data" / "facts.jsonl"
SMALL = {"batch_size": 4, "max_length": 64, "lr": 1e-2, "save_every": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("train") / "llama", "llama")


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(line + "\n" for line in FACTS.read_text().splitlines()[:10]))  # 9 to train on
    return path


def _cli(args: list[str]):
    result = CliRunner().invoke(app, ["finetune", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_it_is_the_package_top_finetune():
    assert swarm.finetune is finetune


def test_an_unknown_keyword_is_a_type_error_listing_the_options(data, tmp_path):
    with pytest.raises(TypeError, match=r"unknown option epoch, learning_rate \(options: .*epochs.*\blr\b.*save_best"):
        finetune(data, output=tmp_path / "o", epoch=1, learning_rate=0.1)


BAD = [
    ({"rank": 0}, ["--rank", "0"], "--rank must be at least 1, got 0"),
    ({"max_steps": 0}, ["--max-steps", "0"], "--max-steps must be at least 1, got 0"),
    ({"step_timeout": 0}, ["--step-timeout", "0"], "--step-timeout must be a number of seconds > 0, got 0"),
    ({"wire_dtype": "fp8"}, ["--wire-dtype", "fp8"], "--wire-dtype must be one of"),
    ({"dtype": "float8"}, ["--dtype", "float8"], "--dtype"),
    ({"save_best": True, "eval_fraction": 0.0}, ["--save-best", "--eval-fraction", "0"], "--save-best keeps"),
    ({"local": False}, [], NO_PEERS),
]


@pytest.mark.parametrize("kw, flags, message", BAD, ids=[b[2].split()[0] for b in BAD])
def test_bad_values_fail_before_the_model_loads_with_the_commands_message(kw, flags, message, data, tmp_path,
                                                                          monkeypatch):
    monkeypatch.delenv("SWARM_INITIAL_PEERS", raising=False)
    missing = str(tmp_path / "no-model")  # never loaded: the checks come first
    base = {"local": True, "model": missing}
    with pytest.raises(ValueError) as caught:
        finetune(data, output=tmp_path / "o", **{**base, **kw})
    assert message in str(caught.value)
    local = [] if kw.get("local") is False else ["--local"]
    result = _cli([str(data), "--output", str(tmp_path / "o"), "--model", missing, *local, *flags])
    assert result.exit_code == 1 and result.stderr.strip() == f"error: {caught.value}", result.stderr
    assert not (tmp_path / "o").exists()


def test_bad_data_is_a_data_error_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "a"}\n')
    with pytest.raises(DataError, match=rf"^{bad}:2: has 'prompt' but no \"completion\""):
        finetune(bad, output=tmp_path / "o", local=True, model=str(tmp_path / "no-model"), rank=0)


def test_initial_peers_fall_back_to_the_environment(data, tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_INITIAL_PEERS", "garbage")
    with pytest.raises(ValueError, match="--initial-peers garbage"):
        finetune(data, output=tmp_path / "o", model=str(tmp_path / "no-model"))


def test_a_local_call_equals_the_command_and_reports_as_it_goes(tiny, data, tmp_path):
    events = []
    result = finetune(data, output=tmp_path / "lib", local=True, model=str(tiny), epochs=2, on_event=events.append,
                      **SMALL)
    assert result.steps == result.total_steps == 6 and result.train_loss_after < result.train_loss_before
    start = events[0]
    assert start["type"] == "start" and start["limit"] == "6 steps (--epochs 2)" and start["adapter"] == "lora"
    assert [e["step"] for e in events if e["type"] == "step"] == list(range(1, 7))
    assert result.best_output == tmp_path / "lib" / "best" and result.best_step is not None

    flags = ["--epochs", "2", "--batch-size", "4", "--max-length", "64", "--lr", "1e-2", "--save-every", "0"]
    cli = _cli([str(data), "--local", "--model", str(tiny), "--output", str(tmp_path / "cli"), "--json", *flags])
    assert cli.exit_code == 0, cli.stderr
    summary = json.loads(cli.stdout)
    assert (summary["steps"], summary["eval_loss_after"]) == (result.steps, result.eval_loss_after)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("lib", "cli"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_swarm_call_through_the_environments_peers_equals_a_local_one(tiny, data, tmp_path, monkeypatch):
    """Two servers (0:2, 2:4), joined through SWARM_INITIAL_PEERS: the adapter equals a local run's
    (to float32 rounding), and the call leaves no thread of its swarm client behind."""
    local = finetune(data, output=tmp_path / "local", local=True, model=str(tiny), max_steps=3, **SMALL)
    with running_swarm(tiny, ["0:2", "2:4"], tmp_path / "home", extra=("--threads", "1")) as servers:
        monkeypatch.setenv("SWARM_INITIAL_PEERS", servers[0].maddr)
        threads = set(threading.enumerate())
        result = finetune(data, output=tmp_path / "swarm", model=str(tiny), max_steps=3, **SMALL)
        deadline = time.monotonic() + 10
        while set(threading.enumerate()) - threads and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not set(threading.enumerate()) - threads, "the swarm client was not closed"
    assert (result.steps, result.best_step) == (local.steps, local.best_step) == (3, 3)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("swarm", "local"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
