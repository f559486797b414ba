"""The benchmark figures of the docs, generated from the results files: `make docs`.

Every table of figures in README.md and docs/*.md that a results file holds is written by this
script between marker comments, so the docs and ``scripts/results/*.json`` never disagree (the
loopback benchmarks' files also carry their run's date, commit and machine, which the figures
cite; see scripts/bench_common.py)::

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
        *_speculative_headline(),
    ]
    return table(["figure", "value", "setting"], "lrl", rows)


def _speculative_headline() -> list[list[str]]:
    rows = {(r["rtt_ms"], r["kind"]): r for r in results("speculative")["rows"]}
    out = []
    for draft, kinds, what in (("model", ("prose",), "its own copy drafting"), ("ngram", ("code", "extraction"), "n-gram drafts")):
        cells = [rows.get((100.0, k)) for k in kinds]
        if all(c is not None and c.get(f"{draft}_speedup") for c in cells):
            value = ", ".join(f"**{c[f'{draft}_speedup']:.2f}×** ({k})" for c, k in zip(cells, kinds))
            out.append([f"speculative decoding at 100 ms RTT ÷ plain, {what}", value,
                        "SmolLM2-135M, 3 servers on emulated hosts, the same tokens (`speculative.json`)"])
    return out


def speculative() -> str:
    data = results("speculative")
    drafts = data["settings"]["drafts"]
    header = ["RTT", "prompts", f"{drafts[0]}, tok/s"]
    for d in drafts[1:]:
        header += [f"{d}: tok/s", "×", "accepted", "tokens per round trip"]
    body = []
    for r in data["rows"]:
        row = [f"{r['rtt_ms']:g} ms", r["kind"], f"{r[f'{drafts[0]}_tok_s']:.2f}"]
        for d in drafts[1:]:
            acc = r[f"{d}_acceptance"]
            row += [f"{r[f'{d}_tok_s']:.2f}", f"**{r[f'{d}_speedup']:.2f}**", "-" if acc is None else f"{acc * 100:.0f} %",
                    f"{r[f'{d}_tokens_per_step']:.2f}"]
        body.append(row)
    return (f"Generated from {ran('speculative')}: {data['settings']['tokens']} new tokens per prompt, greedy, 2 prompts "
            "per kind, the settings alternating; ngram: prompt lookup; model: the default model's own copy (bfloat16) "
            "drafting on the client.\n\n" + table(header, "ll" + "r" * (len(header) - 2), body))


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


# --- the loopback benchmarks (bench_local, bench_swarm, bench_api, bench_recovery, bench_finetune,
# bench_balance): each file carries its run's date, commit and machine (scripts/bench_common.py)

# goals from the issues (not results): swarm ÷ local decode with push and the servers' default
# threads; fine-tuning through the swarm ÷ local; the recovery's own cost
SWARM_GOAL = {"SmolLM2-135M": 1.30, "Llama-1.1B (random)": 1.10}
FINETUNE_GOAL = 0.75
RECOVERY_GOAL_MS = 1000


def ran(name: str) -> str:
    """Where a loopback figure comes from: "`local.json`, the run of 2026-12-05 (commit abc1234;
    2 cores of AMD EPYC ..., torch 2.9.1)"."""
    r = results(name)
    m = r["machine"]
    commit = f"commit {r['commit']}" + (" with uncommitted changes" if r.get("dirty") else "")
    cpu = f"{m['cpu_count']} cores" + (f" of {m['cpu']}" if m.get("cpu") else "")
    return f"`scripts/results/{name}.json`, the run of {r['date'][:10]} ({commit}; {cpu}, torch {m['torch']})"


def short(model: str) -> str:
    """ "SmolLM2-135M" → "135M", "Llama-1.1B (random)" → "1.1B"."""
    return model.split(" ")[0].split("-")[-1]


