"""What a newcomer tripped on, each fixed and kept fixed: an unusable SWARM_HOME, flags shown as
if they took a value, no --version, a malformed --initial-peers taken for an unreachable swarm, a
data file with a byte-order mark. Every command runs in this process (typer's runner)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import swarm
from swarm.cli.main import app
from swarm.engine.default_model import HomeError, usable_home
from swarm.engine.finetune_data import read_jsonl

COMMANDS = ["serve", "generate", "finetune", "api", "status"]
PEER = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"


def _one_line_error(result) -> str:
    """The error line of a command that failed as a user's mistake should: exit 1, no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output and not isinstance(result.exception, AssertionError)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _invocations(tmp_path) -> dict[str, list[str]]:
    """Each command as a newcomer first runs it, on the default model (nothing given but what it needs)."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "The capital of France is Paris."}\n')
    return {
        "generate": ["generate", "--local", "Hi"],
        "finetune": ["finetune", "--local", str(data), "--output", str(tmp_path / "out")],
        "api": ["api", "--local", "--port", "0"],
        "serve": ["serve", "--new-swarm", "--blocks", "0:1"],
    }


@pytest.mark.parametrize("home_of", [lambda f: f / "sub", lambda f: f], ids=["file-above", "file-itself"])
def test_an_unusable_swarm_home_is_one_line_naming_it(tmp_path, home_of):
    """A regular file in SWARM_HOME's path: every command that writes there says so in one line,
    naming SWARM_HOME, the file and what to do, before anything loads."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    home = home_of(blocker)
    for name, args in _invocations(tmp_path).items():
        line = _one_line_error(CliRunner().invoke(app, args, env={"SWARM_HOME": str(home), "SWARM_INITIAL_PEERS": ""}))
        assert f"SWARM_HOME={home} is not a usable directory ({blocker} is a file)" in line, (name, line)
        assert "point SWARM_HOME at a writable directory" in line, (name, line)


def test_usable_home_creates_the_directory_and_refuses_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_HOME", str(tmp_path / "new" / "home"))
    assert usable_home() == tmp_path / "new" / "home" and (tmp_path / "new" / "home").is_dir()
    monkeypatch.setenv("SWARM_HOME", str(tmp_path / "file"))
    (tmp_path / "file").write_text("")
    with pytest.raises(HomeError, match="SWARM_HOME=") as err:
        usable_home()
    assert isinstance(err.value, ValueError)  # what every command already prints as one line


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_shows_no_type_after_a_flag(command):
    """Typer's help printed `--local <bool>` (even `--help <bool>`), as if the flag took a value."""
    args = [command, "--help"] if command else ["--help"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--help" in result.output and "<bool>" not in result.output
    if command in ("generate", "status"):
        assert "<float>" in result.output  # an option that takes a value still shows its type


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"swarm {swarm.__version__}\n"


MALFORMED = ["garbage", "/ip4/999.1.1.1/tcp/1", "/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/tcp/4001/p2p/garbage"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_malformed_initial_peer_is_a_bad_flag_not_an_unreachable_swarm(command, tmp_path, tiny_checkpoints):
    """Each command refuses a malformed --initial-peers (or SWARM_INITIAL_PEERS) up front, naming
    the flag, the value and the form to give, instead of trying it and reporting no answer."""
    model = str(tiny_checkpoints["llama"])
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "The capital of France is Paris."}\n')
    base = {
        "serve": ["serve", "--model", model, "--blocks", "0:2"],
        "generate": ["generate", "--model", model, "Hi"],
        "finetune": ["finetune", "--model", model, str(data), "--output", str(tmp_path / "out")],
        "api": ["api", "--model", model, "--port", "0"],
        "status": ["status"],
    }[command]
    env = {"SWARM_HOME": str(tmp_path / "home"), "SWARM_INITIAL_PEERS": ""}
    for bad in MALFORMED:
        good = f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"
        for args, extra_env in [
            ([*base, "--initial-peers", good, "--initial-peers", bad], {}),  # one bad among good ones
            (base, {"SWARM_INITIAL_PEERS": f"{good},{bad}"}),  # the environment's form
        ]:
            line = _one_line_error(CliRunner().invoke(app, args, env={**env, **extra_env}))
            assert f"--initial-peers {bad}:" in line and "printed by `swarm serve`" in line, (command, line)
            assert "no initial peer answered" not in line


def test_a_data_file_with_a_byte_order_mark_is_read(tmp_path):
    """Editors on Windows start UTF-8 files with a byte-order mark; finetune read it as bad JSON."""
    text = '{"prompt": "Capital of France?", "completion": " Paris"}\n{"text": "Rome"}\n'
    plain, marked = tmp_path / "plain.jsonl", tmp_path / "marked.jsonl"
    plain.write_text(text, encoding="utf-8")
    marked.write_text(text, encoding="utf-8-sig")
    assert marked.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_jsonl(marked) == read_jsonl(plain) and len(read_jsonl(marked)) == 2
