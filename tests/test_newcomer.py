"""What a newcomer tripped on, each fixed and kept fixed: an unusable SWARM_HOME, flags shown as
if they took a value, no --version, a malformed --initial-peers taken for an unreachable swarm, a
data file with a byte-order mark, `swarm status --watch | head -1` failing, one model under two
names (the id in `swarm status`, the directory's name in the API). Commands run in this process
(typer's runner), but for the pipe, which needs a real process and a real swarm."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console
from typer.testing import CliRunner

import swarm
from swarm.cli.main import app
from swarm.cli.render import status_view
from swarm.engine.default_model import HomeError, usable_home
from swarm.engine.finetune_data import read_jsonl
from swarm.launch import READY  # the ready line, as scripts and tests read it
from swarm.p2p.server_handle import ready_line
from swarm.p2p.status import status_report
from swarm.p2p.table import MAX_NAME, ServerInfo, model_name
from swarm_utils import running_swarm, swarm_cmd, swarm_env

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


@pytest.mark.parametrize("path, name", [
    ("/data/models/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"),
    ("/data/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/0123abcd", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("/data/hub/models--gpt2/snapshots/0123abcd", "gpt2"),
    ("/data/models/llama/../SmolLM2", "SmolLM2"),
])
def test_model_name_is_the_directory_or_the_hub_repo(path, name):
    assert model_name(Path(path)) == name


def test_an_announced_model_name_is_checked_and_optional():
    """Servers announce the model's name; a peer is a stranger, so it must be printable and short,
    and an announcement without it (a server of an earlier version) still counts."""
    info = ServerInfo(peer_id="p", addrs=(), model="llama-0123", start=0, end=2, model_name="SmolLM2-135M-Instruct")
    wire = info.to_wire()
    assert ServerInfo.from_wire(wire, received=0.0) == info
    assert ServerInfo.from_wire({k: v for k, v in wire.items() if k != "model_name"}).model_name == ""
    for bad in ["evil\x1b[2Jname", "two\nlines", 42, ["x"]]:
        assert ServerInfo.from_wire({**wire, "model_name": bad}).model_name == ""
    assert ServerInfo.from_wire({**wire, "model_name": "n" * 1000}).model_name == "n" * MAX_NAME
    assert ServerInfo.from_wire({**wire, "public_name": "\x1b]0;owned\x07"}).public_name == ""


def test_status_shows_the_name_beside_the_id():
    info = ServerInfo(peer_id="p", addrs=(), model="llama-0123", start=0, end=2, model_name="SmolLM2-135M-Instruct")
    data = status_report("llama-0123", 2, {"p": info}, {"p": 0.001}, model_name="SmolLM2-135M-Instruct")
    assert (data["model"], data["model_name"]) == ("llama-0123", "SmolLM2-135M-Instruct")

    def title(data: dict) -> str:
        console = Console(width=200, file=io.StringIO())
        console.print(status_view(data))
        return console.file.getvalue().splitlines()[0].strip()

    assert title(data) == "SmolLM2-135M-Instruct (llama-0123) — 2 blocks"
    assert title({**data, "model_name": "[bold]x[/bold]"}) == "[bold]x[/bold] (llama-0123) — 2 blocks"  # not markup
    assert title({**data, "model_name": ""}) == "llama-0123 — 2 blocks"  # no server announced a name


def test_the_ready_line_names_the_model_and_still_parses():
    """`swarm serve`'s ready line puts the name first: scripts' pattern still reads the id and address."""
    server = SimpleNamespace(model_name="SmolLM2-135M-Instruct", model="llama-0123", start_block=0, end_block=4,
                             addrs=["/ip6/::1/tcp/5/p2p/" + PEER, "/ip4/127.0.0.1/tcp/5/p2p/" + PEER])
    line = ready_line(server)
    assert line.startswith("SmolLM2-135M-Instruct: serving blocks 0:4 of llama-0123 at /ip4/127.0.0.1/tcp/5/p2p/")
    match = READY.search(line)  # as scripts, benchmarks and tests wait for it
    assert match.groups() == ("0", "4", "llama-0123", "/ip4/127.0.0.1/tcp/5/p2p/" + PEER)


@pytest.mark.slow
def test_status_watch_into_a_closed_pipe_ends_with_the_last_status(tmp_path, tiny_checkpoints):
    """`swarm status --watch --json | head -1`: the reader leaves after one line; status ends at its
    next write with the last refresh's exit status (3: gaps), not 1 (kept for an unreachable swarm),
    and nothing on stderr (no traceback, no "Exception ignored" from the exit's flush).

    On the way, one model, one name: `swarm status` and its JSON name the model as the API does
    (its directory's name), beside the id."""
    checkpoint = tiny_checkpoints["llama"]
    with running_swarm(checkpoint, ["0:2"], tmp_path) as servers:
        model = servers[0].model  # the id, read from the server's ready line
        table = CliRunner().invoke(app, ["status", "--initial-peers", servers[0].maddr], env={"COLUMNS": "200"})
        assert table.exit_code == 3 and f"{checkpoint.name} ({model}) — 4 blocks" in table.stdout, table.output
        args = ["status", "--json", "--watch", "--interval", "0.1", "--initial-peers", servers[0].maddr]
        proc = subprocess.Popen(swarm_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=swarm_env(tmp_path))
        try:
            first = proc.stdout.readline()  # what `head -1` reads before it exits
            proc.stdout.close()
            _, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert json.loads(first)["gaps"] == [[2, 4]]
    assert (json.loads(first)["model"], json.loads(first)["model_name"]) == (model, checkpoint.name)
    assert proc.returncode == 3 and stderr.decode().strip() == "", stderr.decode()