def times(n: int, word: str) -> str:
    """ "1 round", "3 rounds"."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def sig(x: float) -> str:
    """No decimals from 100 up, one below: 152, 19.8, 6.1."""
    return num(x) if x >= 100 else f"{x:.1f}"


def local() -> str:
    data = results("local")
    rows = [[r["model"], r["dtype"], num(r["prefill_tok_s"]), f"{r['decode_tok_s']:.1f}", sig(r["bound_tok_s"]),
             f"{r['of_bound'] * 100:.0f} %"] for r in data["rows"]]
    return (f"Generated from {ran('local')}; memory read bandwidth measured {data['read_bandwidth_gb_s']:.0f} GB/s.\n\n"
            + table(["model", "dtype", "prefill tok/s", "decode tok/s", "bound tok/s", "of bound"], "llrrrr", rows))


TRANSPORTS = {"libp2p, push": "libp2p, push", "libp2p, no push": "libp2p, no push", "pipes": "pipes (floor)"}


def swarm_decode() -> str:
    data = results("swarm")
    default = f"default ({data['machine']['torch_threads']})"
    rows = []
    for r in data["decode"]:
        goal = SWARM_GOAL.get(r["model"]) if r["transport"] == "libp2p, push" and r["threads"] == "default" else None
        ratio = f"**{r['ratio']:.2f}**" if goal else f"{r['ratio']:.2f}"
        rows.append([r["model"], default if r["threads"] == "default" else r["threads"], TRANSPORTS[r["transport"]],
                     f"{r['local_ms']:.1f}", f"{r['swarm_ms']:.1f}", ratio, f"≤ {goal:.2f}" if goal else ""])
    s = data["settings"]
    return (f"Generated from {ran('swarm')}: {s['dtype']}, {s['tokens']} new tokens, {times(s['rounds'], 'round')}.\n\n"
            + table(["model", "servers' `--threads`", "transport", "local ms/token", "swarm ms/token", "swarm ÷ local",
                     "goal"], "lllrrrr", rows))


def swarm_wire() -> str:
    rows = [[f"{w['frame']} hidden state", f"{w['round_trip_ms']:.2f} ms" if w["round_trip_ms"] < 10
             else f"{num(w['round_trip_ms'])} ms", f"{num(w['mb_s'])} MB/s"] for w in results("swarm")["wire"]]
    return table(["frame (one frame sent and echoed back between two hosts in one process)", "round trip",
                  "throughput"], "lrr", rows)


WIRE_PATHS = {
    "swarm": "swarm's path (asyncio ↔ trio, yamux)",
    "trio": "trio only (yamux, raw bytes)",
    "mplex": "swarm's path over mplex",
}


def wire_paths() -> str:
    data = results("wire")
    rows = data["rows"]
    sizes = data["settings"]["sizes"]
    paths = list(dict.fromkeys(r["path"] for r in rows))
    cell = {(r["path"], r["frame"]): r["round_trip_ms"] for r in rows}
    body = [[WIRE_PATHS.get(p, p), *(f"{cell[(p, s)]:.2f}" for s in sizes)] for p in paths]
    return (f"Generated from {ran('wire')}: medians of {data['settings']['repeats']} round trips per frame size "
            f"(fewer for 1 MB), the paths alternating.\n\n"
            + table(["round trip, ms (one frame out and echoed back, two hosts in one process)", *sizes],
                    "l" + "r" * len(sizes), body))


def wire_step() -> str:
    step = results("wire")["step"]
    trio = next(r["round_trip_ms"] for r in results("wire")["rows"] if r["path"] == "trio" and r["frame"] == "1 KB")
    stages = step["stages"]
    rows = [
        ["py-libp2p reads the frame (Noise, yamux; a quarter of the trio-only 1 KB round trip)", f"{trio / 4:.2f}"],
        ["decoded, queued, the compute thread woken (read → compute starts)", f"{stages['read → compute starts']:.2f}"],
        ["the libp2p thread woken, the answer encoded and written (compute done → written)",
         f"{stages['compute done → answer written']:.2f}"],
        ["**a server's hop, software**", f"**{step['software_per_hop_ms']:.2f}**"],
        ["(the block's compute, one small block, for scale)", f"{stages['compute']:.2f}"],
        ["(the client's round trip of a step through that server)", f"{step['step']:.2f}"],
    ]
    return (f"Generated from {ran('wire')}: medians of {step['samples']} decode steps of 1 KB hidden states "
            "(timestamps of `swarm.p2p.hop_trace`).\n\n" + table(["a server's decode step, ms", "median"], "lr", rows))


API_PATHS = {
    "api": "`swarm api` (persistent client), streamed",
    "reused": "`swarm.open` reused in-process (a chain per request)",
    "fresh": "`swarm.open` per request in-process (load, join, chain): `swarm generate`'s path",
    "cli": "`swarm generate` command (process start, model load, join)",
}


def api_paths() -> str:
    data = results("api")
    rows = [[API_PATHS.get(p["path"], p["path"]), (f"**{num(p['ttft_ms'])}**" if p["path"] == "api"
                                                    else num(p["ttft_ms"])), f"{p['decode_tok_s']:.1f}"]
            for p in data["paths"]]
    s = data["settings"]
    same = "equalled the Python API's in every round" if data["same_text"] else "**differed** from the Python API's"
    return (f"Generated from {ran('api')}: {s['tokens']} new tokens, medians of {times(s['rounds'], 'round')}; "
            f"the API's text "
            f"{same}, and `swarm.open` alone (load and join) took {num(data['open_ms'])} ms.\n\n"
            + table(["path", "TTFT ms", "decode tok/s"], "lrr", rows))


def api_concurrency() -> str:
    rows = [[str(c["requests"]), f"{c['aggregate_tok_s']:.1f}", num(c["mean_ttft_ms"])]
            for c in results("api")["concurrency"]]
    return table(["requests at once through `swarm api`", "aggregate tok/s", "mean TTFT ms"], "rrr", rows)


def recovery() -> str:
    data = results("recovery")
    same = "identical to" if data["identical"] else "**different** from"
    rows = [[str(k["token"]), f"{num(k['to_next_ms'])} ms", f"{num(k['replay_ms'])} ms", f"{num(k['recovery_ms'])} ms"]
            for k in data["kills"]]
    return (f"Generated from {ran('recovery')}: the output with kills was {same} the undisturbed one, at "
            f"{data['disturbed_tok_s']:.1f} tokens/s against {data['undisturbed_tok_s']:.1f}.\n\n"
            + table(["kill at token", "death → next token", "replay compute (same steps, locally)",
                     "recovery's own cost"], "rrrr", rows))


FINETUNE_SETTINGS = {
    "local": "local (every block in one process)",
    "recomputing": "local, recomputing as servers do (the floor)",
    "swarm": "swarm, 3 servers",
}


def finetune() -> str:
    data = results("finetune")
    rows = []
    for r in data["rows"]:
        goal = r["setting"] == "swarm"
        ratio = f"**{r['ratio']:.2f}**" if goal else f"{r['ratio']:.2f}"
        rows.append([FINETUNE_SETTINGS.get(r["setting"], r["setting"]), num(r["tok_s"]), ratio,
                     f"≥ {FINETUNE_GOAL:.2f}" if goal else ""])
    s = data["settings"]
    return (f"Generated from {ran('finetune')}: {times(s['rounds'], 'round')} of {times(s['steps'], 'step')} "
            "per setting.\n\n"
            + table(["setting", "training tokens/s", "÷ local", "goal"], "lrrr", rows)
            + f"\nWire per optimizer step: {data['wire_bytes_per_step'] / 1e6:.1f} MB. The hidden states are "
            f"{data['hidden_bytes_per_step'] / 1e6:.1f} MB of it (3 servers × 5 tensors of "
            f"{data['hidden_tensor_bytes'] / 1e6:.2f} MB).\n")


FRACTIONS = {0.5: "½", 0.25: "¼", 0.125: "⅛"}


def _share(x: float) -> str:
    from fractions import Fraction

    return FRACTIONS.get(x) or str(Fraction(x).limit_denominator(1000))


def balance() -> str:
    data = results("balance")
    rows = []
    for label, p in data["placements"].items():
        servers = ", ".join(f"{_share(s['share'])}→{s['blocks'][0]}:{s['blocks'][1]}" if s["blocks"] else
                            f"{_share(s['share'])}→gone" for s in p["servers"])
        where = ", ".join(f"{a}:{b}" for a, b in p["bottleneck"]["blocks"])
        agg = f"{p['aggregate_tok_s']:.2f}"
        rows.append([label, servers, f"{num(p['bottleneck']['throughput'])} ({where})",
                     f"**{agg}**" if label == "balanced" else agg, f"{p['per_client_tok_s']:.2f}"])
    s, pl = data["settings"], data["placements"]
    quotas = "" if s["cgroups"] else " **No CPU quotas** in this run: the servers differed only in what they announced."
    neck = pl["balanced"]["bottleneck"]["throughput"] / pl["naive"]["bottleneck"]["throughput"]
    return (f"Generated from {ran('balance')}: {times(s['rounds'], 'round')}, "
            f"{data['whole_run_s'] / 60:.1f} min in all."
            f"{quotas}\n\n"
            + table(["placement", "servers (share → blocks)", "bottleneck", "aggregate tok/s", "per client tok/s"],
                    "llrrr", rows)
            + f"\nBalanced ÷ naive: {data['ratio']:.2f} in aggregate (median of the rounds' ratios; the bottleneck "
            f"ratio is {neck:.2f}), ranging from {min(data['ratios']):.2f} to {max(data['ratios']):.2f} over rounds.\n")


def headline_loopback() -> str:
    """README's figures of the loopback benchmarks, beside :func:`headline`."""
    sw = results("swarm")
    push = {r["model"]: r["ratio"] for r in sw["decode"]
            if r["transport"] == "libp2p, push" and r["threads"] == "default"}
    ft = next(r for r in results("finetune")["rows"] if r["setting"] == "swarm")
    rec = results("recovery")
    kills = [k["recovery_ms"] for k in rec["kills"]]
    api = {p["path"]: p for p in results("api")["paths"]}
    rows = [
        ["swarm ÷ local decode, 3 loopback servers",
         ", ".join(f"**{v:.2f}** ({short(m)}" + (f", goal ≤ {SWARM_GOAL[m]:.2f})" if m in SWARM_GOAL else ")")
                   for m, v in push.items()),
         f"{sw['settings']['dtype']}, push, the servers' default threads (`swarm.json`)"],
        ["LoRA training through 3 servers ÷ local", f"**{ft['ratio']:.2f}** (goal ≥ {FINETUNE_GOAL:.2f})",
         f"SmolLM2-135M, {results('finetune')['settings']['dtype']} (`finetune.json`)"],
        ["recovery's own cost, per failed server", f"**{num(min(kills))}–{num(max(kills))} ms**"
         f" (goal < {RECOVERY_GOAL_MS / 1000:g} s)", "SIGKILL of a serving server; output "
         + ("unchanged" if rec["identical"] else "**changed**") + " (`recovery.json`)"],
        ["first token through `swarm api`", f"**{num(api['api']['ttft_ms'])} ms**",
         f"a fresh `swarm.open` per request: {num(api['fresh']['ttft_ms'])} ms (`api.json`)"],
    ]
    return table(["figure", "value", "setting"], "lrl", rows)


