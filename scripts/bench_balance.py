"""Generation tokens/s through 6 servers of unequal speed, placed by the paper's rule vs the naive one.

Six `swarm serve` processes of the default model, each holding ``--num-blocks`` blocks, run on
loopback. To make them really differ in speed on one machine, each runs with one thread in its own
cgroup (v1 ``cpu`` controller) whose CFS quota gives it a share of one core (``--speeds``, in start
order; default 1/2, 1/4, 1/4, 1/8, 1/16, 1/16 of a core: 8× between the fastest and the slowest,
1.25 cores in all, so that with the clients the 2 cores of a small machine are not exhausted and
the quotas, not the scheduler, set each server's speed).

Two swarms of these six servers run side by side (same shares, same start order, same announced
speeds), so that rounds can alternate without restarting anything; the idle swarm costs little
(about 2 % of a core per server, for announcements) and stays inside its own quotas:

* **balanced**: ``--blocks auto --num-blocks N``, started one after another, each waiting for the
  one before to be online; they then rebalance every random 0–2 × ``--balance-period`` and the
  script waits until the placement is stable (all online, no gap, no range changed for 4 periods).
* **naive**: the rule before throughputs were compared, "the least covered range by server count"
  (:func:`swarm.p2p.balance.choose_blocks_naive`). A server cannot be told to use that rule, so
  the script replays it over the same start order (each server sees the ones started before it)
  and starts the servers with the resulting ``--blocks a:b``; explicit ranges never move.

Announced speeds (``--throughput``): ``quota`` (default) measures one block's decode speed here,
unthrottled, with one thread, and announces share × that (``swarm serve --throughput NUMBER``);
servers then start unthrottled and enter their cgroup once ready (a 1/16-core server would spend
half a minute importing PyTorch otherwise). ``eval`` lets each server measure itself under its
quota (``--throughput eval``): closer to a real volunteer, but the whole run takes about 7 minutes
instead of 2–4. (When a server timed only 8 decode steps, a few milliseconds that CFS may let
through in one burst of quota, announcements did not follow the quotas; the measurement now runs
for at least 0.3 s, three CFS periods.)
Without cgroups (not root, no cgroup v1 ``cpu`` controller) the script says so and runs with the
announced figures only: the servers then differ on paper, not in reality.

Measurement: ``--clients`` client processes (started once, each holding one :func:`swarm.open`
client per swarm, joined in the warm-up run and reused, as a program using the facade does)
generate ``--tokens`` tokens greedily from the same prompt at the same time, through one swarm,
then the other, alternating over ``--rounds`` rounds after one warm-up run each (this machine's
speed drifts 10–20 % over minutes). Per run: aggregate tokens/s (all clients' tokens after their first
÷ the span from the earliest first token to the latest last token) and per-client decode tokens/s
(median over clients); the route each client took is printed too. Every client's tokens must be
the same in both placements (greedy: the placement may change speed, never text). Printed: the
medians over rounds, as a markdown table, with each placement's bottleneck from `swarm status`
(the least sum of announced throughputs over a block); written to scripts/results/balance.json
(``--out``).

What it shows: how much generation throughput the placement rule is worth when servers differ in
speed, with the client's routing as it is. What it does not show:

* the swarm's capacity. Clients route for their own least expected latency (announced speed and
  ping) and do not look at load, so concurrent clients crowd onto the fastest chain; a second
  server on a range helps only when its speed ties or a busy server's slow ping sends a client
  elsewhere. The bottleneck is an upper bound that generation reaches only as far as clients
  spread.
* the rule in general. Which placement wins depends on the speeds and the start order: started
  slowest first (1, 1, 2, 4, 4, 8, as in issue 11's acceptance test) with 10 or 15 blocks each, both
  rules give the same ranges. The default order (fastest first) is one where they differ.
* a network. Loopback costs nothing; the servers share one machine's memory bandwidth and
  caches, and the clients' own work (embeddings, LM head) competes with them for the same cores.
  Servers announce every 5 s (the default): at 1 s, gossip alone cost an idle server of this
  6-server swarm 6–9 % of a core, more than the 1/16-core quota.
* a quiet result on a busy machine: other load changes the figures by tens of percent.

    python scripts/bench_balance.py [--rounds 3] [--tokens 24] [--clients 4] [--num-blocks 15]
        [--speeds 0.5,0.25,0.25,0.125,0.0625,0.0625] [--throughput quota|eval] [--balance-period 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import add_out, write_results  # sibling scripts (their folder is on sys.path)
from memcap import in_cgroup

from swarm.launch import ServeProcess

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


class UsageError(Exception):
    """A bad flag: reported on one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


