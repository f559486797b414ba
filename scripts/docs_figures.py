"""The benchmark figures of the docs, generated from the results files: `make docs`.

Every table of figures in README.md and docs/*.md that a results file holds is written by this
script between marker comments, so the docs and ``scripts/results/*.json`` never disagree::

    <!-- figures:quant_precisions -->
    | model | precision | perplexity | ...      (generated: edit the script, not the table)
    <!-- /figures -->

Usage: ``python scripts/docs_figures.py`` rewrites the marked tables in place; ``--check`` writes
nothing, prints one line per stale table and exits 1 when there is one (``tests/test_docs.py``
runs it). A marker naming no figure of :data:`FIGURES`, or a figure whose results file lacks a
field, is an error naming the file and the figure.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "scripts" / "results"
MARKED = re.compile(r"^(<!-- figures:([\w-]+) -->\n)(.*?)^(<!-- /figures -->)$", re.S | re.M)

# Goals from the issues the benchmarks answer (not results): perplexity bounds of quantized weights
# and of the int8 wire on the default model, in percent over float32; an nf4 server's memory at
# most this share of a bfloat16 one's; nf4's local decode at least this many times bfloat16's.
PPL_BOUND = {"int8": 2.0, "nf4": 10.0}
WIRE_PPL_BOUND = {"int8": 1.0}
NF4_MEMORY_GOAL = 0.40
NF4_SPEED_GOAL = 1.5


def doc_files(root: Path = ROOT) -> list[Path]:
    """The files whose figures this script owns: README.md and docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


@cache
def results(name: str) -> dict:
    """``scripts/results/NAME.json``, read once."""
    return json.loads((RESULTS / f"{name}.json").read_text())


# --- number formats ---------------------------------------------------------------------------


def num(x: float, digits: int = 0) -> str:
    """``x`` with ``digits`` decimals and thousands separators: 46454.9 → "46,455"."""
    return f"{x:,.{digits}f}"


def pct(x: float, digits: int = 2) -> str:
    """A signed percentage with a true minus sign: −0.00 %, +1.20 %."""
    text = f"{x:+.{digits}f} %"
    return text.replace("-", "−")


def table(header: list[str], align: str, rows: list[list[str]]) -> str:
    """A markdown table; ``align`` has one letter per column, l or r."""
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines) + "\n"


# --- the figures ------------------------------------------------------------------------------


def _paper_points() -> tuple[dict, dict, dict]:
    """paper.json's offloading row, the 1 Gbit/s swarm row and the sweep's point nearest 100 ms."""
    paper = results("paper")
    offload = paper["rows"][0]
    lan = next(r for r in paper["rows"] if "Gbit" in r["setup"])
    far = min(paper["sweep"], key=lambda p: abs(p["set_rtt_ms"] - 100))
    return offload, lan, far


