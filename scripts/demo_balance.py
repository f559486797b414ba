"""Load balancing on real processes (issue 11, acceptance 2, 3 and a short look at 4).

1. Arrivals: `swarm serve --blocks auto --num-blocks 10 --throughput T` of the default model for
   T = 1, 1, 2, 4, 4, 8, one after another (each once the one before is online). Each server's
   range is compared with what the pure rule (`p2p/balance.py: best_start`) gives on the
   `swarm status --json` snapshot taken just before it started; the final per-block totals are
   printed next to the replay of those choices (start order, nobody moving), and the final
   placement must be a fixed point: `should_move` is None for every server on the last snapshot
   (servers may have moved between arrivals; then the replay and the final totals differ, and the
   fixed point is what "what the pure function predicts" can honestly mean).
2. Departure: the servers holding the weakest block (the first block of least total throughput;
   two with these throughputs, so their range becomes a gap) get SIGTERM while a greedy
   `swarm generate` runs through them. `swarm status --json --watch` is read until every block is
   covered again; the time is printed in balance periods (acceptance: at most three), and the
   generated text must equal `swarm generate --local`.
3. Watch: several more balance periods; every change of a server's range is a move. Nothing may
   swap back and forth (no server returns to a range it left).

Prints a table per phase and PASS/FAIL per acceptance line; exits 1 on any FAIL. Every process it
starts is stopped on any exit. Usage:

    python scripts/demo_balance.py [--throughputs 1,1,2,4,4,8] [--num-blocks 10]
        [--balance-period 3] [--tokens 48] [--watch-periods 6] [--prompt TEXT]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from swarm.launch import ServeProcess
from swarm.p2p.balance import UNIT, Load, best_start, should_move
from swarm.p2p.table import ServerInfo

LIVE = ("online", "joining")  # the states the balance functions count


def swarm(*args: str) -> list[str]:
    return [sys.executable, "-m", "swarm.cli.main", *args]


class Server(ServeProcess):
    """One `swarm serve` process (its stderr in ``tmp/NAME.log``) and the throughput it announces."""

    def __init__(self, name: str, throughput: float, args: list[str], tmp: Path):
        super().__init__(args, log=tmp / f"{name}.log")
        self.name, self.throughput = name, throughput

    def wait_ready(self, timeout: float = 180) -> str:
        return super().wait_ready(timeout)


class StatusWatch:
    """`swarm status --json --watch` in the background: each refresh, stamped when it arrives."""

    def __init__(self, initial_peers: list[str], interval: float):
        self.proc = subprocess.Popen(
            swarm("status", "--json", "--watch", "--interval", str(interval), "--initial-peers", ",".join(initial_peers)),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self.snapshots: list[tuple[float, dict]] = []
        self._new = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            with self._new:
                self.snapshots.append((time.monotonic(), json.loads(line)))
                self._new.notify_all()

    def first(self, condition=lambda snap: True, after: float = 0.0, timeout: float = 120) -> tuple[float, dict]:
        """The first refresh received after ``after`` (monotonic) that meets ``condition``."""
        deadline, seen = time.monotonic() + timeout, 0
        with self._new:
            while True:
                for t, snap in self.snapshots[seen:]:
                    if t > after and condition(snap):
                        return t, snap
                seen = len(self.snapshots)
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise TimeoutError(f"swarm status: no such snapshot within {timeout:.0f} s")
                self._new.wait(min(left, 1.0))

    def since(self, after: float) -> list[tuple[float, dict]]:
        with self._new:
            return [(t, s) for t, s in self.snapshots if t > after]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(15)


# ---- reading a status snapshot with the balance functions ---------------------------------------


def infos(snap: dict) -> dict[str, ServerInfo]:
    return {
        row["peer_id"]: ServerInfo(peer_id=row["peer_id"], addrs=(), model=snap["model"], start=row["blocks"][0],
                                   end=row["blocks"][1], state=row["state"], throughput=row["throughput"])
        for row in snap["servers"]
    }


def totals(snap: dict) -> list[float]:
    """Per-block totals of online and joining servers, summed exactly as the balance functions do."""
    return [t * UNIT for t in Load.from_servers(infos(snap), snap["num_blocks"]).totals]


def ranges(snap: dict) -> dict[str, tuple[int, int]]:
    """Name → range of every server online or joining (moving servers announce the new range joining)."""
    return {row["name"]: tuple(row["blocks"]) for row in snap["servers"] if row["state"] in LIVE}


def covered(snap: dict) -> bool:
    return not snap["gaps"] and min(snap["coverage"]) > 0


def unstable(snap: dict, quality: float) -> dict[str, int]:
    """Name → start of every online server that `should_move` would move on this snapshot."""
    servers, names = infos(snap), {row["peer_id"]: row["name"] for row in snap["servers"]}
    moves = {}
    for peer_id, info in servers.items():
        if info.state == "online":
            start = should_move(servers, peer_id, snap["num_blocks"], quality)
            if start is not None:
                moves[names[peer_id]] = start
    return moves


def runs(values: list[float]) -> str:
    """[1, 1, 2, 2, 2] → '1×2 2×3': per-block totals, compactly."""
    out: list[list] = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return " ".join(f"{v:g}×{n}" for v, n in out)


def history(snapshots: list[tuple[float, dict]]) -> dict[str, list[tuple[int, int]]]:
    """Name → the ranges it held, in order (a change is a move)."""
    held: dict[str, list[tuple[int, int]]] = {}
    for _, snap in snapshots:
        for name, blocks in ranges(snap).items():
            seq = held.setdefault(name, [])
            if not seq or seq[-1] != blocks:
                seq.append(blocks)
    return held


def returns(held: dict[str, list[tuple[int, int]]]) -> dict[str, list[tuple[int, int]]]:
    """Servers that came back to a range they had left: back and forth."""
    return {name: seq for name, seq in held.items() if len(set(seq)) < len(seq)}


def timeline(snapshots: list[tuple[float, dict]], t0: float, period: float, until: float = float("inf"),
             shown: dict | None = None) -> int:
    """Print each refresh that changed who holds what (or the gaps), timed from ``t0``; returns how many."""
    def view(snap: dict) -> tuple:
        return sorted(ranges(snap).items()), snap["gaps"]

    last, printed = None if shown is None else view(shown), 0
    for t, snap in snapshots:
        if t > until:
            break
        if view(snap) != last:
            last = view(snap)
            held = ", ".join(f"{k} {s}:{e}" for k, (s, e) in sorted(ranges(snap).items()))
            print(f"  {t - t0:>6.1f}  {(t - t0) / period:>7.2f}  gaps {snap['gaps'] or 'none'}; {held}")
            printed += 1
    return printed


# ---- the phases ---------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--throughputs", default="1,1,2,4,4,8", help="tokens/s of each server, in start order")
    p.add_argument("--num-blocks", type=int, default=10, help="blocks each server holds")
    p.add_argument("--balance-period", type=float, default=3.0, help="servers check every random 0–2× this")
    p.add_argument("--balance-quality", type=float, default=0.75)
    p.add_argument("--tokens", type=int, default=48, help="greedy tokens generated across the move")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--watch-periods", type=float, default=6, help="balance periods watched after the gap is covered")
    p.add_argument("--interval", type=float, default=0.3, help="seconds between status refreshes")
    p.add_argument("--dump", help="write every status snapshot (JSON lines, t: monotonic seconds) to this file")
    a = p.parse_args()
    throughputs = [float(t) for t in a.throughputs.split(",")]
    period, n = a.balance_period, a.num_blocks
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below stops every process
    gen_args = [a.prompt, "--max-new-tokens", str(a.tokens)]
    results: dict[str, tuple[bool, str]] = {}

    print(f"$ swarm generate --local {' '.join(gen_args[1:])} {a.prompt!r}", flush=True)
    local = subprocess.run(swarm("generate", "--local", *gen_args), check=False, capture_output=True, text=True, timeout=600)
    if local.returncode:
        print(local.stderr)
        return 1
    print(f"  {local.stdout.strip()!r}\n")

    servers: list[Server] = []
    watches: list[StatusWatch] = []
    gen: subprocess.Popen | None = None
    with tempfile.TemporaryDirectory(prefix="swarm-balance-") as tmp:
        try:
            # -- 1. arrivals ------------------------------------------------------------------
            print(f"1. arrivals: {len(throughputs)} servers of {n} blocks, balance period {period:g} s")
            print(f"  {'server':<8}{'T':>5}  {'rule on its snapshot':>21}  {'took':>7}  {'replay':>7}")
            replay_load, arrivals_ok, ready_at = None, True, 0.0
            for i, t in enumerate(throughputs):
                name = f"s{i}-T{t:g}"
                # a refresh gathered once every earlier server is online (one started before may be older)
                before = {x.name for x in servers}
                snap = watches[0].first(lambda x, before=before: before <= set(ranges(x)), after=ready_at)[1] if watches else None
                args = ["--blocks", "auto", "--num-blocks", str(n), "--throughput", f"{t:g}",
                        "--balance-period", f"{period:g}", "--balance-quality", f"{a.balance_quality:g}",
                        "--announce-period", "1", "--drain-timeout", f"{2 * period:g}",
                        "--identity", str(Path(tmp) / f"{name}.key"), "--public-name", name]
                args += ["--choice-delay", "0"]  # each starts once the one before is online
                args += ["--initial-peers", servers[0].maddr] if servers else ["--new-swarm"]
                server = Server(name, t, args, Path(tmp))
                servers.append(server)
                server.wait_ready()
                ready_at = time.monotonic()
                if snap is None:  # the first server: an empty swarm
                    predicted = 0
                    watches.append(StatusWatch([server.maddr], a.interval))
                    num_blocks = watches[0].first()[1]["num_blocks"]
                    replay_load = Load(num_blocks)
                else:
                    predicted = best_start(Load.from_servers(infos(snap), num_blocks).totals, n)
                replayed = best_start(replay_load.totals, n)
                replay_load.add(name, replayed, min(n, num_blocks - replayed), round(t / UNIT))
                ok = server.blocks[0] == predicted
                arrivals_ok &= ok
                print(f"  {name:<8}{t:>5g}  {predicted:>15}:{predicted + n:<5}  {server.blocks[0]:>3}:{server.blocks[1]:<3}  "
                      f"{replayed:>3}:{replayed + n:<3}{'' if ok else '  MISMATCH'}", flush=True)

            # settled: no range changes for 2 periods (every server checks at least once in 2 periods)
            watch = watches[0]
            deadline, quiet_since = time.monotonic() + 15 * period, time.monotonic()
            last = ranges(watch.first(after=time.monotonic())[1])
            while time.monotonic() - quiet_since < 2 * period and time.monotonic() < deadline:
                snap = watch.first(after=time.monotonic())[1]
                if ranges(snap) != last:
                    last, quiet_since = ranges(snap), time.monotonic()
            final = watch.first(after=time.monotonic())[1]
            observed, replay = totals(final), [x * UNIT for x in replay_load.totals]
            wants = unstable(final, a.balance_quality)
            moves_1 = {k: " -> ".join(f"{s}:{e}" for s, e in v) for k, v in history(watch.since(0)).items() if len(v) > 1}
            print(f"  observed totals: {runs(observed)}   (gaps {final['gaps']})")
            print(f"  replay totals:   {runs(replay)}   ({'equal' if observed == replay else 'differ'})")
            for name, seq in moves_1.items():
                print(f"  {name} moved (answering later arrivals): {seq}")
            print(f"  should_move on the final snapshot: {wants or 'None for every server (a fixed point)'}")
            results["2 arrivals cover all blocks, as the rule predicts"] = (
                covered(final) and arrivals_ok and not wants,
                (f"covered={covered(final)}, every arrival took best_start of its snapshot={arrivals_ok}, "
                 f"final stable={not wants}, totals equal to the replay={observed == replay}"),
            )

            # -- 2. the weakest block's servers leave -------------------------------------------
            weakest = min(range(num_blocks), key=lambda b: (final["coverage"][b], b))
            holders = sorted((r for r in final["servers"] if r["state"] == "online"
                              and r["blocks"][0] <= weakest < r["blocks"][1]), key=lambda r: (r["throughput"], r["name"]))
            victims = {r["name"] for r in holders[:2]}
            survivors = [s for s in servers if s.name not in victims]
            print(f"\n2. departure: block {weakest} is weakest ({final['coverage'][weakest]:g} tokens/s), held by "
                  f"{', '.join(r['name'] for r in holders)}; SIGTERM to {', '.join(sorted(victims))} mid-generation")
            watch.stop()
            watch = StatusWatch([s.maddr for s in survivors], a.interval)
            watches.append(watch)
            watch.first()
            gen_err = Path(tmp) / "generate.err"
            with open(gen_err, "w") as err:
                gen = subprocess.Popen(swarm("generate", "--initial-peers", survivors[0].maddr, "--timeout",
                                             f"{30 * period:g}", *gen_args), stdout=subprocess.PIPE, stderr=err, text=True)
            text = gen.stdout.read(1)  # the first generated character: the chain through them is open
            sigterm = time.monotonic()
            for s in servers:
                if s.name in victims:
                    s.proc.terminate()
            if not text:
                raise RuntimeError(f"swarm generate printed nothing:\n{gen_err.read_text()}")
            t_cover, _ = watch.first(lambda s: not victims & set(ranges(s)) and covered(s), after=sigterm,
                                     timeout=30 * period)
            text += gen.stdout.read()  # to its end (its --timeout bounds the wait)
            gen.wait()
            print(f"  {'t (s)':>6}  {'periods':>7}  status")
            print(f"  {0:>6.1f}  {0:>7.2f}  SIGTERM")
            timeline(watch.since(sigterm), sigterm, period, until=t_cover)
            same = gen.returncode == 0 and text == local.stdout
            print(f"  swarm generate (exit {gen.returncode}): {text.strip()!r}")
            print(f"  same text as --local: {same}" + ("" if same else f"\n{gen_err.read_text()[-2000:]}"))
            periods = (t_cover - sigterm) / period
            results["3 gap covered within 3 periods, generation exact"] = (
                periods <= 3 and same, f"covered after {periods:.2f} periods, text equal to --local={same}"
            )

            # -- 3. watching for moves back and forth ---------------------------------------------
            print(f"\n3. watch: {a.watch_periods:g} more balance periods")
            until = time.monotonic() + a.watch_periods * period
            watch.first(after=until, timeout=a.watch_periods * period + 60)
            after = watch.since(t_cover - 1e-6)  # from the refresh that showed the blocks covered
            print(f"  {'t (s)':>6}  {'periods':>7}  changes (from the SIGTERM)")
            if not timeline(after[1:], sigterm, period, shown=after[0][1]):
                print("  (none)")
            late = {k: v for k, v in history(after).items() if len(v) > 1}
            held = history(watches[0].since(0) + watch.since(0))
            final = watch.since(0)[-1][1]
            wants = unstable(final, a.balance_quality)
            print(f"  {'server':<8}{'moves':>6}  ranges held (whole run)")
            for name, seq in sorted(held.items()):
                print(f"  {name:<8}{len(seq) - 1:>6}  {' -> '.join(f'{s}:{e}' for s, e in seq)}")
            print(f"  moves while watching: {sum(len(v) - 1 for v in late.values())}; final totals {runs(totals(final))}; "
                  f"should_move: {wants or 'None for every server'}")
            back = returns(history(watch.since(sigterm)))  # the same servers throughout: no arrivals to answer
            results["4 no back-and-forth (cheap look)"] = (
                not back and not wants,
                f"after the departure, servers back on a range they left: {back or 'none'}; final stable={not wants}",
            )
        finally:
            if a.dump:
                with open(a.dump, "w") as out:
                    for w in watches:
                        out.writelines(json.dumps({"t": t, **snap}) + "\n" for t, snap in w.snapshots)
            if gen is not None and gen.poll() is None:
                gen.kill()
                gen.wait()
            for w in watches:
                w.stop()
            for s in servers:
                s.stop()

    print("\nacceptance")
    for line, (ok, why) in results.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {line}: {why}")
    return 0 if results and all(ok for ok, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
