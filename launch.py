"""`swarm serve` processes started from a program, awaited until they serve, always stopped: what the
tests, benchmarks and demos use to stand up a swarm on one machine (or on emulated hosts).

A server prints one line on stdout once its blocks are loaded and it is reachable::

    SmolLM2-135M-Instruct: serving blocks 0:10 of llama-82641b35383e5806 at /ip4/127.0.0.1/tcp/4001/p2p/12D3... (also at ...)

:data:`READY` reads it; :class:`ServeProcess` starts one server and waits for that line with a
deadline; :func:`running_swarm` starts several joined into one swarm and stops them on the way out::

    with running_swarm(model_dir, ["0:10", "10:20", "20:30"], home) as servers:
        peers = [servers[0].maddr]   # give these to a client

Everything here runs ``python -m swarm.cli.main serve`` with this interpreter, so a server runs the
same code as its caller.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

# groups: first block, end block, the model's id, the first announced multiaddr
READY = re.compile(r"serving blocks (\d+):(\d+) of (\S+) at (/\S+)")


class ServeError(RuntimeError):
    """A server exited, or did not print its ready line in time; the message ends with its log."""


def even_ranges(num_blocks: int, parts: int) -> list[str]:
    """``parts`` contiguous block ranges covering ``num_blocks``, as even as integers allow:
    ``even_ranges(30, 3) == ["0:10", "10:20", "20:30"]``."""
    cuts = [i * num_blocks // parts for i in range(parts + 1)]
    return [f"{a}:{b}" for a, b in zip(cuts, cuts[1:])]


def serve_command(*args: str) -> list[str]:
    """The command line of `swarm serve ARGS` run by this interpreter."""
    return [sys.executable, "-m", "swarm.cli.main", "serve", *args]


class ServeProcess:
    """One `swarm serve ARGS` process.

    ``env``: its whole environment (None: this process's); ``log``: a file for its stderr (None: it
    shares this process's stderr), read back into the error when it fails to start; ``prefix``: a
    command it runs under, e.g. ``ip netns exec NS`` or a shell entering a cgroup. Its stdout is
    read on a thread from the start, so the server never blocks on a full pipe.

    Call :meth:`wait_ready`, then read :attr:`maddr` (where to reach it) and :attr:`blocks`;
    :meth:`stop` (or leaving a ``with``) ends it.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log: Path | str | None = None,
        prefix: Sequence[str] = (),
    ):
        self.log_path = Path(log) if log is not None else None
        self._log = open(self.log_path, "w") if self.log_path else None  # noqa: SIM115  (closed by stop)
        try:
            self.proc = subprocess.Popen(
                [*prefix, *serve_command(*args)], stdout=subprocess.PIPE, stderr=self._log, text=True,
                env=dict(env) if env is not None else None,
            )
        except BaseException:
            if self._log:
                self._log.close()
            raise
        self.maddr = ""  # the first announced multiaddr, once ready
        self.blocks: tuple[int, int] = (0, 0)  # [start, end), once ready
        self.model = ""
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 120.0) -> str:
        """Wait for the ready line; return :attr:`maddr`. :class:`ServeError` when the server exits
        first or ``timeout`` seconds pass (the server is then left running: :meth:`stop` it)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise ServeError(f"swarm serve exited with {self.proc.wait()} before it served:\n{self.log()}")
            if match := READY.search(line):
                self.blocks = (int(match.group(1)), int(match.group(2)))
                self.model, self.maddr = match.group(3), match.group(4)
                return self.maddr
        raise ServeError(f"swarm serve did not serve within {timeout:g} s:\n{self.log()}")

    def log(self, chars: int = 4000) -> str:
        """The end of its log file ("" without one)."""
        if self.log_path is None:
            return ""
        if self._log and not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM: it announces itself offline and exits); :meth:`stop` waits."""
        if self.proc.poll() is None:
            self.proc.terminate()

    def stop(self, timeout: float = 15.0) -> int:
        """Terminate it and wait (SIGKILL after ``timeout`` seconds); its exit code."""
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._log:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def running_swarm(
    model: Path | str,
    ranges: Sequence[str],
    home: Path | str,
    extra: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> Iterator[list[ServeProcess]]:
    """Servers of ``model`` for ``ranges`` ("0:10", "auto", ...), the first with --new-swarm and the
    rest with --initial-peers of the first, each with ``extra`` flags. In ``home``: their identities
    (``id-I.key``) and logs (``server-I.log``); ``env`` (default: this process's with SWARM_HOME set
    to ``home``). The rest start together once the first serves, or one after another when some
    range is ``auto`` (each then picks its blocks knowing the ones before).

    Yields the processes, ready; stops them all on the way out, also when one fails to start
    (:class:`ServeError` after ``timeout`` seconds per server)."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    env = dict(env) if env is not None else {**os.environ, "SWARM_HOME": str(home)}
    servers: list[ServeProcess] = []
    together = "auto" not in ranges
    try:
        for i, blocks in enumerate(ranges):
            args = ["--model", str(model), "--blocks", blocks, "--identity", str(home / f"id-{i}.key"), *extra]
            if blocks == "auto":
                args += ["--choice-delay", "0"]  # started one after another already
            args += ["--new-swarm"] if i == 0 else ["--initial-peers", servers[0].maddr]
            servers.append(ServeProcess(args, env=env, log=home / f"server-{i}.log"))
            if i == 0 or not together:
                servers[-1].wait_ready(timeout)
        for server in servers[1:] if together else []:
            server.wait_ready(timeout)
        yield servers
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.stop()
