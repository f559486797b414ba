"""Emulated Internet hosts on one Linux machine, for tests and benchmarks (needs root).

Each host is a network namespace with one interface (``eth0``, address ``10.77.0.N/24``) on a veth
pair whose other end is a port of a bridge living in a namespace of its own: nothing of the
machine's own network is touched. A host's link can be

- shaped: ``tc`` tbf at the same rate on both ends of its veth (its upload and its download);
- cut: ``ip link set eth0 down`` (packets vanish; TCP peers see silence, not a reset);
- delayed, by a :class:`Relay`: this kernel has no netem, so latency is emulated in user space by a
  TCP relay run in the host's namespace, listening on its address and forwarding to a local
  port. It holds each direction's bytes for the one-way delay (in order, without limiting the
  rate). A server behind it listens on 127.0.0.1 and announces the relay (``--announce-addr``),
  so every connection to it crosses the relay: A to B costs the delay of B's relay, and a round
  trip twice that.

    with Lab() as lab:
        a, b = lab.add_host("a", mbit=100), lab.add_host("b")
        proc = lab.popen(a, ["python", "-m", "swarm.cli.main", "serve", ...])

The relay also runs alone: ``python scripts/netlab.py relay --listen IP:PORT --to IP:PORT
--delay-ms D``; it prints ``relay ready`` once listening and takes ``delay MS`` lines on stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.77.0"
PREFIX = "swarmlab"  # namespaces: swarmlab<pid>-<host>, swarmlab<pid>-br
CHUNK = 1 << 16
RELAY_BUFFER = 64 << 20  # bytes held per direction before the relay stops reading (backpressure)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run as root to include this)"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "the ip and tc commands (iproute2) are missing"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def sh(*argv: str) -> str:
    """Run a command; its stdout, or RuntimeError with its stderr."""
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


@dataclass
class NetHost:
    name: str
    ns: str
    ip: str
    port: str  # the bridge's end of its veth (in the lab's bridge namespace); "" behind a router
    procs: list[subprocess.Popen] = field(default_factory=list)
    router: NetHost | None = None  # the NAT it sits behind (None: on the public bridge)
    lan: str = ""  # a router's: its LAN's first three octets
    inside: int = 0  # a router's: hosts behind it so far


class Lab:
    """Hosts on a bridge; :meth:`close` (or leaving the ``with``) kills every process started in
    them and deletes the namespaces, whatever happened before."""

    def __init__(self):
        _remove_stale_labs()
        self.tag = f"{PREFIX}{os.getpid()}"
        self.bridge_ns = f"{self.tag}-br"
        self.hosts: dict[str, NetHost] = {}
        sh("ip", "netns", "add", self.bridge_ns)
        try:
            sh("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_host(self, name: str, mbit: float | None = None, behind: NetHost | None = None) -> NetHost:
        """A new host ``name`` on the bridge (``mbit``: its link's rate, None for unshaped), or
        behind the NAT router ``behind`` (see :meth:`add_router`), on its LAN."""
        if behind is not None:
            host = self._add_behind(name, behind)
            if mbit:
                self.shape(host, mbit)
            return host
        n = len([h for h in self.hosts.values() if h.router is None]) + 1
        host = NetHost(name, f"{self.tag}-{name}", f"{SUBNET}.{n}", f"p{n}")
        self.hosts[name] = host
        sh("ip", "netns", "add", host.ns)
        sh("ip", "-n", self.bridge_ns, "link", "add", host.port, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
        sh("ip", "-n", self.bridge_ns, "link", "set", host.port, "master", "br0", "up")
        sh("ip", "-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        sh("ip", "-n", host.ns, "link", "set", "eth0", "up")
        sh("ip", "-n", host.ns, "link", "set", "lo", "up")
        if mbit:
            self.shape(host, mbit)
        return host

    def add_router(self, name: str, hole_punching: bool = True) -> NetHost:
        """A NAT router ``name`` on the bridge (a host with a public address) for hosts put behind
        it (:meth:`add_host` with ``behind``): their connections leave with its address
        (nftables masquerade), and nothing from the public side reaches them unasked.
        ``hole_punching``: connections the public side starts are dropped silently (as most home
        routers do: simultaneous opens then get through); False: the router answers them with a
        reset and picks random source ports, which defeats hole punching (only relays get through)."""
        router = self.add_host(name)
        router.lan = f"192.168.{len([h for h in self.hosts.values() if h.lan]) + 1}"
        sh("ip", "netns", "exec", router.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        ports = "" if hole_punching else " random"
        refuse = "drop" if hole_punching else "reject with tcp reset"
        rules = f"""
table ip nat {{
  chain post {{
    type nat hook postrouting priority 100 ;
    oifname "eth0" masquerade{ports}
  }}
}}
table inet filter {{
  chain input {{
    type filter hook input priority 0 ; policy accept ;
    iifname "eth0" ct state new {refuse}
  }}
  chain forward {{
    type filter hook forward priority 0 ; policy accept ;
    iifname "eth0" ct state new {refuse}
  }}
}}
"""
        done = subprocess.run(["ip", "netns", "exec", router.ns, "nft", "-f", "-"], input=rules, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"nft in {router.ns}: {done.stderr.strip()}")
        return router

    def _add_behind(self, name: str, router: NetHost) -> NetHost:
        router.inside += 1
        n = router.inside
        host = NetHost(name, f"{self.tag}-{name}", f"{router.lan}.{n + 1}", "", router=router)
        self.hosts[name] = host
        sh("ip", "netns", "add", host.ns)
        inner = f"lan{n}"
        sh("ip", "-n", router.ns, "link", "add", inner, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
        if n == 1:
            sh("ip", "-n", router.ns, "link", "add", "lanbr", "type", "bridge")
            sh("ip", "-n", router.ns, "addr", "add", f"{router.lan}.1/24", "dev", "lanbr")
            sh("ip", "-n", router.ns, "link", "set", "lanbr", "up")
        sh("ip", "-n", router.ns, "link", "set", inner, "master", "lanbr", "up")
        sh("ip", "-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        sh("ip", "-n", host.ns, "link", "set", "eth0", "up")
        sh("ip", "-n", host.ns, "link", "set", "lo", "up")
        sh("ip", "-n", host.ns, "route", "add", "default", "via", f"{router.lan}.1")
        return host

    def shape(self, host: NetHost, mbit: float | None) -> None:
        """Limit ``host``'s link to ``mbit`` Mbit/s each way (None: no limit)."""
        ends = [(host.ns, "eth0")] + ([(self.bridge_ns, host.port)] if host.port else [])
        for ns, dev in ends:
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)
            if mbit:
                burst = max(64 << 10, int(mbit * 1e6 / 8 * 0.002))  # 2 ms of traffic, at least a GSO packet
                sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                   "rate", f"{mbit}mbit", "burst", str(burst), "latency", "50ms")

    def set_link(self, host: NetHost, up: bool) -> None:
        sh("ip", "-n", host.ns, "link", "set", "eth0", "up" if up else "down")

    def cmd(self, host: NetHost, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", host.ns, *argv]

    def popen(self, host: NetHost, argv: list[str], prefix: list[str] = (), **kw) -> subprocess.Popen:
        """Start ``argv`` on ``host`` (killed by :meth:`close` if still running); ``prefix`` runs
        outside the namespace first (e.g. a shell entering a cgroup, which ``ip netns exec`` would
        hide by mounting its own /sys)."""
        proc = subprocess.Popen([*prefix, *self.cmd(host, argv)], **kw)
        host.procs.append(proc)
        return proc

    def close(self) -> None:
        namespaces = [h.ns for h in self.hosts.values()] + [self.bridge_ns]
        for host in self.hosts.values():
            for proc in host.procs:
                if proc.poll() is None:
                    proc.terminate()
        deadline = time.monotonic() + 10
        for host in self.hosts.values():
            for proc in host.procs:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for ns in namespaces:
            _delete_namespace(ns)
        self.hosts.clear()


def _delete_namespace(ns: str) -> None:
    """Kill what still runs in ``ns`` (started by hand, or orphaned) and delete it."""
    for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _remove_stale_labs() -> None:
    """Delete the namespaces of labs whose process is gone (killed before it could clean up)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    for ns in (line.split()[0] for line in listed if line.strip()):
        owner = ns.split("-", 1)[0][len(PREFIX):]
        if ns.startswith(PREFIX) and "-" in ns and owner.isdigit() and not Path(f"/proc/{owner}").exists():
            _delete_namespace(ns)


# ---- the delaying relay -------------------------------------------------------------------------


class Relay:
    """A TCP relay on ``host``: listens on ``host.ip:port`` and forwards to ``127.0.0.1:to_port``
    there, delaying each direction by ``delay_ms`` (changeable with :meth:`set_delay`)."""

    def __init__(self, lab: Lab, host: NetHost, port: int, to_port: int, delay_ms: float):
        self.addr = f"{host.ip}:{port}"
        self.proc = lab.popen(
            host,
            [sys.executable, str(Path(__file__).resolve()), "relay", "--listen", self.addr,
             "--to", f"127.0.0.1:{to_port}", "--delay-ms", str(delay_ms)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        line = self.proc.stdout.readline()
        if not line.startswith("relay ready"):
            raise RuntimeError(f"the relay on {host.name} did not start (exit {self.proc.poll()})")

    def set_delay(self, delay_ms: float) -> None:
        self.proc.stdin.write(f"delay {delay_ms}\n")
        self.proc.stdin.flush()
        if self.proc.stdout.readline().strip() != f"delay {float(delay_ms)}":
            raise RuntimeError("the relay did not take the new delay")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: list[float]) -> None:
    """Copy ``reader`` to ``writer``, each chunk leaving ``delay[0]`` seconds after it arrived."""
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    held = 0
    arrived, room = asyncio.Event(), asyncio.Event()

    async def read() -> None:
        nonlocal held
        while data := await reader.read(CHUNK):
            queue.append((time.monotonic() + delay[0], data))
            held += len(data)
            arrived.set()
            while held > RELAY_BUFFER:
                room.clear()
                await room.wait()
        queue.append((0.0, b""))  # end of stream
        arrived.set()

    async def write() -> None:
        nonlocal held
        while True:
            while not queue:
                arrived.clear()
                await arrived.wait()
            due, data = queue.popleft()
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
            held -= len(data)
            room.set()

    reading = asyncio.create_task(read())
    try:
        await write()
        await reading
    finally:
        reading.cancel()


async def _serve_relay(listen: str, to: str, delay: list[float]) -> None:
    to_host, to_port = to.rsplit(":", 1)

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(to_host, int(to_port)), 10)
        except (OSError, TimeoutError):
            writer.close()
            return
        pipes = [asyncio.create_task(_pipe(reader, up_writer, delay)), asyncio.create_task(_pipe(up_reader, writer, delay))]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in pipes:
                task.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            for w in (writer, up_writer):
                w.close()

    host, port = listen.rsplit(":", 1)
    server = await asyncio.start_server(connection, host, int(port), reuse_address=True)
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    print("relay ready", flush=True)
    async with server:
        while line := await commands.readline():  # stdin closed: the lab is done with us
            words = line.decode().split()
            if len(words) == 2 and words[0] == "delay":
                delay[0] = float(words[1]) / 1e3
                print(f"delay {float(words[1])}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    relay = sub.add_parser("relay", help="a delaying TCP relay (see the module's docstring)")
    relay.add_argument("--listen", required=True, help="IP:PORT to listen on")
    relay.add_argument("--to", required=True, help="IP:PORT to forward to")
    relay.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay of each direction")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve_relay(args.listen, args.to, [args.delay_ms / 1e3]))


if __name__ == "__main__":
    main()
