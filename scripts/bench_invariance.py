"""Which kernels are batch-invariant here, by how much the others differ, and what invariance costs.

A server batches sessions' steps only in ways that leave each session's output bit-identical to
its step alone (docs/serving.md, "Many users at once"). This measures the facts that rests on,
for the default model's and a 1.1B Llama's linear shapes:

1. Linears: for each kernel, the row counts M (1–300) whose row 0 equals row 0 at M = 300 (the
   classes of M that give the same bits), and the largest difference from it.
   - PyTorch's default ``F.linear`` in float32 and bfloat16;
   - oneDNN packed weights (``engine/fast.py``) in bfloat16, and in float32 (not used: see 3);
   - bitsandbytes int8 and nf4 in eval mode, where installed.
2. Decode attention: the same session's attention alone and among n = 2–32 sessions in one
   matmul over the same number of cached positions, and over more positions (padding).
3. Costs, ms per call, 1 row: default float32 ``F.linear`` against packed float32 padded to 2 rows
   (the cheapest invariant float32 kernel); and the per-token time of the default model's 30
   blocks one session alone against 16 sessions batched, float32 and bfloat16.

    python scripts/bench_invariance.py [--out scripts/results/invariance.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import swarm  # noqa: F401  (first: it sets OpenMP's spin count, which must precede PyTorch)
import torch
import torch.nn.functional as F

from bench_common import add_out, write_results

SHAPES = [(576, 1536), (1536, 576), (576, 192), (2048, 5632), (5632, 2048), (2048, 256)]
ROWS = [*range(1, 65), 96, 128, 200, 300]


def classes(fn, x: torch.Tensor) -> tuple[list[list[int]], float]:
    """Row counts grouped by the bits of row 0, and the largest difference from M = max."""
    with torch.no_grad():
        outs = {m: fn(x[:m])[0] for m in ROWS}
    ref = outs[ROWS[-1]]
    groups: list[list[int]] = []
    for m, out in outs.items():
        for group in groups:
            if torch.equal(outs[group[0]], out):
                group.append(m)
                break
        else:
            groups.append([m])
    worst = max((out.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-30)
                for out in outs.values())
    return groups, worst


def ranges(groups: list[list[int]]) -> list[str]:
    return [f"{g[0]}" if len(g) == 1 else f"{g[0]}..{g[-1]} ({len(g)})" for g in groups]


def linears() -> list[dict]:
    torch.manual_seed(0)
    rows = []
    kernels = {
        "F.linear float32": (torch.float32, lambda w: (lambda x: F.linear(x, w))),
        "F.linear bfloat16": (torch.bfloat16, lambda w: (lambda x: F.linear(x, w))),
        "packed bfloat16": (torch.bfloat16, _packed),
        "packed float32": (torch.float32, _packed),
    }
    try:
        from swarm.engine.quant import bnb

        bnb()
        kernels["bitsandbytes int8 (eval)"] = (torch.bfloat16, lambda w: _quantized(w, "int8"))
        kernels["bitsandbytes nf4 (eval)"] = (torch.bfloat16, lambda w: _quantized(w, "nf4"))
    except Exception as exc:  # noqa: BLE001 (reported, not fatal: bitsandbytes is optional)
        print(f"bitsandbytes not measured: {exc}")
    for name, (dtype, make) in kernels.items():
        for i, o in SHAPES:
            w = (torch.randn(o, i) / i**0.5).to(dtype)
            x = torch.randn(ROWS[-1], i).to(dtype)
            groups, worst = classes(make(w), x)
            rows.append({"kernel": name, "shape": f"{i}→{o}", "classes": ranges(groups), "invariant": len(groups) == 1,
                         "max_rel_diff": worst})
            print(f"{name:26s} {i:5d}→{o:<5d} {', '.join(ranges(groups))}   max rel diff {worst:.1e}", flush=True)
    return rows


def _packed(w: torch.Tensor):
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _quantized(w: torch.Tensor, kind: str):
    from swarm.engine.quant import quantize_linears

    holder = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype))
    holder[0].weight.data = w
    quantize_linears(holder, kind)
    return lambda x: holder(x)


def attention() -> list[dict]:
    torch.manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for kv_heads, group, d in ((3, 3, 64), (4, 8, 64)):
            for length in (64, 192, 512, 1024):
                n = 32
                q = torch.randn(n, kv_heads, group, d).to(dtype)
                k, v = (torch.randn(n, kv_heads, length, d).to(dtype) for _ in range(2))
                alone = [_attend(q[i : i + 1], k[i : i + 1], v[i : i + 1], length) for i in range(n)]
                batched = all(torch.equal(_attend(q[:m], k[:m], v[:m], length)[i : i + 1], alone[i])
                              for m in (2, 8, 17, 32) for i in range(m))
                pad = torch.zeros(1, kv_heads, 256, d, dtype=dtype)
                padded = _attend(q[:1], torch.cat([k[:1], pad], 2), torch.cat([v[:1], pad], 2), length)
                diff = (padded.float() - alone[0].float()).abs().max().item()
                rows.append({"dtype": str(dtype).removeprefix("torch."), "heads": f"{kv_heads}×{group}", "head_dim": d,
                             "positions": length, "batched_equal": batched, "padded_max_diff": diff})
                print(f"attention {dtype} {kv_heads}x{group}x{d} L={length}: batched equal {batched}, "
                      f"+256 padded positions differ by {diff:.1e}", flush=True)
    return rows


def _attend(q, k, v, valid: int) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores[..., valid:] = float("-inf")
    return torch.matmul(scores.float().softmax(-1).to(v.dtype), v)


def timed(fn, n: int = 200) -> float:
    with torch.no_grad():
        for _ in range(10):
            fn()
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples.append((time.perf_counter() - start) / n * 1e3)
    return statistics.median(samples)


def costs() -> dict:
    torch.manual_seed(0)
    out = {"linear_1row_ms": []}
    for i, o in ((576, 1536), (2048, 5632)):
        w = torch.randn(o, i) / i**0.5
        x = torch.randn(2, i)
        packed = _packed(w)
        row = {"shape": f"{i}→{o}", "F.linear float32": timed(lambda: F.linear(x[:1], w)),
               "packed float32, padded to 2 rows": timed(lambda: packed(x))}
        out["linear_1row_ms"].append(row)
        print(f"float32 {i}→{o}, one row: F.linear {row['F.linear float32']:.3f} ms, packed padded to 2 rows "
              f"{row['packed float32, padded to 2 rows']:.3f} ms", flush=True)
    out["model_pass"] = _model_passes()
    return out


def _model_passes() -> list[dict]:
    from swarm.engine.adapters import attach
    from swarm.engine.checkpoint import Checkpoint
    from swarm.engine.default_model import ensure_default_model

    ckpt = Checkpoint(ensure_default_model(quiet=True))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        blocks = attach(ckpt.load_blocks(0, ckpt.num_blocks, dtype))
        for n in (1, 16):
            sessions = [blocks.open_session(1, 256) for _ in range(n)]
            with torch.no_grad():
                for s in sessions:
                    blocks(torch.randn(1, 40, ckpt.config.hidden_size), s)

            def step():
                blocks.run_batch([(torch.randn(1, 1, ckpt.config.hidden_size), s) for s in sessions])
                for s in sessions:
                    s.rewind(40)

            ms = timed(step, n=10)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "sessions": n, "ms_per_pass": ms,
                         "ms_per_token": ms / n})
            print(f"default model, 30 blocks, {dtype}: {n} session(s) per pass {ms:.1f} ms, {ms / n:.1f} ms per token",
                  flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out(parser, "invariance")
    args = parser.parse_args()
    figures = {"linears": linears(), "attention": attention(), "costs": costs()}
    write_results(args.out, "invariance", {"rows": ROWS, "threads": torch.get_num_threads()}, figures)


if __name__ == "__main__":
    main()
