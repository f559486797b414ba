"""Real `swarm serve` processes on loopback for tests: started, awaited by their ready line, always
cleaned up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from swarm import launch
from swarm.launch import ServeProcess


def swarm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "swarm.cli.main", *args]


def swarm_env(home: Path) -> dict:
    return {**os.environ, "SWARM_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


class ServerProcess(ServeProcess):
    """A :class:`ServeProcess` the tests' way: ``home`` is its SWARM_HOME (offline), its log
    ``home/NAME.log``; ``prefix``: a command it runs under, e.g. ``ip netns exec NS``."""

    def __init__(self, args: list[str], home: Path, name: str, prefix: tuple[str, ...] = ()):
        super().__init__(args, env=swarm_env(home), log=home / f"{name}.log", prefix=prefix)

    def wait_ready(self, timeout: float = 60.0) -> str:
        return super().wait_ready(timeout)


@contextmanager
def running_swarm(model: Path | str, ranges: list[str], home: Path, extra: tuple[str, ...] = ()):
    """:func:`swarm.launch.running_swarm` announcing every second, offline, 60 s to start each."""
    with launch.running_swarm(model, ranges, home, ("--announce-period", "1", *extra), env=swarm_env(home),
                              timeout=60.0) as servers:
        yield servers


def run_swarm(args: list[str], home: Path, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run(swarm_cmd(*args), capture_output=True, text=True, timeout=timeout, env=swarm_env(home))


def generate_json(args: list[str], home: Path) -> dict:
    proc = run_swarm(["generate", "--json", *args], home)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def cli(args: list[str], home: Path | None = None):
    """`swarm ARGS` run in this process (typer's CliRunner): the same command, without the seconds a
    new interpreter spends importing torch; for tests about what a command does, not about its
    process (signals, a fresh interpreter's stderr). ``home``: its SWARM_HOME. Returns click's
    Result (exit_code, stdout, stderr); a crash (an exception other than the command's exit) is
    raised, so an error message is always the command's own."""
    from typer.testing import CliRunner

    from swarm.cli.main import app

    result = CliRunner().invoke(app, args, env={"SWARM_HOME": str(home)} if home is not None else None)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def cli_json(args: list[str], home: Path | None = None) -> dict:
    """`swarm generate --json ARGS` run in this process (:func:`cli`): its JSON output."""
    result = cli(["generate", "--json", *args], home)
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def local_json(args: list[str]) -> dict:
    """`swarm generate --local --json ARGS` run in this process (:func:`cli`): the reference swarm
    output must equal."""
    return cli_json(["--local", *args])


def swarm_generate(model_dir, initial_peer: str, cfg, on_token=None, *, prompt: str = "The capital of France is",
                   adapter=None, wait_timeout: float | None = None, **options) -> list[int]:
    """Generate through the swarm in this process with a :class:`swarm.Swarm` (``adapter``: one
    from ``load_adapter``, or None; ``options``: :class:`swarm.ClientOptions`' fields,
    ``wait_timeout`` its ``timeout``); ``on_token(i, chain)`` runs after token i with the chain
    serving it."""
    from swarm.config import ClientOptions
    from swarm.engine.client import ClientModel
    from swarm.facade import Swarm

    if wait_timeout is not None:
        options["timeout"] = wait_timeout
    client_model = ClientModel.load(model_dir)
    chains, count = [], []

    def hook(token):
        count.append(token)
        if on_token is not None:
            on_token(len(count), chains[-1])

    with Swarm(ClientOptions(model=str(model_dir), initial_peers=(initial_peer,), **options), client_model, adapter) as s:
        return s.generate_ids(client_model.encode(prompt), cfg, hook, chains.append)


def clone_session(session):
    """A copy of a batch-1 KV session (its caches and length), to step twice from the same state."""
    import torch

    copy = type(session)(None, batch=1, max_length=session.max_length, layers=[], dtype=torch.float32)
    copy.keys = [k.clone() for k in session.keys]
    copy.values = [v.clone() for v in session.values]
    copy.length = session.length
    return copy


def lora_grads(head, blocks, ids, tensors, spec):
    """The next-token loss of ``ids`` through ``head`` and ``blocks`` (local or remote) with the LoRA
    ``tensors`` (copies) lent, and each tensor's gradient: ``(loss, {name: grad})``."""
    import torch.nn.functional as F

    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}
    logits = head.logits(blocks(head.embed(ids), leaves, spec))
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.item(), {k: v.grad for k, v in leaves.items()}


def assert_batched_steps_equal_alone(blocks) -> None:
    """Four sessions of ``blocks`` (attached) at different lengths: each one's step, batched with
    the others' in one pass, is bit-identical to the same step alone."""
    import torch

    hidden = blocks.config.hidden_size
    torch.manual_seed(0)
    sessions = []
    with torch.no_grad():
        for length in (3, 9, 1, 12):
            session = blocks.open_session(1, 40)
            blocks(torch.randn(1, length, hidden), session)
            sessions.append(session)
        steps = [torch.randn(1, seq, hidden) for seq in (1, 4, 1, 1)]
        alone = [blocks.run_batch([(h, clone_session(s))])[0] for h, s in zip(steps, sessions)]
        batched = blocks.run_batch([(h, clone_session(s)) for h, s in zip(steps, sessions)])
    for i, (a, b) in enumerate(zip(alone, batched)):
        assert torch.equal(a, b), f"session {i} differs when batched"