# ---- cgroups --------------------------------------------------------------------------------------


def cgroup_problem() -> str | None:
    """Why CPU quotas cannot be used here, or None when they can."""
    if not (CGROUP_CPU / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {CGROUP_CPU}"
    if os.geteuid() != 0:
        return "not root (creating cgroups needs it)"
    probe = CGROUP_CPU / f"swarm-bench-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        return f"cannot create a cgroup ({exc.strerror})"
    return None


class CpuGroup:
    """A cgroup whose tasks together get ``share`` of one core (CFS quota ÷ period); removed by
    :meth:`remove` once its processes have exited (left-over ones are moved to the root first)."""

    def __init__(self, name: str, share: float, period_us: int):
        self.path = CGROUP_CPU / name
        self.path.mkdir()
        (self.path / "cpu.cfs_period_us").write_text(str(period_us))
        (self.path / "cpu.cfs_quota_us").write_text(str(round(share * period_us)))

    def periods(self) -> tuple[int, int]:
        """(CFS periods in which the group ran, periods in which it used up its quota) so far."""
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        return int(stat["nr_periods"]), int(stat["nr_throttled"])

    def unthrottle(self) -> None:
        (self.path / "cpu.cfs_quota_us").write_text("-1")

    def add(self, pid: int) -> None:
        """Move a process (all its threads) into the group."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        for pid in (self.path / "cgroup.procs").read_text().split():
            try:
                (CGROUP_CPU / "cgroup.procs").write_text(pid)
            except OSError:  # exited meanwhile
                pass
        self.path.rmdir()


def period_for(shares: list[float]) -> int:
    """A CFS period (µs) short enough for smooth throttling, long enough that the smallest share's
    quota is at least the kernel's minimum of 1 ms."""
    return min(1_000_000, max(10_000, math.ceil(1000 / min(shares))))


# ---- processes ------------------------------------------------------------------------------------


class Server(ServeProcess):
    """One `swarm serve` process (SWARM_HOME ``home``, its stderr in ``home/server.log``), optionally
    started inside a cgroup."""

    def __init__(self, args: list[str], home: Path, name: str, group: CpuGroup | None, throttle_start: bool):
        home.mkdir(parents=True, exist_ok=True)
        self.name, self.group = name, group
        # in the group from the first instruction on
        prefix = in_cgroup(group.path, []) if group is not None and throttle_start else []
        env = {**os.environ, "SWARM_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        super().__init__(args, env=env, log=home / "server.log", prefix=prefix)


class Client:
    """A client process (this script with ``--client``): one generation per request line, by a
    :func:`swarm.open` client per swarm, each joined at its swarm's first request."""

    def __init__(self, model: Path):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--client", str(model)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def send(self, request: dict) -> None:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a client exited with {self.proc.wait()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"a client failed: {reply['error']}")
        return reply

    def close(self) -> None:
        """End of input: the client exits."""
        try:
            self.proc.stdin.close()
        except OSError:  # it is gone already
            pass

    def wait(self) -> None:
        wait_or_kill(self.proc)


def wait_or_kill(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Wait for ``proc`` to exit, SIGKILL it after ``timeout`` seconds."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def client_main(model: str) -> None:
    """``--client MODEL``: for each line {"peer", "tokens", "prompt"} read from stdin, generate
    greedily through the swarm ``peer`` belongs to and print {"ids", "first", "last", "count",
    "route"} (times on the monotonic clock, which all processes of this machine share; route: the
    peer ids of the last chain), or {"error"}. One :func:`swarm.open` client per peer, joined at
    its first request and kept."""
    import swarm

    clients: dict[str, swarm.Swarm] = {}
    print(json.dumps({"ready": True}), flush=True)
    try:
        for line in sys.stdin:
            request = json.loads(line)
            stamps: list[float] = []
            chains: list = []
            try:
                if request["peer"] not in clients:
                    clients[request["peer"]] = swarm.open(model, initial_peers=[request["peer"]])
                client = clients[request["peer"]]
                ids = client.generate_ids(
                    client.encode(request["prompt"]), swarm.GenerationConfig(max_new_tokens=request["tokens"]),
                    lambda _, stamps=stamps: stamps.append(time.monotonic()), chains.append,
                )
                route = [str(span.peer_id) for span in chains[-1].spans] if chains else []
                print(json.dumps({"ids": ids, "first": stamps[0], "last": stamps[-1], "count": len(stamps),
                                  "route": route}), flush=True)
            except Exception as exc:  # noqa: BLE001  (reported to the parent, which stops the benchmark)
                print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
    finally:
        for client in clients.values():
            client.close()


# ---- placements -----------------------------------------------------------------------------------


def naive_ranges(num_blocks: int, count: int, servers: int) -> list[tuple[int, int]]:
    """The naive rule replayed in start order: each server takes the window least covered by
    server count among those started before it."""
    from swarm.p2p.balance import choose_blocks_naive
    from swarm.p2p.table import ServerInfo
    from swarm.p2p.wire import PeerId

    table: dict = {}
    ranges = []
    for i in range(servers):
        start = choose_blocks_naive(table, num_blocks, count)
        end = min(start + count, num_blocks)
        table[PeerId(f"s{i}")] = ServerInfo(PeerId(f"s{i}"), (), "", start, end)
        ranges.append((start, end))
    return ranges


def block_speed() -> float:
    """Decode steps per second of one block of the default model, one thread, unthrottled (the
    median of 5 measurements of 30 steps)."""
    import torch
    from swarm.engine.checkpoint import Checkpoint, parse_dtype
    from swarm.engine.default_model import ensure_default_model
    from swarm.engine.throughput import measure_block_throughput

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        blocks = Checkpoint(ensure_default_model()).load_blocks(0, 1, parse_dtype("float32"))
        return statistics.median(measure_block_throughput(blocks) for _ in range(3))
    finally:
        torch.set_num_threads(threads)


def status(maddr: str) -> dict:
    from swarm.p2p.loop import run
    from swarm.p2p.status import gather_status

    return run(gather_status([maddr]))


def placement(st: dict) -> tuple:
    """What must stay unchanged for a placement to count as stable."""
    return tuple(sorted((s["name"], tuple(s["blocks"]), s["state"]) for s in st["servers"]))


def wait_stable(maddr: str, servers: int, settle: float, timeout: float) -> dict:
    """Poll `swarm status` until all ``servers`` are online, no block is uncovered and no range has
    changed for ``settle`` seconds; returns that status. RuntimeError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        st = status(maddr)
        now = placement(st)
        ok = not st["gaps"] and sum(s["state"] == "online" for s in st["servers"]) == servers
        if now != last or not ok:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= settle:
            return st
        time.sleep(1.0)
    raise RuntimeError(f"the balanced placement did not settle within {timeout:.0f} s: {last}")


def start_swarm(label: str, ranges: list[str], args, model: Path, home: Path, shares: list[float],
                throughputs: list[str], groups: list[CpuGroup], servers: list[Server], extra: list[str]) -> str:
    """Start the servers one after another (each waits for the one before); returns the first's address."""
    first = None
    period = period_for(shares)
    for i, (blocks, share, tp) in enumerate(zip(ranges, shares, throughputs)):
        group = None
        if args.cgroups:
            group = CpuGroup(f"swarm-bench-{os.getpid()}-{label}-{i}", share, period)
            groups.append(group)
        cli = ["--model", str(model), "--blocks", blocks, "--threads", "1", "--throughput", tp,
               "--identity", str(home / f"{label}-{i}" / "id.key"), "--public-name", f"{label}-{i}", *extra]
        if blocks == "auto":
            cli += ["--num-blocks", str(args.num_blocks), "--balance-period", str(args.balance_period)]
        cli += ["--new-swarm"] if first is None else ["--initial-peers", first]
        server = Server(cli, home / f"{label}-{i}", f"{label}-{i}", group, throttle_start=args.throughput == "eval")
        servers.append(server)
        addr = server.wait_ready(timeout=300 if args.throughput == "eval" else 120)
        if group is not None and args.throughput != "eval":
            group.add(server.proc.pid)
        first = first or addr
    return first


def shares_throttled(counts: list[list[int]]) -> str:
    """Per server, the share of its CFS periods that ended throttled: "0:95% 1:80% ..." (whether
    the quota, not the machine, limited it)."""
    return " ".join(f"{i}:{100 * t / n:.0f}%" if n else f"{i}:idle" for i, (n, t) in enumerate(counts))


def describe(routes: list[list[str]], names: dict[str, str]) -> str:
    """The clients' routes by server number, with counts: "0+1 ×3, 0+2 ×1"."""
    counts: dict[str, int] = {}
    for route in routes:
        key = "+".join(names.get(p, p[:8]).rsplit("-", 1)[-1] for p in route)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} ×{n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def measure(clients: list[Client], peer: str, tokens: int) -> tuple[float, float, list[int], list[list[str]]]:
    """One run: every client generates at once. (aggregate tokens/s, median per-client decode
    tokens/s, the first client's token ids, each client's route as peer ids)."""
    for c in clients:
        c.send({"peer": peer, "tokens": tokens, "prompt": PROMPT})
    replies = [c.receive() for c in clients]
    span = max(r["last"] for r in replies) - min(r["first"] for r in replies)
    aggregate = sum(r["count"] - 1 for r in replies) / span
    per_client = statistics.median((r["count"] - 1) / (r["last"] - r["first"]) for r in replies)
    outputs = {tuple(r["ids"]) for r in replies}
    if len(outputs) != 1:
        raise RuntimeError("clients with the same prompt produced different tokens")
    return aggregate, per_client, replies[0]["ids"], [r["route"] for r in replies]


# ---- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str]):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="alternating balanced/naive rounds (medians are printed)")
    p.add_argument("--tokens", type=int, default=24, help="new tokens per client per run (greedy)")
    p.add_argument("--clients", type=int, default=4, help="client processes generating at the same time")
    p.add_argument("--num-blocks", type=int, default=15, help="blocks each server holds (of 30)")
    p.add_argument("--speeds", default="0.5,0.25,0.25,0.125,0.0625,0.0625",
                   help="each server's share of one core, in start order (comma-separated)")
    p.add_argument("--throughput", default="quota", help="announced speeds: quota (share × measured) or eval")
    p.add_argument("--balance-period", type=float, default=2.0, help="the balanced servers' --balance-period (s)")
    p.add_argument("--client", metavar="MODEL", help=argparse.SUPPRESS)
    add_out(p, "balance")
    args = p.parse_args(argv)
    if args.client:
        return args
    for flag, value in (("--rounds", args.rounds), ("--clients", args.clients)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.tokens < 2:
        raise UsageError(f"--tokens must be at least 2 (decode speed is timed between tokens), got {args.tokens}")
    if not 1 <= args.num_blocks <= 30:
        raise UsageError(f"--num-blocks must be between 1 and 30 (the default model's blocks), got {args.num_blocks}")
    try:
        args.shares = [float(s) for s in args.speeds.split(",")]
    except ValueError:
        raise UsageError(f"--speeds must be comma-separated numbers, got {args.speeds!r}") from None
    if not all(0.001 <= s <= 1 for s in args.shares):
        raise UsageError(f"--speeds: each share of a core must be in [0.001, 1], got {args.speeds!r}")
    if args.num_blocks * len(args.shares) < 30:
        raise UsageError(f"--num-blocks {args.num_blocks} × {len(args.shares)} servers cannot cover 30 blocks")
    if args.throughput not in ("quota", "eval"):
        raise UsageError(f"--throughput must be quota or eval, got {args.throughput!r}")
    if not (args.balance_period > 0 and math.isfinite(args.balance_period)):
        raise UsageError(f"--balance-period must be a positive number of seconds, got {args.balance_period}")
    return args


def run_benchmark(args) -> None:
    from swarm.engine.default_model import ensure_default_model

    began = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a SIGTERM cleans up like Ctrl-C
    model = ensure_default_model()
    problem = cgroup_problem()
    args.cgroups = problem is None
    if problem:
        print(f"note: no CPU quotas ({problem}): the servers only ANNOUNCE different speeds and are equally fast "
              "in reality, so this run shows the placements, not their effect on speed")
        if args.throughput == "eval":
            print("note: --throughput eval without quotas: every server measures the same speed")
    if sum(args.shares) > (os.cpu_count() or 1) - 0.5:
        print(f"note: the shares add up to {sum(args.shares):g} cores of {os.cpu_count()}: with the clients, "
              "the quotas may not bind")
    if args.throughput == "quota":
        speed = block_speed()
        throughputs = [f"{s * speed:.1f}" for s in args.shares]
        print(f"one block, one thread, unthrottled: {speed:.0f} decode steps/s; announced: share × that")
    else:
        throughputs = ["eval"] * len(args.shares)
    extra = ["--choice-delay", "0"]  # started one after another already
    naive = [f"{a}:{b}" for a, b in naive_ranges(30, args.num_blocks, len(args.shares))]

    groups: list[CpuGroup] = []
    servers: list[Server] = []
    clients: list[Client] = []
    with tempfile.TemporaryDirectory(prefix="swarm-bench-balance-") as tmp:
        try:
            clients = [Client(model) for _ in range(args.clients)]  # they load while the servers start
            home = Path(tmp)
            peers = {
                "balanced": start_swarm("balanced", ["auto"] * len(args.shares), args, model, home, args.shares,
                                        throughputs, groups, servers, extra),
                "naive": start_swarm("naive", naive, args, model, home, args.shares, throughputs, groups,
                                     servers, extra),
            }
            settled = wait_stable(peers["balanced"], len(args.shares), settle=4 * args.balance_period, timeout=180)
            names = {s["peer_id"]: s["name"] for label in peers for s in status(peers[label])["servers"]}
            for c in clients:
                c.receive()  # ready
            started = time.monotonic()
            results: dict[str, list[tuple[float, float]]] = {"balanced": [], "naive": []}
            throttled: dict[str, list[list[int]]] = {}  # per placement, per server: [periods ran, throttled]
            reference = None
            for r in range(args.rounds + 1):  # round 0: warm-up
                for label in ("balanced", "naive"):
                    mine = [g for g in groups if g.path.name.split("-")[-2] == label]
                    before = [g.periods() for g in mine]
                    aggregate, per_client, ids, routes = measure(clients, peers[label], args.tokens)
                    delta = [[b - a for a, b in zip(p0, g.periods())] for p0, g in zip(before, mine)]
                    if reference is not None and ids != reference:
                        raise RuntimeError("the two placements produced different tokens")
                    reference = ids
                    if r:
                        results[label].append((aggregate, per_client))
                        for total, d in zip(throttled.setdefault(label, [[0, 0] for _ in delta]), delta):
                            total[0], total[1] = total[0] + d[0], total[1] + d[1]
                    quota = f", throttled {shares_throttled(delta)}" if delta else ""
                    print(f"  {'warm-up' if not r else f'round {r}'} {label:<8} aggregate {aggregate:6.2f} tok/s, "
                          f"per client {per_client:6.2f} tok/s, routes {describe(routes, names)}{quota}", flush=True)
            measured = time.monotonic() - started
            final = {label: status(peer) for label, peer in peers.items()}
            if placement(final["balanced"]) != placement(settled):
                print("note: the balanced servers moved during the measurement")
            figures = report(args, final, results, measured)
            figures["throttled"] = {label: [{"periods": n, "throttled": t} for n, t in per_server]
                                    for label, per_server in throttled.items()}
            if groups:
                print("CFS periods in which a server used up its quota, of those it ran in (servers in start order): "
                      + "; ".join(f"{label} {shares_throttled(t)}" for label, t in throttled.items()))
        finally:
            for g in groups:  # full speed for a quick shutdown
                g.unthrottle()
            for c in clients:
                c.close()
            for s in servers:
                s.terminate()
            for c in clients:
                c.wait()
            for s in servers:
                s.stop()
            for g in groups:
                try:
                    g.remove()
                except OSError as exc:
                    print(f"warning: could not remove cgroup {g.path}: {exc.strerror}", file=sys.stderr)
    whole = time.monotonic() - began
    print(f"whole run (start, settle, measure, stop): {whole:.0f} s")
    settings = {"rounds": args.rounds, "tokens": args.tokens, "clients": args.clients, "num_blocks": args.num_blocks,
                "shares": args.shares, "throughput": args.throughput, "balance_period": args.balance_period,
                "cgroups": args.cgroups, "announced": [t if t == "eval" else float(t) for t in throughputs],
                "naive_ranges": naive, "model": "SmolLM2-135M"}
    write_results(args.out, "balance", settings, {**figures, "whole_run_s": whole})


def report(args, final: dict, results: dict, measured: float) -> dict:
    """Print the medians as a markdown table; returns them, per placement and round, for the
    results file."""
    def layout(label: str, st: dict) -> str:
        by_name = {s["name"]: s for s in st["servers"]}
        parts = []
        for i, share in enumerate(args.shares):
            s = by_name.get(f"{label}-{i}")
            parts.append(f"{share:g}→{s['blocks'][0]}:{s['blocks'][1]} ({s['throughput']:.0f})" if s else f"{share:g}→?")
        return ", ".join(parts)

    med = {label: (statistics.median(a for a, _ in rs), statistics.median(p for _, p in rs)) for label, rs in results.items()}
    quota = "CPU quotas" if args.cgroups else "NO quotas (equal real speed)"
    announced = "share × one block's measured speed" if args.throughput == "quota" else "measured by each server"
    print(f"\n{len(args.shares)} servers ({quota}), {args.num_blocks} blocks each, default model, {args.clients} clients "
          f"× {args.tokens} greedy tokens, medians of {args.rounds} alternating rounds. Servers: share of a core → "
          f"blocks (announced throughput, {announced}, tokens/s of one block); bottleneck: the least sum of announced "
          f"throughputs over a block (where).\n")
    print("| placement | servers | bottleneck | aggregate tok/s | per-client tok/s |")
    print("|---|---|---:|---:|---:|")
    for label in ("balanced", "naive"):
        st = final[label]
        print(f"| {label} | {layout(label, st)} | {st['bottleneck']['throughput']:.0f} "
              f"(blocks {', '.join(f'{a}:{b}' for a, b in st['bottleneck']['blocks'])}) "
              f"| {med[label][0]:.2f} | {med[label][1]:.2f} |")
    ratios = [b[0] / n[0] for b, n in zip(results["balanced"], results["naive"])]
    ratio = statistics.median(ratios)
    print(f"\nbalanced ÷ naive, aggregate tokens/s: {ratio:.2f} (median of the rounds' ratios); "
          f"bottleneck ratio {final['balanced']['bottleneck']['throughput'] / final['naive']['bottleneck']['throughput']:.2f}")
    print(f"measurement: {measured:.0f} s")

    def servers(label: str) -> list[dict]:
        """Each server in start order: its share of a core, blocks and announced throughput (None: gone)."""
        by_name = {s["name"]: s for s in final[label]["servers"]}
        found = [by_name.get(f"{label}-{i}") for i in range(len(args.shares))]
        return [{"share": share, "blocks": s and list(s["blocks"]), "throughput": s and s["throughput"]}
                for share, s in zip(args.shares, found)]

    placements = {
        label: {"servers": servers(label), "bottleneck": final[label]["bottleneck"], "aggregate_tok_s": med[label][0],
                "per_client_tok_s": med[label][1],
                "rounds": [{"aggregate_tok_s": a, "per_client_tok_s": c} for a, c in results[label]]}
        for label in ("balanced", "naive")
    }
    return {"placements": placements, "ratio": ratio, "ratios": ratios, "measured_s": measured}


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"bench_balance.py: error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.client:
            client_main(args.client)
        else:
            run_benchmark(args)
    except KeyboardInterrupt:  # Ctrl-C reaches the clients too; everything was cleaned up on the way
        if not args.client:
            print("bench_balance.py: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench_balance.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
