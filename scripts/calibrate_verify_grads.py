"""Calibrate the gradient tolerances of swarm/p2p/verify.py (``GRAD_ERROR``) on the default model.

For spans of 1, 10 and 30 blocks, a LoRA (r=8, the family's default targets, B non-zero) and a
batch of 4 × 64 random tokens: the backward pass of each honest precision (bfloat16; int8 weights
computing in float32; nf4 weights computing in bfloat16) against float32's, as
:func:`~swarm.p2p.verify.relative_error` of the gradient with respect to the span's input and
the worst of its adapter gradients. Prints a line per case and writes
scripts/results/calibrate_verify_grads.json. About a minute on 2 CPU cores.

    python scripts/calibrate_verify_grads.py
"""

from __future__ import annotations

import argparse

import swarm  # noqa: F401  (first: it sets OpenMP's spin count, which must precede PyTorch)
import torch

from bench_common import add_out, write_results  # sibling scripts (their folder is on sys.path)

from swarm.engine.adapters import AdapterSpec, LocalBlocks, init_lora, resolve_targets, span_tensors
from swarm.engine.checkpoint import Checkpoint
from swarm.engine.default_model import ensure_default_model
from swarm.p2p.verify import relative_error

SPANS = [(0, 30), (0, 10), (10, 20), (20, 30), (0, 1), (29, 30)]
PRECISIONS = [("float32", "none"), ("bfloat16", "none"), ("float32", "int8"), ("bfloat16", "nf4")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out(parser, "calibrate_verify_grads")
    args = parser.parse_args()
    ckpt = Checkpoint(ensure_default_model())
    g = torch.Generator().manual_seed(1)
    lora = init_lora(ckpt, resolve_targets(ckpt, None), rank=8, seed=0)
    for name, value in lora.items():
        if name.endswith("lora_B"):
            value.normal_(0, 0.02, generator=g)
    ids = torch.randint(100, 40000, (4, 64), generator=g)
    x0 = ckpt.load_head().embed(ids).detach()
    results = {}
    for a, b in SPANS:
        with torch.no_grad():
            x = x0 if a == 0 else LocalBlocks(ckpt.load_blocks(0, a, torch.float32))(x0)
        grads = {}
        for dtype, quant in PRECISIONS:
            torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
            blocks = LocalBlocks(ckpt.load_blocks(a, b, torch_dtype, quant=quant))
            xi = x.clone().to(torch_dtype).requires_grad_()
            leaves = {n: t.detach().clone().requires_grad_() for n, t in span_tensors(lora, a, b).items()}
            y = blocks(xi, leaves, AdapterSpec(scale=2.0))
            torch.autograd.backward(y, (torch.randn(y.shape, generator=torch.Generator().manual_seed(2)) * 1e-3).to(y.dtype))
            grads[(dtype, quant)] = (xi.grad.float(), {n: t.grad.float() for n, t in leaves.items()})
        ref_input, ref_parts = grads[PRECISIONS[0]]
        for dtype, quant in PRECISIONS[1:]:
            grad_input, parts = grads[(dtype, quant)]
            errors = {"grad_input": relative_error(grad_input, ref_input),
                      "adapter": max(relative_error(parts[n], ref_parts[n]) for n in parts)}
            results[f"{a}:{b} {dtype}/{quant}"] = errors
            print(f"blocks {a}:{b} {dtype}/{quant}: grad_input {errors['grad_input']:.3f}, adapter {errors['adapter']:.3f}",
                  flush=True)
    worst = {}
    for key, errors in results.items():
        precision = key.split(" ")[1]
        worst[precision] = max(worst.get(precision, 0.0), *errors.values())
    print("worst per precision:", {k: round(v, 3) for k, v in worst.items()})
    write_results(args.out, "calibrate_verify_grads", {"spans": SPANS, "batch": "4 × 64", "lora": "r=8, default targets"},
                  {"cases": results, "worst": worst})


if __name__ == "__main__":
    main()
