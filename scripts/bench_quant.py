"""Quantized weights and compressed wire: quality, memory and speed, side by side in one run.

Per precision (float32, bfloat16, int8, nf4; int8 and nf4 compute in bfloat16):

1. Memory: a `swarm serve` process holding blocks 0:22 of the random 1.1B Llama; its resident
   memory from /proc once it is ready, beside the bytes its blocks' weights take (as it announces).
2. Local speed (1.1B): prefill tokens/s of a 128-token prompt and decode tokens/s, the precisions
   alternated over rounds (this machine's speed drifts) and the median taken.
3. Swarm (3 `swarm serve` processes on loopback, a third of the blocks each, all in the precision):
   perplexity of scripts/data/heldout_en.txt (written for the project, in no training set) for the
   default model and the 1.1B model, and decode tokens/s of the 1.1B model.
4. Wire (float32 servers of the default model): perplexity and bytes per token with each
   ``--wire-dtype``.

    python scripts/bench_quant.py [--models default,1.1b] [--ppl-tokens N] [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import swarm  # noqa: F401  (first: it sets OpenMP's spin count, which must precede PyTorch)
import torch
import torch.nn.functional as F

from bench_common import open_swarm  # sibling scripts (their folder is on sys.path)
from bench_local import random_1b_checkpoint

from swarm.engine.checkpoint import Checkpoint
from swarm.engine.client import ClientModel
from swarm.engine.default_model import ensure_default_model
from swarm.engine.generation import GenerationConfig
from swarm.launch import ServeProcess, even_ranges, running_swarm
from swarm.p2p.client import ClientConfig
from swarm.p2p.remote_blocks import RemoteBlocks

TEXT = Path(__file__).parent / "data" / "heldout_en.txt"
# precision -> (--dtype, --quant)
PRECISIONS = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"), "int8": ("bfloat16", "int8"),
              "nf4": ("bfloat16", "nf4")}
BOUNDS = {"int8": 0.02, "nf4": 0.10}  # perplexity within this of float32 (the acceptance)
WIRE_BOUND = 0.01
WINDOW = 512  # tokens per perplexity window (no overlap)


def rss_mb(pid: int) -> tuple[float, float]:
    """Resident and peak resident memory of ``pid`` in MB (from /proc)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


@contextmanager
def serving(path: Path, ranges: list[str], precision: str, home: str) -> Iterator[list[ServeProcess]]:
    """`swarm serve` processes of ``path`` for ``ranges`` in one precision (identities and logs in
    ``home/PRECISION``)."""
    dtype, quant = PRECISIONS[precision]
    flags = ("--dtype", dtype, "--quant", quant, "--throughput", "100", "--bandwidth", "1000", "--announce-period", "2")
    with running_swarm(path, ranges, Path(home) / precision, flags, env={**os.environ, "SWARM_HOME": home}) as servers:
        yield servers


def text_ids(path: Path, limit: int | None) -> torch.Tensor:
    """The held-out text's token ids (the model's tokenizer, or the default model's for a
    checkpoint without one, like the random 1.1B)."""
    try:
        client = ClientModel.load(path)
    except Exception:
        client = ClientModel.load(ensure_default_model())
    ids = client.encode(TEXT.read_text())
    return torch.tensor(ids[:limit] if limit else ids)


