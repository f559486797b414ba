"""Rich rendering of `swarm status`."""

from __future__ import annotations

from rich.console import Group
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


def status_view(data: dict) -> Group:
    table = Table(title=f"{data['model']} — {data['num_blocks']} blocks", title_justify="left")
    for col, justify in [("peer", "left"), ("name", "left"), ("blocks", "right"), ("state", "left"),
                         ("tok/s", "right"), ("load", "right"), ("cache", "right"), ("rtt", "right"),
                         ("version", "left")]:
        table.add_column(col, justify=justify)
    for s in data["servers"]:
        state_style = {"online": "green", "joining": "yellow"}.get(s["state"], "red")
        table.add_row(
            "…" + s["peer_id"][-6:],
            s["name"] or "-",
            f"{s['blocks'][0]}:{s['blocks'][1]}",
            Text(s["state"], style=state_style),
            f"{s['throughput']:.0f}",
            f"{s.get('sessions', 0)} · {s.get('served', 0.0):.0f}/s",
            str(s["cache_tokens_left"]),
            "-" if s["rtt_ms"] is None else f"{s['rtt_ms']:.1f} ms",
            s["version"],
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
        summary.append(f"\nbottleneck {low['throughput']:.0f} tok/s (total of the servers) at blocks {where}")
    return Group(table, summary)
