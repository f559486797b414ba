"""swarm.launch: the ready line it waits for, and how starting a server fails (an exit, a deadline)
with the server's log in the error. A server that does serve is what every multi-process test runs."""

from __future__ import annotations

import time

import pytest

from swarm.launch import READY, ServeError, ServeProcess, even_ranges
from swarm_utils import swarm_env

PEER = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"


@pytest.mark.parametrize("line, groups", [
    (f"serving blocks 0:10 of llama-0123 at /ip4/127.0.0.1/tcp/5/p2p/{PEER}\n",
     ("0", "10", "llama-0123", f"/ip4/127.0.0.1/tcp/5/p2p/{PEER}")),
    (f"SmolLM2: serving blocks 10:20 of llama-0123 at /ip4/10.0.0.2/tcp/4001/p2p/{PEER} (also at /ip6/::1/tcp/4001)\n",
     ("10", "20", "llama-0123", f"/ip4/10.0.0.2/tcp/4001/p2p/{PEER}")),
    (f"serving blocks 0:4 of m at /ip6/::1/tcp/5/p2p/{PEER}\n", ("0", "4", "m", f"/ip6/::1/tcp/5/p2p/{PEER}")),
])
def test_the_ready_line(line, groups):
    assert READY.search(line).groups() == groups


@pytest.mark.parametrize("num_blocks, parts, ranges", [
    (30, 3, ["0:10", "10:20", "20:30"]),
    (4, 3, ["0:1", "1:2", "2:4"]),
    (22, 1, ["0:22"]),
    (5, 2, ["0:2", "2:5"]),
])
def test_even_ranges(num_blocks, parts, ranges):
    assert even_ranges(num_blocks, parts) == ranges


def test_a_server_that_exits_first_is_an_error_with_its_log(tmp_path):
    server = ServeProcess(["--model", str(tmp_path / "missing"), "--new-swarm"], env=swarm_env(tmp_path),
                          log=tmp_path / "server.log")
    try:
        with pytest.raises(ServeError, match="exited with 1 before it served") as caught:
            server.wait_ready(timeout=60)
        assert "missing" in str(caught.value)  # the one-line error `swarm serve` printed
    finally:
        assert server.stop() == 1


def test_a_server_not_ready_by_the_deadline_is_an_error_and_stops(tmp_path):
    # a prefix that becomes `sleep` instead of running the server: no ready line ever comes
    server = ServeProcess(["--new-swarm"], env=swarm_env(tmp_path), log=tmp_path / "server.log",
                          prefix=["sh", "-c", "exec sleep 60", "sh"])
    began = time.monotonic()
    try:
        with pytest.raises(ServeError, match="did not serve within 0.3 s"):
            server.wait_ready(timeout=0.3)
        assert time.monotonic() - began < 5
    finally:
        assert server.stop() != 0  # SIGTERM ended the wait
    assert server.proc.poll() is not None
