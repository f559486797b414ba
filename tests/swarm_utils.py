"""Real `swarm serve` processes on loopback for tests: started, awaited by their ready line, always
cleaned up."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

READY = re.compile(r"serving blocks (\d+):(\d+) of (\S+) at (/ip4/\S+/p2p/\S+)")


def swarm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "swarm.cli.main", *args]


def swarm_env(home: Path) -> dict:
    return {**os.environ, "SWARM_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


class ServerProcess:
    """One `swarm serve` process; its stderr goes to a log file next to its identity."""

    def __init__(self, args: list[str], home: Path, name: str, prefix: tuple[str, ...] = ()):
        """``prefix``: a command the server runs under, e.g. ``ip netns exec NS``."""
        self.log_path = home / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [*prefix, *swarm_cmd("serve", *args)], stdout=subprocess.PIPE, stderr=self._log, text=True, env=swarm_env(home)
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.maddr = ""
        self.blocks: tuple[int, int] = (0, 0)

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_ready(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"server not ready in {timeout}s; log:\n{self.log()}")
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"server exited with {self.proc.wait()}; log:\n{self.log()}")
            match = READY.search(line)
            if match:
                self.blocks = (int(match.group(1)), int(match.group(2)))
                self.maddr = match.group(4)
                return self.maddr

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextmanager
def running_swarm(model: Path | str, ranges: list[str], home: Path, extra: tuple[str, ...] = ()):
    """Servers for ``ranges`` ("0:2", "auto", ...), the first with --new-swarm and the rest with
    --initial-peers of the first. The rest start together once the first is ready, or one after
    another when some range is ``auto`` (each then picks its blocks knowing the ones before).
    Yields the list of processes."""
    servers: list[ServerProcess] = []
    together = "auto" not in ranges
    try:
        for i, blocks in enumerate(ranges):
            args = ["--model", str(model), "--blocks", blocks, "--identity", str(home / f"id-{i}.key"),
                    "--announce-period", "1", *extra]
            if blocks == "auto":
                args += ["--choice-delay", "0"]  # started one after another already
            args += ["--new-swarm"] if i == 0 else ["--initial-peers", servers[0].maddr]
            server = ServerProcess(args, home, f"server-{i}")
            servers.append(server)
            if i == 0 or not together:
                server.wait_ready()
        for server in servers[1:] if together else []:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def run_swarm(args: list[str], home: Path, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run(swarm_cmd(*args), capture_output=True, text=True, timeout=timeout, env=swarm_env(home))


def generate_json(args: list[str], home: Path) -> dict:
    proc = run_swarm(["generate", "--json", *args], home)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def local_json(args: list[str]) -> dict:
    """`swarm generate --local --json ARGS` run in this process (the same command, without the
    seconds a new interpreter spends importing torch): the reference swarm output must equal."""
    from typer.testing import CliRunner

    from swarm.cli.main import app

    result = CliRunner().invoke(app, ["generate", "--local", "--json", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def swarm_generate(model_dir, initial_peer: str, cfg, on_token=None, *, prompt: str = "The capital of France is",
                   adapter=None, **client_kw) -> list[int]:
    """Generate through the swarm in this process (``adapter``: one from ``load_adapter``, or
    None); ``on_token(i, chain)`` runs after token i with the chain serving it."""
    from swarm.engine.client import ClientModel
    from swarm.p2p.client import ClientConfig, generate_swarm
    from swarm.p2p.table import model_id

    client_model = ClientModel.load(model_dir)
    chains, count = [], []

    def hook(token):
        count.append(token)
        if on_token is not None:
            on_token(len(count), chains[-1])

    ccfg = ClientConfig(initial_peers=[initial_peer], **client_kw)
    return generate_swarm(client_model, model_id(client_model.checkpoint), client_model.encode(prompt), cfg, ccfg,
                          hook, chains.append, adapter=adapter)
