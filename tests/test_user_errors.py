"""What a user gets for a bad flag or a damaged checkpoint: exit code 1 and one line on stderr
("error: ...") naming the flag or the file and what to do; never a traceback.

The tables run the real commands in this process (typer's runner: fast); a few cases also run as
`swarm` processes, to check the whole path from the entry point to the exit code."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from swarm.cli.main import app
from swarm.engine.default_model import MARKER
from swarm_utils import run_swarm

PROMPT = "The capital of France is"

# a flag out of range: (command and flags, text the error must contain)
FLAGS = [
    (["generate", "--temperature", "nan"], "--temperature"),
    (["generate", "--temperature", "inf"], "--temperature"),
    (["generate", "--temperature", "0"], "--temperature"),
    (["generate", "--top-p", "nan"], "--top-p"),
    (["generate", "--top-p", "0"], "--top-p"),
    (["generate", "--top-k", "-1"], "--top-k"),
    (["generate", "--repetition-penalty", "nan"], "--repetition-penalty"),
    (["generate", "--repetition-penalty", "inf"], "--repetition-penalty"),
    (["generate", "--repetition-penalty", "0"], "--repetition-penalty"),
    (["generate", "--num-beams", "2", "--length-penalty", "nan"], "--length-penalty"),
    (["generate", "--length-penalty", "inf"], "--length-penalty"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--max-new-tokens", "-5"], "--max-new-tokens"),
    (["generate", "--num-beams", "0"], "--num-beams"),
    (["generate", "--sample", "--seed", str(2**70)], "--seed"),
    (["generate", "--step-timeout", "nan"], "--step-timeout"),
    (["generate", "--step-timeout", "0"], "--step-timeout"),
    (["generate", "--timeout", "nan"], "--timeout"),
    (["generate", "--timeout", "-1"], "--timeout"),
    (["generate", "--dtype", "float64"], "--dtype"),
    (["serve", "--cache-tokens", "0"], "--cache-tokens"),
    (["serve", "--cache-tokens", "-1"], "--cache-tokens"),
    (["serve", "--announce-period", "0"], "--announce-period"),
    (["serve", "--announce-period", "nan"], "--announce-period"),
    (["serve", "--idle-timeout", "nan"], "--idle-timeout"),
    (["serve", "--idle-timeout", "0"], "--idle-timeout"),
    (["serve", "--blocks", "5:3"], "START must be less than END"),
    (["serve", "--blocks", "0:2", "--num-blocks", "2"], "--num-blocks"),
    (["serve", "--num-blocks", "99", "--new-swarm", "--choice-delay", "0"], "--num-blocks must be at most this model's 4 blocks"),
    (["serve", "--threads", "0"], "--threads"),
    (["serve", "--port", "-1"], "--port"),
    (["serve", "--new-swarm", "--announce-addr", "/ip4/0.0.0.0/tcp/4000"], "--announce-addr"),
    (["serve", "--new-swarm", "--announce-addr", "10.0.0.2:4000"], "--announce-addr"),
    (["serve", "--new-swarm", "--announce-addr", "/ip4/10.0.0.2/udp/4000"], "--announce-addr"),
    (["serve", "--new-swarm", "--announce-addr", "/ip4/10.0.0.2/tcp/0"], "--announce-addr"),
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--num-blocks", "0"], "--num-blocks"),
    (["serve", "--identity", "."], "--identity"),
    (["serve", "--dtype", "float64", "--new-swarm"], "--dtype"),
    (["serve", "--adapter-memory", "0"], "--adapter-memory"),
    (["serve", "--throughput", "0"], "--throughput"),
    (["serve", "--throughput", "fast"], "--throughput"),
    (["serve", "--balance-period", "0"], "--balance-period"),
    (["serve", "--balance-quality", "1.5"], "--balance-quality"),
    (["serve", "--balance-quality", "nan"], "--balance-quality"),
    (["serve", "--drain-timeout", "-1"], "--drain-timeout"),
    (["serve", "--session-adapter-memory", "-5"], "--session-adapter-memory"),
    (["status", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--interval", "nan"], "--interval"),
    (["status", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--interval", "0"], "--interval"),
]


def _edit_json(name: str, change):
    def damage(directory: Path) -> None:
        data = json.loads((directory / name).read_text())
        change(data)
        (directory / name).write_text(json.dumps(data))

    return damage


def _write(name: str, content: bytes):
    return lambda directory: (directory / name).write_bytes(content)


def _truncate(name: str, keep: float | int):
    def damage(directory: Path) -> None:
        data = (directory / name).read_bytes()
        (directory / name).write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])

    return damage


def _remove(*names: str):
    def damage(directory: Path) -> None:
        for name in names:
            (directory / name).unlink()

    return damage


def _sharded(then=None):
    """The weights split into two shards with an index, as large checkpoints are saved."""

    def damage(directory: Path) -> None:
        tensors = load_file(directory / "model.safetensors")
        (directory / "model.safetensors").unlink()
        names = sorted(tensors)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for shard, keys in shards.items():
            save_file({k: tensors[k] for k in keys}, directory / shard, metadata={"format": "pt"})
        weight_map = {k: shard for shard, keys in shards.items() for k in keys}
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        if then is not None:
            then(directory)

    return damage


# a damaged checkpoint: (case, damage, texts the error must contain)
CHECKPOINTS = [
    ("no hidden_size", _edit_json("config.json", lambda c: c.pop("hidden_size")), ["config.json", "'hidden_size'"]),
    ("no layer count", _edit_json("config.json", lambda c: c.pop("num_hidden_layers")), ["config.json", "num_hidden_layers"]),
    ("zero heads", _edit_json("config.json", lambda c: c.update(num_attention_heads=0)), ["config.json", "attention heads"]),
    ("layers as text", _edit_json("config.json", lambda c: c.update(num_hidden_layers="4")), ["config.json"]),
    ("config not JSON", _write("config.json", b'{"model_type": "llama",'), ["config.json", "not valid JSON"]),
    ("config a list", _write("config.json", b"[1, 2]"), ["config.json", "not an object"]),
    ("weights half", _truncate("model.safetensors", 0.5), ["model.safetensors", "re-download"]),
    ("weights short by a byte", _truncate("model.safetensors", -1), ["model.safetensors", "re-download"]),
    ("weights header cut", _truncate("model.safetensors", 100), ["model.safetensors", "re-download"]),
    ("weights empty", _write("model.safetensors", b""), ["model.safetensors", "re-download"]),
    ("weights garbage", _write("model.safetensors", bytes(range(256)) * 40), ["model.safetensors", "re-download"]),
    ("no weights", _remove("model.safetensors"), ["model.safetensors", "safe_serialization"]),
    ("shapes differ", _edit_json("config.json", lambda c: c.update(intermediate_size=96)), ["block 0", "config.json"]),
    ("more layers", _edit_json("config.json", lambda c: c.update(num_hidden_layers=6)), ["block 4", "config.json"]),
    ("index not JSON", _sharded(_write("model.safetensors.index.json", b"{")), ["model.safetensors.index.json"]),
    ("index no map", _sharded(_write("model.safetensors.index.json", b"{}")), ["model.safetensors.index.json"]),
    ("shard missing", _sharded(_remove("model-00002-of-00002.safetensors")), ["model-00002-of-00002.safetensors"]),
    ("shard cut", _sharded(_truncate("model-00001-of-00002.safetensors", 0.5)), ["model-00001-of-00002.safetensors"]),
    ("no tokenizer", _remove("tokenizer.json", "tokenizer_config.json"), ["no tokenizer files", "tokenizer.json"]),
    ("tokenizer not JSON", _write("tokenizer.json", b"{garbage"), ["tokenizer files", "could not be loaded"]),
    ("generation config not JSON", _write("generation_config.json", b"{"), ["generation_config.json", "not valid JSON"]),
]


def _damaged(base: Path, root: Path, case: str, damage) -> Path:
    directory = root / case.replace(" ", "-")
    if not directory.exists():
        shutil.copytree(base, directory)
        damage(directory)
    return directory


def _assert_one_line_error(code: int, stderr: str, *texts: str) -> None:
    assert code == 1, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for text in texts:
        assert text in lines[0], (text, stderr)


def _invoke(args: list[str]):
    result = CliRunner().invoke(app, args)
    # an exception other than the exit itself would be a traceback for a user
    assert isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.mark.parametrize("args, flag", FLAGS, ids=[" ".join(a) for a, _ in FLAGS])
def test_bad_flag_is_one_line(args, flag, tiny_checkpoints):
    command, *flags = args
    if command in ("generate", "serve"):  # a model that loads, so only the flag is wrong
        flags = [*flags, "--model", str(tiny_checkpoints["llama"])]
    if command == "generate":
        flags = [*flags, "--local", PROMPT]
    result = _invoke([command, *flags])
    _assert_one_line_error(result.exit_code, result.stderr, flag)


@pytest.mark.parametrize("case, damage, texts", CHECKPOINTS, ids=[c for c, _, _ in CHECKPOINTS])
def test_damaged_checkpoint_is_one_line(case, damage, texts, tiny_checkpoints, tmp_path_factory):
    model = _damaged(tiny_checkpoints["llama"], tmp_path_factory.getbasetemp() / "damaged", case, damage)
    result = _invoke(["generate", "--local", "--model", str(model), "--max-new-tokens", "2", PROMPT])
    _assert_one_line_error(result.exit_code, result.stderr, str(model), *texts)


def test_damaged_default_model_says_to_convert_it_again(tiny_checkpoints, tmp_path):
    model = tmp_path / "converted"
    shutil.copytree(tiny_checkpoints["llama"], model)
    (model / MARKER).write_text("{}")
    _truncate("model.safetensors", 0.5)(model)
    result = _invoke(["generate", "--local", "--model", str(model), PROMPT])
    _assert_one_line_error(result.exit_code, result.stderr, f"delete {model} and run the command again")


@pytest.mark.slow
def test_processes_print_one_line(tiny_checkpoints, tmp_path_factory, tmp_path):
    root = tmp_path_factory.getbasetemp() / "damaged"
    model = {c: str(_damaged(tiny_checkpoints["llama"], root, c, d)) for c, d, _ in CHECKPOINTS
             if c in ("no hidden_size", "weights half", "no tokenizer")}
    runs = [  # (args, texts the error must contain)
        (["serve", "--model", model["no hidden_size"], "--new-swarm"], ["config.json", "'hidden_size'"]),
        (["serve", "--model", model["weights half"], "--new-swarm"], ["model.safetensors", "re-download"]),
        (["generate", "--local", "--model", model["no tokenizer"], PROMPT], ["no tokenizer files"]),
        (["generate", "--local", "--model", str(tiny_checkpoints["llama"]), "--temperature", "nan", PROMPT],
         ["--temperature"]),
    ]
    with ThreadPoolExecutor(len(runs)) as pool:
        procs = list(pool.map(lambda run: run_swarm(run[0], tmp_path, timeout=120), runs))
    for (args, texts), proc in zip(runs, procs):
        _assert_one_line_error(proc.returncode, proc.stderr, *texts)