def headline() -> str:
    offload, lan, far = _paper_points()
    q = results("quant")
    small, big = q["models"]["SmolLM2-135M"], q["models"]["Llama-1.1B (random)"]
    f32 = small["precisions"]["float32"]["ppl"]
    mem = big["memory"]
    bf16, nf4 = big["precisions"]["bfloat16"], big["precisions"]["nf4"]
    wire = small["wire"]
    rows = [
        ["swarm ÷ offloading, decode steps/s", f"**{lan['decode_128'] / offload['decode_128']:.1f}×** "
         f"({lan['decode_128']:.2f} vs {offload['decode_128']:.2f})",
         f"{results('paper')['model']}: 3 servers on emulated hosts, 1 Gbit/s, {lan['rtt_ms']:.1f} ms RTT; "
         "offloading with half the weights' memory (`paper.json`)"],
        ["swarm at 100 ms RTT ÷ its analytic limit", f"**{far['steps_per_s'] / far['limit']:.2f}**",
         f"{far['rtt_ms']:.0f} ms measured, 100 Mbit/s: {far['steps_per_s']:.2f} of {far['limit']:.2f} steps/s (`paper.json`)"],
        ["nf4 server's memory ÷ bfloat16's", f"**{mem['nf4']['rss_mb'] / mem['bfloat16']['rss_mb'] * 100:.0f} %**"
         f" (goal ≤ {NF4_MEMORY_GOAL * 100:.0f} %)",
         f"{num(mem['nf4']['rss_mb'])} vs {num(mem['bfloat16']['rss_mb'])} MB, random 1.1B Llama, blocks 0:22 (`quant.json`)"],
        ["nf4 decode ÷ bfloat16, local", f"**{nf4['local_decode_tok_s'] / bf16['local_decode_tok_s']:.1f}×**"
         f" (goal ≥ {NF4_SPEED_GOAL:g}×)",
         f"{nf4['local_decode_tok_s']:.1f} vs {bf16['local_decode_tok_s']:.1f} tok/s, random 1.1B Llama (`quant.json`)"],
        ["int8 weights, perplexity", f"**{pct((small['precisions']['int8']['ppl'] / f32 - 1) * 100)}**",
         "SmolLM2-135M over 3 servers, held-out English (`quant.json`)"],
        ["int8 wire, bytes per token and hop", f"**{num(wire['int8']['bytes_per_token'])}** of {num(wire['float32']['bytes_per_token'])}",
         f"SmolLM2-135M; perplexity {pct((wire['int8']['ppl'] / wire['float32']['ppl'] - 1) * 100)} (`quant.json`)"],
    ]
    return table(["figure", "value", "setting"], "lrl", rows)


def _nominal_mbit(setup: str) -> float | None:
    match = re.search(r"([\d.]+) (G|M)bit/s", setup)
    if not match:
        return None
    return float(match.group(1)) * (1000 if match.group(2) == "G" else 1)


def paper() -> str:
    rows = []
    for r in results("paper")["rows"]:
        if "rtt_ms" not in r:
            rtt = bandwidth = "-"
        else:
            nominal = _nominal_mbit(r["setup"])
            # * the echo measured the link above its shaping (tbf's burst) or below it (windows at long RTT)
            odd = nominal is not None and not 0.9 * nominal <= r["mbit"] <= 1.05 * nominal
            rtt, bandwidth = f"{r['rtt_ms']:.1f} ms", f"{num(r['mbit'])} Mbit/s" + ("*" if odd else "")
        rows.append([r["setup"], rtt, bandwidth, f"{r['decode_128']:.2f}", f"{r['decode_1024']:.2f}",
                     num(r["forward_1x128"]), num(r["forward_16x128"])])
    header = ["setup", "RTT measured", "bandwidth measured", "steps/s, 128-token prompt",
              "steps/s, 1,024-token prompt", "forward tok/s, 1×128", "forward tok/s, 16×128"]
    return table(header, "lrrrrrr", rows)


def paper_summary() -> str:
    offload, lan, far = _paper_points()
    compute = results("paper")["compute_s_per_token"]
    mmap = results("paper")["offloading"]["mmap"]["decode"]["128"]["steps_per_s"]
    return (
        f"- **Swarm ÷ offloading for decoding at 1 Gbit/s and < 5 ms: {lan['decode_128'] / offload['decode_128']:.1f}×** "
        f"({lan['decode_128']:.2f} against {offload['decode_128']:.2f} steps/s after a 128-token prompt; "
        f"offloading's memory-mapped reads managed {mmap:.2f}).\n"
        f"- **At {far['rtt_ms']:.0f} ms the swarm reaches {far['steps_per_s'] / far['limit']:.2f} of the analytic limit** "
        f"({far['steps_per_s']:.2f} of {far['limit']:.2f} steps/s).\n"
        f"- The same model decoding in one process with every weight in memory, before and after the sweep: "
        f"{' and '.join(f'{s * 1000:.0f}' for s in compute)} ms per token "
        f"({statistics.mean(compute) * 1000:.0f} ms on average), the compute of the analytic limit.\n"
    )


