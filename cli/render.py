"""Rich rendering of `swarm status`."""

from __future__ import annotations

import time

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text


def coverage_bar(data: dict, width: int = 60) -> Text:
    """One cell per block (scaled to ``width``): green where served, red where nobody serves."""
    n = data["num_blocks"]
    cover = data["coverage"]
    bar = Text()
    cells = min(n, width)
    for i in range(cells):
        lo, hi = i * n // cells, max(i * n // cells + 1, (i + 1) * n // cells)
        served = all(c > 0 for c in cover[lo:hi])
        bar.append("█" if served else "░", style="green" if served else "bold red")
    return bar


def model_title(data: dict) -> str:
    """``NAME (ID)``: what people call the model, and beside it the id the swarm knows it by (the
    id alone when no server announces a name)."""
    name = data.get("model_name")
    return f"{name} ({data['model']})" if name else data["model"]


def _load(s: dict) -> str:
    """Sessions open · tokens/s computed lately, then (when it batches) sessions per pass of its
    most, and computations waiting now."""
    text = f"{s.get('sessions', 0)} · {s.get('served', 0.0):.0f}/s"
    if s.get("max_batch", 1) > 1:
        text += f" · ×{s.get('batch', 0.0):.1f}/{s['max_batch']}"
    if s.get("queued"):
        text += f" · {s['queued']} waiting"
    return text


def status_view(data: dict, now: float | None = None) -> Group:
    """The table of servers, the coverage summary, and (when ``data`` carries this machine's
    ledger: ``"bans"``) a column of checks and the bans in force. ``now``: for the bans' times."""
    now = time.time() if now is None else now
    ledger = "bans" in data
    # escaped, as the cells below are plain Text: a peer announces what it likes
    table = Table(title=escape(f"{model_title(data)} — {data['num_blocks']} blocks"), title_justify="left")
    for col, justify in [("peer", "left"), ("name", "left"), ("address", "left"), ("reach", "left"), ("blocks", "right"),
                         ("state", "left"), *([("checks", "left")] if ledger else []),
                         ("weights", "left"), ("tok/s (batched)", "right"), ("load", "right"), ("cache", "right"), ("rtt", "right"),
                         ("version", "left")]:
        table.add_column(col, justify=justify)
    for s in data["servers"]:
        state_style = {"online": "green", "joining": "yellow"}.get(s["state"], "red")
        table.add_row(
            _peer(s["peer_id"]),
            Text(s["name"] or "-"),
            Text(_address(s.get("addrs") or [])),  # not markup: a peer announces what it likes
            Text(s.get("reach", "unknown") + (" (direct here)" if s.get("reach") == "relayed" and s.get("link") == "direct"
                                               else ""),
                 style={"public": "green", "relayed": "yellow", "private": "red"}.get(s.get("reach", "unknown"), "")),
            f"{s['blocks'][0]}:{s['blocks'][1]}",
            Text(s["state"], style=state_style),
            *([_checks(s)] if ledger else []),
            _weights(s),
            _speed(s),
            _load(s),
            str(s["cache_tokens_left"]),
            "-" if s["rtt_ms"] is None else f"{s['rtt_ms']:.1f} ms",
            Text(s["version"]),
        )
    gaps = data["gaps"]
    summary = Text("coverage ")
    summary.append_text(coverage_bar(data))
    summary.append(
        "  all blocks served" if not gaps else "  gaps: " + ", ".join(f"{a}:{b}" for a, b in gaps),
        style="green" if not gaps else "bold red",
    )
    low = data.get("bottleneck")
    if low and low["blocks"] and not gaps:
        where = ", ".join(f"{a}:{b}" for a, b in low["blocks"])
        summary.append(f"\nbottleneck {low['throughput']:.0f} tok/s (total of the servers, sessions batched) at blocks {where}")
    notes = []
    if any(s.get("bandwidth_source") == "assumed" for s in data["servers"]):
        notes.append("* network speed assumed (no peer to measure the link against yet, and no --bandwidth)")
    if any(s.get("throughput_source") == "given" for s in data["servers"]):
        notes.append("= speed given with --throughput, not measured")
    moves = data.get("moves") or []
    if moves:
        notes.append("recent moves: " + "; ".join(
            f"…{m['peer_id'][-6:]} {m['from'][0]}:{m['from'][1]} → {m['to'][0]}:{m['to'][1]} "
            f"{_ago(now - m['time'])}" for m in moves[:5]
        ))
    if notes:
        summary.append("\n" + "\n".join(notes), style="dim")
    bans = data.get("bans")
    return Group(table, summary, Text(), bans_view(bans, now)) if bans else Group(table, summary)