def perplexity(head, run_blocks, ids: torch.Tensor, vocab: int) -> float:
    """exp(mean next-token loss) over windows of :data:`WINDOW` tokens."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids) - 1, WINDOW):
            chunk = ids[i : i + WINDOW + 1] % vocab
            if len(chunk) < 2:
                break
            hidden = run_blocks(head.embed(chunk[None, :-1]))
            logits = head.logits(hidden.to(torch.float32)).float()
            nll += F.cross_entropy(logits[0], chunk[1:], reduction="sum").item()
            count += len(chunk) - 1
    return math.exp(nll / count)


def swarm_perplexity(path: Path, first: str, ids: torch.Tensor, **client_kw) -> float:
    ckpt = Checkpoint(path)
    head = ckpt.load_head(torch.float32)
    cfg = ClientConfig(initial_peers=[first], request_timeout=120, step_timeout=600, wait_timeout=60, **client_kw)
    with RemoteBlocks.connect(ckpt, [first], cfg) as remote:
        return perplexity(head, lambda h: remote(h), ids, ckpt.config.vocab_size)


def swarm_decode(path: Path, first: str, tokens: int, rounds: int) -> float:
    """Decode tokens/s through the swarm (median over rounds of the median time between tokens), by
    a client of the facade joined once."""
    prompt = list(range(100, 116))
    rates = []
    with open_swarm(path, [first], dtype="bfloat16") as client:
        for _ in range(rounds):
            stamps: list[float] = []
            client.generate_ids(prompt, GenerationConfig(max_new_tokens=tokens),
                                on_token=lambda _: stamps.append(time.perf_counter()))
            rates.append(1 / statistics.median(b - a for a, b in zip(stamps, stamps[1:])))
    return statistics.median(rates)


def local_speed(path: Path, rounds: int, steps: int = 32, prompt: int = 128) -> dict[str, tuple[float, float]]:
    """Prefill and decode tokens/s of every precision, alternated over ``rounds``."""
    ckpt = Checkpoint(path)
    models = {}
    for name, (dtype, quant) in PRECISIONS.items():
        torch_dtype = getattr(torch, dtype)
        models[name] = (ckpt.load_head(torch_dtype), ckpt.load_blocks(0, ckpt.num_blocks, torch_dtype, quant=quant))
    ids = torch.randint(100, 1000, (1, prompt), generator=torch.Generator().manual_seed(0))
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    with torch.no_grad():
        for r in range(rounds + 1):  # the first round warms up
            for name, (head, blocks) in models.items():
                session = blocks.open_session(batch=1, max_length=prompt + steps + 1)
                t = time.perf_counter()
                token = head.logits(blocks(head.embed(ids), session)[:, -1]).argmax(-1, keepdim=True)
                prefill = prompt / (time.perf_counter() - t)
                t = time.perf_counter()
                for _ in range(steps):
                    token = head.logits(blocks(head.embed(token), session)[:, -1]).argmax(-1, keepdim=True)
                decode = steps / (time.perf_counter() - t)
                session.close()
                if r:
                    samples[name].append((prefill, decode))
    return {name: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v)) for name, v in samples.items()}


def memory(path: Path, home: str) -> dict[str, dict]:
    """RSS of a server of blocks 0:22 (all blocks when fewer) per precision."""
    blocks = f"0:{min(22, Checkpoint(path).num_blocks)}"
    out = {}
    for precision in PRECISIONS:
        with serving(path, [blocks], precision, home) as servers:
            time.sleep(2)  # let the announce loop and the host settle
            rss, peak = rss_mb(servers[0].pid)
            status = subprocess.run([sys.executable, "-m", "swarm.cli.main", "status", "--json", "--initial-peers",
                                     servers[0].maddr], capture_output=True, text=True, env={**os.environ, "SWARM_HOME": home})
            weights = json.loads(status.stdout)["servers"][0]["weight_bytes"] / 2**20
            out[precision] = {"rss_mb": round(rss), "peak_mb": round(peak), "weights_mb": round(weights),
                              "overhead_mb": round(rss - weights)}
            print(f"  memory {precision:9} blocks {blocks}: RSS {rss:7.0f} MB (peak {peak:.0f}), weights {weights:7.0f} MB",
                  flush=True)
    return out


def layer_bench(repeats: int = 20) -> list[dict]:
    """One 2048×5632 linear (TinyLlama's MLP shape), 1 thread: forward at batch 1 and 128 without
    gradients, forward + input gradient at batch 1, and the output's error against float32, for our
    layers and bitsandbytes' own modules (eval and train mode) side by side."""
    import logging
    import warnings

    from swarm.engine.fast import PackedLinear
    from swarm.engine.quant import Int8Linear, NF4Linear, bnb

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(5632, 2048, generator=g) * 0.02
    x1, x128 = torch.randn(1, 2048, generator=g), torch.randn(128, 2048, generator=g)
    want = x128 @ weight.T
    plain = torch.nn.Linear(2048, 5632, bias=False)
    plain.weight.data = weight.to(torch.bfloat16)
    layers = {"bfloat16 nn.Linear": plain, "bfloat16 packed (ours)": PackedLinear(plain),
              "int8 (ours)": Int8Linear(weight, None), "nf4 (ours)": NF4Linear(weight, None)}
    lib = bnb()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for mode in ("eval", "train"):
        q8 = lib.nn.Linear8bitLt(2048, 5632, bias=False, has_fp16_weights=False, threshold=6.0)
        q8.load_state_dict({"weight": weight.to(torch.float16)})
        q4 = lib.nn.Linear4bit(2048, 5632, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        q4.weight = lib.nn.Params4bit(weight.to(torch.bfloat16), requires_grad=False, quant_type="nf4")
        q4 = q4.to("cpu")
        layers[f"int8 bitsandbytes Linear8bitLt, {mode}"] = q8.to("cpu").train(mode == "train")
        layers[f"nf4 bitsandbytes Linear4bit, {mode}"] = q4.train(mode == "train")

    def timed(fn) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t) / repeats * 1e3

    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes warns per call (casts, a missing autograd kernel)
        for name, layer in layers.items():
            with torch.no_grad():
                b1 = timed(lambda: layer(x1.to(torch.bfloat16)))
                b128 = timed(lambda: layer(x128.to(torch.bfloat16)))
                err = ((layer(x128.to(torch.bfloat16)).float() - want).norm() / want.norm()).item()

            def backward():
                xg = x1.to(torch.bfloat16).requires_grad_(True)
                out = layer(xg)
                if out.requires_grad:
                    out.float().sum().backward()
                return xg.grad

            grad = backward() is not None
            rows.append({"layer": name, "batch1_ms": b1, "batch128_ms": b128,
                         "fwd_bwd_ms": timed(backward) if grad else None, "error": err})
            print(f"  layer {name:38} batch 1 {b1:6.2f} ms, batch 128 {b128:6.1f} ms, fwd+bwd "
                  + (f"{rows[-1]['fwd_bwd_ms']:6.1f} ms" if grad else "no gradient") + f", error {err:.1e}", flush=True)
    torch.set_num_threads(threads)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="default,1.1b")
    parser.add_argument("--ppl-tokens", type=int, default=0, help="use only the text's first N tokens (0: all)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per decode run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--layers", action=argparse.BooleanOptionalAction, default=True,
                        help="the one-layer comparison with bitsandbytes' modules")
    args = parser.parse_args()
    paths = {"default": ("SmolLM2-135M", ensure_default_model), "1.1b": ("Llama-1.1B (random)", random_1b_checkpoint)}
    results: dict = {"threads": torch.get_num_threads(), "models": {}}
    if args.layers:
        print("one 2048×5632 linear, 1 thread:", flush=True)
        results["layers"] = layer_bench()
    with tempfile.TemporaryDirectory(prefix="swarm-bench-quant-") as home:
        for key in args.models.split(","):
            label, get = paths[key]
            path = get()
            ckpt = Checkpoint(path)
            ids = text_ids(path, args.ppl_tokens or None)
            print(f"{label}: {ckpt.num_blocks} blocks, perplexity over {len(ids)} tokens of {TEXT.name}", flush=True)
            res: dict = {"tokens": len(ids), "precisions": {}}
            results["models"][label] = res
            for precision in PRECISIONS:
                with serving(path, even_ranges(ckpt.num_blocks, 3), precision, home) as servers:
                    row = {"ppl": swarm_perplexity(path, servers[0].maddr, ids)}
                    if key == "1.1b":
                        row["swarm_decode_tok_s"] = swarm_decode(path, servers[0].maddr, args.tokens, args.rounds)
                    if precision == "float32":
                        res["wire"] = wire_rows(path, servers[0].maddr, ids, ckpt.config.hidden_size, row["ppl"])
                res["precisions"][precision] = row
                print(f"  {precision:9} perplexity {row['ppl']:.3f}"
                      + (f", swarm decode {row['swarm_decode_tok_s']:.1f} tok/s" if "swarm_decode_tok_s" in row else ""),
                      flush=True)
            if key == "1.1b":
                for precision, (prefill, decode) in local_speed(path, args.rounds).items():
                    res["precisions"][precision].update(local_prefill_tok_s=prefill, local_decode_tok_s=decode)
                    print(f"  local {precision:9} prefill {prefill:6.1f} tok/s, decode {decode:5.1f} tok/s", flush=True)
                res["memory"] = memory(path, home)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def wire_rows(path: Path, first: str, ids: torch.Tensor, hidden: int, float32_ppl: float) -> dict:
    """Perplexity and bytes per token (one hidden state, one way) per wire dtype, through float32
    servers (whose float32 wire is the float32 row above)."""
    from swarm.p2p.compression import encoded_nbytes

    out = {}
    for wire in ("float32", "bfloat16", "int8"):
        ppl = float32_ppl if wire == "float32" else swarm_perplexity(path, first, ids, wire_dtype=wire)
        out[wire] = {"ppl": ppl, "bytes_per_token": encoded_nbytes([1, 1, hidden], wire)}
        print(f"  wire {wire:9} perplexity {ppl:.3f}, {out[wire]['bytes_per_token']} bytes per token per hop", flush=True)
    return out