def paper_sweep() -> str:
    rows = []
    for p in results("paper")["sweep"]:
        ratio = p["steps_per_s"] / p["limit"]
        rows.append([f"{p['rtt_ms']:.1f} ms", f"{p['steps_per_s']:.2f}", f"{p['limit']:.2f}", f"{ratio:.2f}",
                     f"{p['latency_only']:.2f}", f"{p['steps_per_s'] / p['latency_only']:.2f}"])
    header = ["RTT measured", "swarm steps/s", "analytic limit", "swarm ÷ limit", "lowest-RTT swarm + latency",
              "swarm ÷ that"]
    return table(header, "rrrrrr", rows)


OFFLOAD_RUNS = {
    "capped_1.1GB": "capped at 1.1 GB, read-ahead",
    "capped_1.1GB_no_prefetch": "capped at 1.1 GB, no read-ahead",
    "warm_no_cap": "page cache warm, no cap",
}


def offload() -> str:
    data = results("offload")
    rows = []
    for run, label in OFFLOAD_RUNS.items():
        for mode, m in data[run].items():
            d128, d1024 = m["decode"]["128"], m["decode"]["1024"]
            rows.append([label, {"stream": "streamed", "mmap": "memory-mapped"}.get(mode, mode),
                         f"{d128['steps_per_s']:.2f}", f"{d1024['steps_per_s']:.2f}",
                         num(m["forward"]["1x128"]["tokens_per_s"]), num(m["forward"]["16x128"]["tokens_per_s"]),
                         f"{d128['weight_wait_s_per_step']:.2f}", f"{d128['disk_read_bytes_per_step'] / 1e9:.2f}"])
    header = ["run", "reads", "steps/s, 128-token prompt", "steps/s, 1,024", "forward tok/s, 1×128",
              "forward tok/s, 16×128", "s per step waiting for weights", "GB read per step"]
    return table(header, "llrrrrrr", rows)


def quant_precisions() -> str:
    rows = []
    for model, m in results("quant")["models"].items():
        base = m["precisions"]["float32"]["ppl"]
        for precision, p in m["precisions"].items():
            if precision == "float32":
                change = ""
            else:
                rise = (p["ppl"] / base - 1) * 100
                change = pct(rise)
                bound = PPL_BOUND.get(precision) if model == "SmolLM2-135M" else None
                if bound is not None:
                    change = f"**{change}** (bound {bound:g} %: missed)" if rise > bound else f"{change} (bound {bound:g} %)"
            mem = m.get("memory", {}).get(precision, {})
            rows.append([
                model, precision, num(p["ppl"], 2 if p["ppl"] < 1000 else 0), change,
                f"{p['swarm_decode_tok_s']:.1f}" if "swarm_decode_tok_s" in p else "",
                num(p["local_prefill_tok_s"]) if "local_prefill_tok_s" in p else "",
                f"{p['local_decode_tok_s']:.1f}" if "local_decode_tok_s" in p else "",
                f"{num(mem['rss_mb'])} MB" if mem else "", f"{num(mem['weights_mb'])} MB" if mem else "",
                f"{num(mem['peak_mb'])} MB" if mem else "",
            ])
    header = ["model", "precision", "perplexity", "vs float32", "swarm decode tok/s", "local prefill tok/s",
              "local decode tok/s", "server RSS, blocks 0:22", "its weights", "peak while loading"]
    return table(header, "llrrrrrrrr", rows)


