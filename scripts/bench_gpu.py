"""GPU figures, side by side in one run on one GPU: greedy decode tokens/s of the default model
held whole here (``--local --device cuda``), of transformers' ``generate`` on the same GPU (what
a user has without swarm), and of a swarm of three `swarm serve --device cuda` processes
splitting its blocks on that same GPU (a client with its head on the GPU too), against the
memory-bandwidth bound of the GPU: its measured copy bandwidth ÷ the bytes of weights one token
reads (every block's and the LM head's).

Rounds alternate the three (the figures are medians over rounds). Decode rates exclude the
prefill: (tokens − 1) ÷ the time from the first new token to the last.

Writes scripts/results/gpu.json (``--out``). Needs a CUDA GPU.

    python scripts/bench_gpu.py [--tokens 64] [--rounds 3] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import swarm  # noqa: F401  (first: it sets OpenMP's spin count, which must precede PyTorch)

import torch
from bench_common import add_out, write_results  # sibling scripts (their folder is on sys.path)

from swarm.config import ClientOptions
from swarm.engine.checkpoint import parse_dtype
from swarm.engine.client import ClientModel, local_sessions
from swarm.engine.default_model import ensure_default_model
from swarm.engine.generation import GenerationConfig, generate
from swarm.engine.quant import weight_bytes
from swarm.facade import Swarm
from swarm.launch import running_swarm

PROMPT = "A short story about a lighthouse keeper who finds a message in a bottle:"
GPU = torch.device("cuda", 0)


def copy_bandwidth(device: torch.device, mib: int = 1024, repeats: int = 10) -> float:
    """GB/s a device-to-device copy reaches (bytes read plus bytes written)."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    return 2 * src.numel() * repeats / (time.perf_counter() - start) / 1e9


def _rate(run) -> float:
    stamps: list[float] = []
    run(lambda token: stamps.append(time.perf_counter()))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def local_rate(client: ClientModel, blocks, prompt: list[int], tokens: int) -> float:
    cfg = GenerationConfig(max_new_tokens=tokens, draft="none", eos_token_ids=())
    return _rate(lambda on_token: generate(client.head, local_sessions(blocks), prompt, cfg, on_token))


def transformers_rate(model, prompt: list[int], tokens: int) -> float:
    ids = torch.tensor([prompt], device=GPU)

    def timed(n: int) -> float:
        torch.cuda.synchronize(GPU)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize(GPU)
        return time.perf_counter() - start

    one, many = timed(1), timed(tokens)
    return (tokens - 1) / (many - one)


def swarm_rate(client: Swarm, prompt: list[int], tokens: int) -> float:
    cfg = GenerationConfig(max_new_tokens=tokens, draft="none", eos_token_ids=())
    return _rate(lambda on_token: client.generate_ids(prompt, cfg, on_token=on_token))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    add_out(parser, "gpu")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is false)")
    import transformers

    dtype = parse_dtype(args.dtype)
    model_dir = ensure_default_model()
    client = ClientModel.load(model_dir, dtype, GPU)
    prompt = client.encode(PROMPT)
    blocks = client.checkpoint.load_blocks(0, client.checkpoint.num_blocks, dtype, devices=(GPU,))
    lm_head = client.checkpoint.read(["lm_head.weight"] if "lm_head.weight" in client.checkpoint.tensor_names()
                                     else ["model.embed_tokens.weight"], dtype)
    per_token = weight_bytes(blocks) + sum(t.numel() * t.element_size() for t in lm_head.values())
    bandwidth = copy_bandwidth(GPU)
    bound = bandwidth * 1e9 / per_token
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(GPU).eval()
    n = client.checkpoint.num_blocks
    cuts = [0, n // 3, 2 * n // 3, n]
    ranges = [f"{a}:{b}" for a, b in zip(cuts, cuts[1:])]
    rates: dict[str, list[float]] = {"local": [], "transformers": [], "swarm": []}
    with tempfile.TemporaryDirectory() as home:
        extra = ("--device", "cuda", "--dtype", args.dtype, "--throughput", "1000", "--bandwidth", "10000")
        with running_swarm(model_dir, ranges, Path(home), extra) as servers:
            options = ClientOptions(initial_peers=(servers[0].maddr,), dtype=args.dtype, device="cuda")
            with Swarm.start(options, quiet=True) as remote:
                local_rate(client, blocks, prompt, 8)  # warm-up: kernels, caches
                swarm_rate(remote, prompt, 8)
                for _ in range(args.rounds):
                    rates["local"].append(local_rate(client, blocks, prompt, args.tokens))
                    rates["transformers"].append(transformers_rate(reference, prompt, args.tokens))
                    rates["swarm"].append(swarm_rate(remote, prompt, args.tokens))
    medians = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    gpu = torch.cuda.get_device_name(GPU)
    print(f"{gpu}, {args.dtype}, the default model ({n} blocks, {per_token / 2**20:.0f} MiB of weights per token)")
    print(f"copy bandwidth {bandwidth:.0f} GB/s → bound {bound:.0f} tokens/s")
    print("| run | decode tokens/s | of the bound |")
    print("|---|---|---|")
    for name, label in (("local", "swarm --local (one process)"), ("transformers", "transformers generate"),
                        ("swarm", "swarm: 3 servers on this GPU")):
        print(f"| {label} | {medians[name]} | {100 * medians[name] / bound:.1f} % |")
    write_results(args.out, "gpu", vars(args) | {"out": None}, {
        "gpu": gpu, "bandwidth_gbps": round(bandwidth, 1), "bytes_per_token": per_token, "bound_tokens_s": round(bound, 1),
        "median_tokens_s": medians, "rates": rates,
    })


if __name__ == "__main__":
    main()