def report(results: dict) -> None:
    for label, res in results["models"].items():
        print("\n| model | precision | perplexity | vs float32 | swarm decode tok/s | local prefill tok/s "
              "| local decode tok/s | server RSS (blocks 0:22) | weights |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        base = res["precisions"]["float32"]["ppl"]
        for precision, row in res["precisions"].items():
            change = row["ppl"] / base - 1
            bound = BOUNDS.get(precision)
            verdict = "" if bound is None else (" ✓" if abs(change) <= bound else f" ✗ (bound {bound:.0%})")
            mem = res.get("memory", {}).get(precision)
            cells = [label, precision, f"{row['ppl']:.3f}", f"{change:+.2%}{verdict}",
                     f"{row['swarm_decode_tok_s']:.1f}" if "swarm_decode_tok_s" in row else "",
                     f"{row['local_prefill_tok_s']:.0f}" if "local_prefill_tok_s" in row else "",
                     f"{row['local_decode_tok_s']:.1f}" if "local_decode_tok_s" in row else "",
                     f"{mem['rss_mb']} MB" if mem else "", f"{mem['weights_mb']} MB" if mem else ""]
            print("| " + " | ".join(cells) + " |")
        if "memory" in res:
            m = res["memory"]
            print(f"\n{label}: nf4 server RSS / bfloat16 = {m['nf4']['rss_mb'] / m['bfloat16']['rss_mb']:.1%} (bound 40 %); "
                  f"runtime overhead beyond the weights {min(v['overhead_mb'] for v in m.values())}–"
                  f"{max(v['overhead_mb'] for v in m.values())} MB")
            p = res["precisions"]
            print(f"{label}: local decode nf4 / bfloat16 = {p['nf4']['local_decode_tok_s'] / p['bfloat16']['local_decode_tok_s']:.2f}× "
                  f"(bound 1.5×), int8 / bfloat16 = {p['int8']['local_decode_tok_s'] / p['bfloat16']['local_decode_tok_s']:.2f}×")
        if "wire" in res:
            print(f"\n| {label}: wire dtype | bytes per token per hop | perplexity | vs float32 wire |")
            print("|---|---:|---:|---:|")
            base = res["wire"]["float32"]["ppl"]
            for wire, row in res["wire"].items():
                change = row["ppl"] / base - 1
                verdict = " ✓" if wire != "int8" or abs(change) <= WIRE_BOUND else f" ✗ (bound {WIRE_BOUND:.0%})"
                print(f"| {wire} | {row['bytes_per_token']} | {row['ppl']:.3f} | {change:+.2%}{verdict} |")


if __name__ == "__main__":
    main()