def bans_view(bans: list[dict], now: float) -> Table:
    """``Banned by this machine``: each ban in force, its reason, since and until when."""
    table = Table(title="Banned by this machine", title_justify="left", title_style="bold red", box=None,
                  padding=(0, 2, 0, 0))
    for col in ("peer", "reason", "since", "until"):
        table.add_column(col, style="dim" if col in ("since", "until") else "")
    for b in bans:
        table.add_row(
            _peer(b["peer_id"]) + ("" if b.get("in_swarm", True) else " (not in the swarm now)"),
            Text(b["reason"] or "-"),  # not markup: it quotes what servers sent
            "-" if not b["since"] else _ago(now - b["since"]),
            f"for {_duration(b['until'] - now)} more",
        )
    return table


def _peer(peer_id: str) -> str:
    return "…" + peer_id[-6:]


def _checks(s: dict) -> Text:
    """This machine's checks of a server: ``12 ✓ 0 ✗`` (``—`` never checked), red ``banned`` first
    when it is; a failed check in red."""
    counts, text = s.get("checks"), Text()
    if s.get("ban"):
        text.append("banned ", style="bold red")
    if counts is not None:
        text.append(f"{counts['passed']} ✓ ")
        text.append(f"{counts['failed']} ✗", style="red" if counts["failed"] else "")
    return text if text.plain else Text("—")


def _address(addrs: list) -> str:
    """A server's first announced address as ``host:port`` (``+N`` more), ``-`` when it gave none."""
    if not addrs:
        return "-"
    parts = str(addrs[0]).split("/")
    short = f"[{parts[2]}]:{parts[4]}" if len(parts) > 4 and parts[1] == "ip6" else ":".join(parts[2:5:2])
    return short + (f" +{len(addrs) - 1}" if len(addrs) > 1 else "")


def _weights(s: dict) -> str:
    """The precision of a server's weights and the memory they take, and the GPU they are on:
    ``nf4 0.6 GB``, ``bfloat16 2.1 GB on NVIDIA GeForce RTX 4090``."""
    quant = s.get("quant", "none")
    kind = s.get("dtype", "?") if quant == "none" else quant
    size = s.get("weight_bytes") or 0
    text = f"{kind} {size / 2**30:.2f} GB" if size >= 2**30 // 10 else f"{kind} {size / 2**20:.0f} MB" if size else kind
    device = s.get("device") or "cpu"
    return text if device == "cpu" else f"{text} on {device}"


def _speed(s: dict) -> str:
    """A server's tokens/s for one session, then (where it batches to more) what it carries with
    sessions batched: ``12 (45)``; marked ``=`` when given (``--throughput N``) and ``*`` when its
    network part is assumed."""
    mark = "=" if s.get("throughput_source") == "given" else ""
    mark += "*" if s.get("bandwidth_source") == "assumed" else ""
    capacity = s.get("capacity", 0.0)
    more = f" ({capacity:.0f})" if capacity >= s["throughput"] + 0.5 else ""
    return f"{s['throughput']:.0f}{more}{mark}"


def _ago(seconds: float) -> str:
    return f"{_duration(seconds)} ago"


def _duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``5 h``, ``6 days`` (negative: 0 s)."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"