def concurrency() -> str:
    """bench_concurrency.py: sessions at once, batched (--max-batch 32) beside one at a time."""
    data = results("concurrency")
    rows = []
    for r in data["results"]:
        sessions = r["sessions"]
        one = sessions[min(sessions, key=int)]["batched"]["aggregate_tok_s"]
        for n, f in sessions.items():
            on, off = f["batched"], f["alone"]
            rows.append([f"{short(r['model'])} {r['dtype']}", n,
                         f"{on['aggregate_tok_s']:.1f} ({on['aggregate_tok_s'] / one:.1f}×)",
                         f"{off['aggregate_tok_s']:.1f} ({off['aggregate_tok_s'] / one:.1f}×)",
                         f"{on['ms_per_token_p50']:.0f} / {on['ms_per_token_p95']:.0f}",
                         f"{off['ms_per_token_p50']:.0f} / {off['ms_per_token_p95']:.0f}",
                         "yes" if f["tokens_equal"] else "**no**"])
    settings = data["settings"]
    return (f"Generated from {ran('concurrency')}: {settings['tokens']} new tokens per session after a prompt of "
            f"{settings['prompt_tokens']} tokens, {times(settings['rounds'], 'round')} per setting.\n\n"
            + table(["model", "sessions", "tok/s batched (× one session)", "tok/s one at a time",
                     "ms/token p50 / p95, batched", "ms/token p50 / p95, one at a time", "same tokens"],
                    "lrrrrrl", rows))