def quant_wire() -> str:
    models = results("quant")["models"]
    names = list(models)
    rows = []
    for dtype in models[names[0]]["wire"]:
        sizes, changes = [], []
        for name in names:
            w = models[name]["wire"]
            sizes.append(num(w[dtype]["bytes_per_token"]))
            changes.append("—" if dtype == "float32" else pct((w[dtype]["ppl"] / w["float32"]["ppl"] - 1) * 100))
        bound = WIRE_PPL_BOUND.get(dtype)
        label = "int8 (blocks of 64)" if dtype == "int8" else dtype
        rows.append([label, " / ".join(sizes), " / ".join(changes) + (f" (bound {bound:g} %)" if bound else "")])
    short = " / ".join(n.split(" ")[0].replace("SmolLM2-", "").replace("Llama-", "") for n in names)
    return table(["wire dtype (float32 servers)", f"bytes per token per hop, {short}", f"perplexity change, {short}"],
                 "lrr", rows)


LAYER_NAMES = {
    "bfloat16 nn.Linear": "bfloat16 `nn.Linear`",
    "bfloat16 packed (ours)": "bfloat16 packed (ours, `engine/fast.py`)",
    "int8 bitsandbytes Linear8bitLt, eval": "bitsandbytes `Linear8bitLt`, eval",
    "nf4 bitsandbytes Linear4bit, eval": "bitsandbytes `Linear4bit` nf4, eval",
    "int8 bitsandbytes Linear8bitLt, train": "bitsandbytes `Linear8bitLt`, train",
    "nf4 bitsandbytes Linear4bit, train": "bitsandbytes `Linear4bit` nf4, train",
}


def quant_layers() -> str:
    rows = []
    for layer in results("quant")["layers"]:
        grad = "**no gradient**" if layer["fwd_bwd_ms"] is None else f"{layer['fwd_bwd_ms']:.1f}"
        rows.append([LAYER_NAMES.get(layer["layer"], layer["layer"]), f"{layer['batch1_ms']:.2f}",
                     f"{layer['batch128_ms']:.1f}", grad, f"{layer['error']:.1e}"])
    header = ["layer", "batch 1", "batch 128", "forward + input gradient, batch 1", "error vs float32"]
    return table(header, "lrrrr", rows)


FIGURES: dict[str, Callable[[], str]] = {
    "headline": headline,
    "paper": paper,
    "paper_summary": paper_summary,
    "paper_sweep": paper_sweep,
    "offload": offload,
    "quant_precisions": quant_precisions,
    "quant_wire": quant_wire,
    "quant_layers": quant_layers,
}


# --- rewriting --------------------------------------------------------------------------------


class FigureError(ValueError):
    """A marker names no figure, or a results file lacks what a figure reads."""


def render(text: str, where: str) -> tuple[str, list[str]]:
    """``text`` with every marked figure regenerated, and the names of those that changed."""
    stale: list[str] = []

    def replace(match: re.Match) -> str:
        opening, name, old, closing = match.groups()
        figure = FIGURES.get(name)
        if figure is None:
            raise FigureError(f"{where}: <!-- figures:{name} --> names no figure; known: {', '.join(FIGURES)}")
        try:
            new = figure()
        except (KeyError, IndexError, TypeError, ValueError, FileNotFoundError) as exc:
            raise FigureError(f"{where}: figure {name}: its results file lacks {exc!r}") from exc
        if new != old:
            stale.append(name)
        return opening + new + closing

    return MARKED.sub(replace, text), stale


def run(files: list[Path], check: bool) -> list[str]:
    """Regenerate (or with ``check`` only compare) the figures in ``files``; returns one line per
    stale table."""
    lines = []
    for path in files:
        text = path.read_text()
        where = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        new, stale = render(text, where)
        if check:
            lines += [f"{where}: figures:{name} differs from scripts/results (run `make docs`)" for name in stale]
        elif stale:
            path.write_text(new)
            lines += [f"{where}: figures:{name} rewritten" for name in stale]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a table is stale")
    args = parser.parse_args(argv)
    try:
        lines = run(doc_files(), args.check)
    except FigureError as exc:
        print(exc, file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    if args.check:
        return 1 if lines else 0
    if not lines:
        print("figures up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
