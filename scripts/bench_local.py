"""Local decode and prefill speed of the engine, next to the memory-bandwidth bound.

For each model and dtype: prefill tokens/s (one 128-token prompt) and decode tokens/s (single-token
steps with the KV cache, embeddings → all blocks → LM head → argmax, as `swarm generate --local`
does), and the physical bound: bytes of weights read per decoded token ÷ measured memory read
bandwidth. Models: the default model and a random-weight 1.1B Llama-shaped checkpoint (TinyLlama
dimensions), written once under $SWARM_HOME/bench/. Writes scripts/results/local.json (``--out``).

    python scripts/bench_local.py [--steps 64] [--prompt 128] [--models default,1.1b] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import swarm  # noqa: F401  (first: it sets OpenMP's spin count, which must precede PyTorch)
import torch
from safetensors.torch import save_file

from bench_common import add_out, write_results  # a sibling script (its folder is on sys.path)

from swarm.engine.checkpoint import Checkpoint, parse_dtype
from swarm.engine.default_model import ensure_default_model, swarm_home

TINYLLAMA = {
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "dtype": "bfloat16",
}


def random_1b_checkpoint() -> Path:
    """A random-weight checkpoint with TinyLlama-1.1B's shapes (bfloat16 safetensors, ~2.2 GB)."""
    return random_llama_checkpoint(swarm_home() / "bench" / "llama-1.1b-random", TINYLLAMA)


def random_llama_checkpoint(path: Path, c: dict) -> Path:
    """A random-weight Llama checkpoint of config ``c`` at ``path`` (bfloat16 safetensors), written
    once."""
    if (path / "model.safetensors").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * (c["hidden_size"] // c["num_attention_heads"])
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    tensors = {"model.embed_tokens.weight": rnd(c["vocab_size"], h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    tensors["lm_head.weight"] = rnd(c["vocab_size"], h)
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        tensors |= {
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rnd(h, h),
            p + "self_attn.k_proj.weight": rnd(kv, h),
            p + "self_attn.v_proj.weight": rnd(kv, h),
            p + "self_attn.o_proj.weight": rnd(h, h),
            p + "mlp.gate_proj.weight": rnd(i, h),
            p + "mlp.up_proj.weight": rnd(i, h),
            p + "mlp.down_proj.weight": rnd(h, i),
        }
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(c, indent=2))
    return path


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of reading a large tensor once (best of ``repeats``), with torch's threads."""
    x = torch.ones(int(gib * 2**30 / 4), dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def bench(path: Path, dtype: torch.dtype, prompt: int, steps: int) -> dict:
    ckpt = Checkpoint(path)
    head, blocks = ckpt.load_head(dtype), ckpt.load_blocks(0, ckpt.num_blocks, dtype)
    # bytes read per decoded token: every block weight, the final norm and the LM head (the
    # embedding lookup reads one row)
    weight_bytes = sum(t.numel() * t.element_size() for t in [*blocks.parameters(), *blocks.buffers()])
    weight_bytes += sum(t.numel() * t.element_size() for t in [*head.lm_head.parameters(), *head.lm_head.buffers()])
    ids = torch.randint(100, 1000, (1, prompt))
    results = {}
    with torch.no_grad():
        for _ in range(2):  # warm up, then measure
            session = blocks.open_session(batch=1, max_length=prompt + steps + 1)
            t = time.perf_counter()
            logits = head.logits(blocks(head.embed(ids), session)[:, -1])
            prefill = time.perf_counter() - t
            token = logits.argmax(-1, keepdim=True)
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                token = head.logits(blocks(head.embed(token), session)[:, -1]).argmax(-1, keepdim=True)
                times.append(time.perf_counter() - t)
            session.close()
        times.sort()
    results["prefill_tok_s"] = prompt / prefill
    results["decode_tok_s"] = 1 / (sum(times) / len(times))
    results["decode_ms_median"] = times[len(times) // 2] * 1e3
    results["weight_gb_per_token"] = weight_bytes / 1e9
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--models", default="default,1.1b")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    add_out(parser, "local")
    args = parser.parse_args()

    bandwidth = read_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; memory read bandwidth {bandwidth / 1e9:.1f} GB/s")
    paths = {"default": ensure_default_model, "1.1b": random_1b_checkpoint}
    names = {"default": "SmolLM2-135M", "1.1b": "Llama-1.1B (random)"}
    header = f"{'model':<22}{'dtype':<10}{'prefill tok/s':>14}{'decode tok/s':>14}{'bound tok/s':>13}{'of bound':>10}"
    print(header)
    print("-" * len(header))
    rows = []
    for model in args.models.split(","):
        path = paths[model]()
        for dtype_name in args.dtypes.split(","):
            r = bench(path, parse_dtype(dtype_name), args.prompt, args.steps)
            bound = bandwidth / (r["weight_gb_per_token"] * 1e9)
            print(
                f"{names[model]:<22}{dtype_name:<10}{r['prefill_tok_s']:>14.1f}{r['decode_tok_s']:>14.1f}"
                f"{bound:>13.1f}{r['decode_tok_s'] / bound:>9.0%}",
                flush=True,
            )
            rows.append({"model": names[model], "dtype": dtype_name, **r, "bound_tok_s": bound,
                         "of_bound": r["decode_tok_s"] / bound})
    settings = {"steps": args.steps, "prompt": args.prompt, "models": args.models.split(","),
                "dtypes": args.dtypes.split(",")}
    write_results(args.out, "local", settings, {"read_bandwidth_gb_s": bandwidth / 1e9, "rows": rows})


if __name__ == "__main__":
    main()
