"""LoRA training speed through the swarm against local training, in one run, on the same batches.

The default model (SmolLM2-135M, 30 blocks), LoRA rank 8 on q/v, AdamW. Each round trains
``--steps`` optimizer steps locally (every block in this process) and then the same steps through
3 `swarm serve` processes on loopback holding blocks 0:10, 10:20 and 20:30; rounds alternate
(this machine's speed drifts by 10–20 % over minutes). The swarm's blocks are those of a client of
the public facade (``swarm.open(...).blocks``), as a user's own training loop has them. Prints
training tokens/s of both, their ratio (the median of the rounds' ratios), and the bytes that
crossed the wire per step; writes them to scripts/results/finetune.json (``--out``).

Also the floor of the swarm's design on any machine: servers keep no state between requests, so
a backward request recomputes its span's forward (as the paper's servers do); **local with
recomputation** trains in this process with the same recomputation (forward without autograd,
then per span: forward again with autograd, backward). Its ratio to plain local training is what
the swarm could reach with free networking and a core per server.

    python scripts/bench_finetune.py [--steps 6] [--rounds 3] [--batch 8] [--length 64] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import swarm  # first: it sets OpenMP's spin count, which must precede PyTorch
import torch
import torch.nn.functional as F

from bench_common import add_out, write_results  # a sibling script (its folder is on sys.path)

from swarm.engine.adapters import AdapterSpec, LocalBlocks, init_lora, resolve_targets, run_backward
from swarm.engine.checkpoint import Checkpoint, parse_dtype
from swarm.engine.default_model import ensure_default_model
from swarm.launch import even_ranges, running_swarm


class RecomputingBlocks(torch.nn.Module):
    """Local blocks trained the way the swarm trains them: the forward runs without autograd,
    keeping each span's input; backward recomputes each span's forward with autograd, in reverse."""

    def __init__(self, blocks, cuts: list[int]):
        super().__init__()
        self.spans = [LocalBlocks(blocks.sub(a, b)).blocks for a, b in zip(cuts, cuts[1:])]

    def forward(self, hidden, tensors, spec):
        names = list(tensors)
        return _Recompute.apply(self, spec, names, hidden, *(tensors[n] for n in names))


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, owner, spec, names, hidden, *values):
        from swarm.engine.adapters import run_forward, span_tensors

        tensors = dict(zip(names, values))
        inputs = []
        for span in owner.spans:
            inputs.append(hidden)
            hidden = run_forward(span, hidden, span_tensors(tensors, span.start, span.end), spec)
        ctx.owner, ctx.spec, ctx.names, ctx.inputs, ctx.tensors = owner, spec, names, inputs, tensors
        return hidden

    @staticmethod
    def backward(ctx, grad):
        from swarm.engine.adapters import span_tensors

        grads = {}
        for span, x in zip(reversed(ctx.owner.spans), reversed(ctx.inputs)):
            grad, part = run_backward(span, x, grad, span_tensors(ctx.tensors, span.start, span.end), ctx.spec)
            grads.update(part)
        return (None, None, None, grad, *(grads.get(n) for n in ctx.names))


def train(head, blocks, batches, tensors, steps: int) -> tuple[float, int]:
    """``steps`` AdamW steps over ``batches``; returns (seconds, tokens)."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-3)
    spec = AdapterSpec(scale=2.0)
    tokens, start = 0, time.perf_counter()
    for step in range(steps):
        ids = batches[step % len(batches)]
        logits = head.logits(blocks(head.embed(ids), params, spec))
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tokens += ids.numel()
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per round and setting")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--dtype", default="float32")
    add_out(parser, "finetune")
    args = parser.parse_args()

    path = ensure_default_model()
    ckpt = Checkpoint(path)
    dtype = parse_dtype(args.dtype)
    head = ckpt.load_head(dtype)
    cuts = [i * ckpt.num_blocks // 3 for i in range(4)]  # the servers' ranges, recomputed locally alike
    local = LocalBlocks(ckpt.load_blocks(0, ckpt.num_blocks, dtype))
    recomputing = RecomputingBlocks(local.blocks, cuts)
    tensors = init_lora(ckpt, resolve_targets(ckpt, None), rank=8, seed=0)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(100, 40000, (args.batch, args.length), generator=generator) for _ in range(args.steps)]
    with (
        tempfile.TemporaryDirectory(prefix="swarm-bench-") as home,
        running_swarm(path, even_ranges(ckpt.num_blocks, 3), home, ("--dtype", args.dtype)) as servers,
    ):
        with swarm.open(path, initial_peers=[servers[0].maddr]) as client:
            remote = client.blocks
            settings = {"local": local, "local, recomputing": recomputing, "swarm (3 servers)": remote}
            for blocks in settings.values():  # warm up: kernels, connections, adapters on servers
                train(head, blocks, batches[:1], tensors, 1)
            rates: dict[str, list[float]] = {name: [] for name in settings}
            wire = []
            for _ in range(args.rounds):
                for name, blocks in settings.items():
                    before = remote.wire_bytes
                    seconds, tokens = train(head, blocks, batches, tensors, args.steps)
                    rates[name].append(tokens / seconds)
                    if blocks is remote:
                        wire.append((remote.wire_bytes - before) / args.steps)
    print(f"LoRA r=8 q/v training, SmolLM2-135M, {args.dtype}, batch {args.batch} × {args.length} tokens, "
          f"{args.steps} steps per run, {args.rounds} alternating rounds:")
    print(f"  {'setting':<22}{'tokens/s':>10}{'÷ local':>10}")
    rows = []
    for key, (name, values) in zip(("local", "recomputing", "swarm"), rates.items()):
        ratio = statistics.median(v / loc for v, loc in zip(values, rates["local"]))
        print(f"  {name:<22}{statistics.median(values):>10.1f}{ratio:>10.2f}")
        rows.append({"setting": key, "label": name, "tok_s": statistics.median(values), "ratio": ratio,
                     "tok_s_rounds": values})
    hidden = args.batch * args.length * ckpt.config.hidden_size * dtype.itemsize
    print(f"  wire per step: {statistics.median(wire) / 1e6:.2f} MB "
          f"(hidden states alone: {3 * 5 * hidden / 1e6:.2f} MB = 3 servers × 5 tensors of {hidden / 1e6:.2f} MB: "
          f"forward input and output, backward input, gradient in and out)")
    settings = {"steps": args.steps, "rounds": args.rounds, "batch": args.batch, "length": args.length,
                "dtype": args.dtype, "rank": 8, "targets": "q/v (the family's default)", "optimizer": "AdamW, lr 1e-3",
                "servers": even_ranges(ckpt.num_blocks, 3)}
    write_results(args.out, "finetune", settings, {
        "rows": rows, "wire_bytes_per_step": statistics.median(wire),
        "hidden_tensor_bytes": hidden, "hidden_bytes_per_step": 3 * 5 * hidden,
    })


if __name__ == "__main__":
    main()
