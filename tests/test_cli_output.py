"""What the commands print for scripts and pipes: `swarm status` exits 3 on gaps and, with --watch,
writes a frame (or a JSON line) per refresh when its output is not a terminal; `swarm generate`
output always ends with a newline, also when an error or Ctrl-C cuts it short."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import tempfile
import threading
import time

from typer.testing import CliRunner

import pytest

from swarm.cli.main import app
from swarm.engine.client import ClientModel, generate_local
from swarm.engine.generation import GenerationConfig
from swarm_utils import running_swarm, swarm_cmd, swarm_env

PROMPT = "The capital of France is"


class Run:
    """A `swarm` process whose stdout the test reads as it comes (on a thread, waiting with
    deadlines); its stderr goes to a file, read once it has exited."""

    def __init__(self, args: list[str], home):
        self._stderr = tempfile.TemporaryFile()
        env = {**swarm_env(home), "PYTHONFAULTHANDLER": "1"}  # SIGABRT dumps every thread (see finish)
        self.proc = subprocess.Popen(swarm_cmd(*args), stdout=subprocess.PIPE, stderr=self._stderr, env=env)
        self.stdout, self._chunks = b"", queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            self._chunks.put(chunk)
        self._chunks.put(b"")

    def wait_for(self, done, timeout: float = 60.0) -> bytes:
        """Read stdout until ``done(stdout)`` holds; fails at the deadline or when stdout ends first."""
        deadline = time.monotonic() + timeout
        while not done(self.stdout):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; stdout so far: {self.stdout[-2000:]!r}"
            try:
                chunk = self._chunks.get(timeout=left)
            except queue.Empty:
                continue
            assert chunk, f"stdout ended early (exit {self.proc.wait()}): {self.stdout[-2000:]!r}"
            self.stdout += chunk
        return self.stdout

    def finish(self, timeout: float = 120.0) -> tuple[int, str, str]:
        """Wait for the exit: (exit code, all of stdout, all of stderr). A process still running at
        the deadline (its cleanup after a frozen server takes its timeouts one after another, which
        a loaded machine stretches) is aborted, and the test fails showing where each thread was."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)
            self.proc.wait(30)
            self._stderr.seek(0)
            raise AssertionError(f"no exit within {timeout} s; its threads:\n{self._stderr.read().decode()[-6000:]}") from None
        while chunk := self._chunks.get(timeout=timeout):
            self.stdout += chunk
        self._stderr.seek(0)
        return code, self.stdout.decode(), self._stderr.read().decode()


@pytest.mark.slow
def test_status_exits_3_on_gaps_and_watches_frame_by_frame(tmp_path, tiny_checkpoints):
    with running_swarm(tiny_checkpoints["llama"], ["0:2"], tmp_path) as servers:
        peer = ["--initial-peers", servers[0].maddr]
        table = CliRunner().invoke(app, ["status", *peer])
        assert table.exit_code == 3, table.stderr
        assert "gaps: 2:4" in table.stdout

        data = CliRunner().invoke(app, ["status", "--json", *peer])
        assert data.exit_code == 3, data.stderr
        assert json.loads(data.stdout)["gaps"] == [[2, 4]]

        # both watching processes start together (each spends seconds importing before its first frame)
        watch_json = Run(["status", "--json", "--watch", "--interval", "0.1", *peer], tmp_path)
        watch = Run(["status", "--watch", "--interval", "0.1", *peer], tmp_path)
        try:
            lines = watch_json.wait_for(lambda d: d.count(b"\n") >= 2).splitlines()
            watch_json.proc.send_signal(signal.SIGINT)
            code, _, stderr = watch_json.finish()
            assert [json.loads(line)["gaps"] for line in lines[:2]] == [[[2, 4]], [[2, 4]]]
            assert code == 3 and "Traceback" not in stderr, stderr

            frames = watch.wait_for(lambda d: d.count(b"gaps: 2:4") >= 2).decode()
            watch.proc.send_signal(signal.SIGINT)
            code, _, stderr = watch.finish()
        finally:
            for run in (watch_json, watch):
                if run.proc.poll() is None:
                    run.proc.kill()
                    run.proc.wait()
        assert frames.count("4 blocks") >= 2  # the table's title, once a frame
        assert code == 3 and "Traceback" not in stderr, stderr


def test_generate_output_ends_with_a_newline(tiny_checkpoints):
    args = ["generate", "--local", "--model", str(tiny_checkpoints["llama"]), "--max-new-tokens", "8", PROMPT]
    for extra in ([], ["--num-beams", "3"]):  # streamed, and printed at the end
        data = CliRunner().invoke(app, [*args, *extra, "--json"])
        plain = CliRunner().invoke(app, [*args, *extra])
        assert data.exit_code == plain.exit_code == 0, (data.stderr, plain.stderr)
        assert data.stdout.endswith("}\n")
        assert plain.stdout == json.loads(data.stdout)["text"] + "\n"


@pytest.mark.slow
def test_interrupt_or_error_after_partial_output_ends_the_line(tmp_path, tiny_checkpoints):
    model = tiny_checkpoints["llama"]
    # 240 tokens and no end-of-sequence token on this model: far more than are out when the test acts
    client = ClientModel.load(model)
    local = client.decode(generate_local(client, client.encode(PROMPT), GenerationConfig(max_new_tokens=240)))
    assert len(client.encode(local)) > 100
    with running_swarm(model, ["0:4"], tmp_path) as servers:
        server = servers[0].proc
        args = ["generate", "--model", str(model), "--initial-peers", servers[0].maddr, "--max-new-tokens", "240"]

        # Ctrl-C while the client waits for a frozen server
        run = Run([*args, PROMPT], tmp_path)
        run.wait_for(lambda d: len(d) > 0)
        server.send_signal(signal.SIGSTOP)
        try:
            run.proc.send_signal(signal.SIGINT)
            code, stdout, stderr = run.finish()
        finally:
            server.send_signal(signal.SIGCONT)
        assert code == 130 and "Traceback" not in stderr, stderr
        assert stdout.endswith("\n") and len(stdout) < len(local)

        # an error: the swarm's only server dies
        run = Run([*args, "--timeout", "1", PROMPT], tmp_path)
        run.wait_for(lambda d: len(d) > 0)
        server.kill()
        code, stdout, stderr = run.finish()
    assert code == 1, stderr
    assert stdout.endswith("\n") and len(stdout) < len(local)  # cut short, and the line ended
    assert stderr.strip().splitlines()[-1].startswith("error:") and "0:4" in stderr