def invariance() -> str:
    """bench_invariance.py: which kernels give a row the same bits whatever rows share the call."""
    data = results("invariance")
    by_kernel: dict[str, list[dict]] = {}
    for row in data["linears"]:
        by_kernel.setdefault(row["kernel"], []).append(row)
    rows = []
    for kernel, shapes in by_kernel.items():
        invariant = all(r["invariant"] for r in shapes)
        classes = "; ".join(f"{r['shape']}: {', '.join(r['classes'])}" for r in shapes if not r["invariant"])
        worst = max(r["max_rel_diff"] for r in shapes)
        rows.append([kernel, "**yes**, from one row" if invariant else "no", classes or "one class",
                     "0" if worst == 0 else f"{worst:.1e}"])
    attention = data["attention"]
    batched = all(a["batched_equal"] for a in attention)
    padded = [a for a in attention if a["padded_max_diff"] > 0]
    costs = data["costs"]
    linear = "; ".join(f"{c['shape']}: {c['F.linear float32']:.2f} ms default, "
                       f"{c['packed float32, padded to 2 rows']:.2f} ms packed and padded" for c in costs["linear_1row_ms"])
    passes = {(r["dtype"], r["sessions"]): r for r in costs["model_pass"]}
    model = "; ".join(f"{dtype}: {passes[(dtype, 1)]['ms_per_token']:.1f} ms per token alone, "
                      f"{passes[(dtype, 16)]['ms_per_token']:.1f} with 16 sessions in a pass"
                      for dtype in ("float32", "bfloat16") if (dtype, 1) in passes and (dtype, 16) in passes)
    return (f"Generated from {ran('invariance')}. Row counts tried: 1–64, 96, 128, 200, 300; the classes are the "
            "row counts that give row 0 the same bits (count in brackets); the difference is the largest from "
            "the 300-row result, relative to its largest value.\n\n"
            + table(["kernel", "batch-invariant", "classes of row counts where not", "largest difference"], "llll", rows)
            + f"\nDecode attention, one matmul for n = 2–32 sessions over the same cached positions: "
            f"{'bit-identical to each alone' if batched else '**not** identical'} in every case measured; over "
            f"256 more (masked) positions: {'identical' if not padded else 'different in ' + str(len(padded)) + ' of ' + str(len(attention)) + ' cases (up to ' + format(max(a['padded_max_diff'] for a in padded), '.1e') + ')'}"
            f", so only sessions with the same bucket of positions attend together.\n\n"
            f"What invariance would cost in float32, one row: {linear}. The default model's 30 blocks in one "
            f"process: {model}.\n")


FIGURES: dict[str, Callable[[], str]] = {
    "headline": headline,
    "paper": paper,
    "paper_summary": paper_summary,
    "paper_sweep": paper_sweep,
    "offload": offload,
    "quant_precisions": quant_precisions,
    "quant_wire": quant_wire,
    "quant_layers": quant_layers,
    "local": local,
    "swarm_decode": swarm_decode,
    "swarm_wire": swarm_wire,
    "wire_paths": wire_paths,
    "wire_step": wire_step,
    "speculative": speculative,
    "api_paths": api_paths,
    "api_concurrency": api_concurrency,
    "recovery": recovery,
    "finetune": finetune,
    "balance": balance,
    "headline_loopback": headline_loopback,
    "concurrency": concurrency,
    "invariance": invariance,
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
        except FileNotFoundError as exc:
            missing = Path(exc.filename).relative_to(ROOT) if Path(exc.filename).is_relative_to(ROOT) else exc.filename
            raise FigureError(f"{where}: figure {name}: {missing} does not exist (run the benchmark that writes it, "
                              "see docs/benchmarks.md)") from exc
        except (KeyError, IndexError, TypeError, ValueError) as exc:
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
