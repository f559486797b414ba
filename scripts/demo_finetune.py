"""Fine-tuning through a local swarm, end to end, with the default model.

1. Three `swarm serve` processes on loopback hold blocks 0:10, 10:20 and 20:30 of the default model.
2. The base model's greedy answers to a few of the taught prompts (through the swarm, no adapter).
3. `swarm finetune scripts/data/facts.jsonl --adapter lora` through the swarm (the real command).
4. Greedy `swarm generate --adapter` through the swarm for every prompt of the data: how many give
   the taught completion (training split and held-out split counted apart).
5. The adapter in peft: `PeftModel.from_pretrained` on transformers' model of the same checkpoint;
   its greedy tokens against the swarm's and `--local`'s for several prompts.

    python scripts/demo_finetune.py [--data scripts/data/facts.jsonl] [--output DIR] [--compare 6] [--quant nf4]

With ``--quant int8|nf4`` the servers hold their blocks quantized (bfloat16 compute): the adapter is
trained through the quantized blocks, and the swarm's tokens are compared with ``--local`` over the
same quantized blocks (peft's full-precision model is shown, not required to agree).

Exits 1 when fewer than 80 % of the training prompts give their completion or a comparison differs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import swarm  # first: it sets OpenMP's spin count, which must precede PyTorch
import torch

from swarm.engine.adapter_io import load_adapter
from swarm.engine.client import ClientModel, generate_local
from swarm.engine.default_model import ensure_default_model
from swarm.engine.finetune import FinetuneConfig, plan
from swarm.engine.finetune_data import read_jsonl, tokenize_records
from swarm.engine.generation import GenerationConfig
from swarm.launch import even_ranges, running_swarm


ROOT = Path(__file__).resolve().parent.parent


def peft_tokens(path: Path, adapter_dir: Path, prompts: list[list[int]], max_new: int, eos: tuple[int, ...]) -> list[list[int]]:
    """Greedy tokens of transformers + peft (the adapter loaded unchanged), cut after the first EOS."""
    import transformers
    from peft import PeftModel

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    out = []
    for ids in prompts:
        with torch.no_grad():
            full = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                                  eos_token_id=list(eos) or None, pad_token_id=eos[0] if eos else 0)
        new = full[0, len(ids):].tolist()
        cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        out.append(new[:cut])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "scripts" / "data" / "facts.jsonl")
    parser.add_argument("--output", type=Path, help="where the adapter goes (default: a temporary directory)")
    parser.add_argument("--compare", type=int, default=6, help="prompts compared with peft and --local")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--quant", choices=("none", "int8", "nf4"), default="none", help="the servers' --quant")
    args = parser.parse_args()
    quantized = args.quant != "none"
    server_dtype = torch.bfloat16 if quantized else torch.float32

    path = ensure_default_model()
    client = ClientModel.load(path)
    records = read_jsonl(args.data)
    dataset = tokenize_records(records, client.tokenizer, args.data, 512, client.eos_token_ids[0])
    held_lines = {ex.line for ex in plan(FinetuneConfig(output=Path(".")), dataset).eval}
    cases = [(r.line, r.data["prompt"], r.data["completion"]) for r in records]
    gen_cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_ids=client.eos_token_ids)

    with tempfile.TemporaryDirectory(prefix="swarm-demo-") as home:
        output = args.output or Path(home) / "adapter"
        kind = f"{args.quant}, bfloat16 compute" if quantized else "float32"
        print(f"starting 3 servers (blocks 0:10, 10:20, 20:30 of the default model, {kind}) ...", flush=True)
        flags = ("--dtype", str(server_dtype).removeprefix("torch."), "--quant", args.quant)
        with running_swarm(path, even_ranges(client.checkpoint.num_blocks, 3), home, flags) as servers:
            first = servers[0].maddr

            print("\nbefore: the base model through the swarm")
            with swarm.open(path, initial_peers=[first]) as base:
                for _, prompt, completion in cases[:4]:
                    answer = base.generate_ids(base.encode(prompt), gen_cfg)
                    print(f"  {prompt!r} → {client.decode(answer)!r}   (taught: {completion!r})")

            print(f"\n$ swarm finetune {args.data.relative_to(ROOT) if args.data.is_relative_to(ROOT) else args.data} "
                  f"--adapter lora --output {output} --initial-peers {first}", flush=True)
            started = time.monotonic()
            subprocess.run([sys.executable, "-m", "swarm.cli.main", "finetune", str(args.data), "--adapter", "lora",
                            "--output", str(output), "--initial-peers", first], check=True)
            print(f"(finetune took {time.monotonic() - started:.0f} s)")

            adapter = load_adapter(output, client.checkpoint)
            print("\nafter: swarm generate --adapter through the swarm, every prompt of the data")
            hits = {True: [0, 0], False: [0, 0]}  # held out? -> [taught, all]
            swarm_tokens = {}
            with swarm.open(path, initial_peers=[first], adapter=output) as tuned:
                for line, prompt, completion in cases:
                    tokens = tuned.generate_ids(tuned.encode(prompt), gen_cfg)
                    swarm_tokens[line] = tokens
                    text = client.decode(tokens)
                    ok = text.strip().startswith(completion.strip())
                    held = line in held_lines
                    hits[held][0] += ok
                    hits[held][1] += 1
                    print(f"  {'✓' if ok else '✗'} {'(held out) ' if held else ''}{prompt!r} → {text!r}")
                train_rate = hits[False][0] / max(1, hits[False][1])
            print(f"\ntaught completions: {hits[False][0]} of {hits[False][1]} training prompts ({train_rate:.0%}), "
                  f"{hits[True][0]} of {hits[True][1]} held-out prompts")

            compare = [c for c in cases if c[0] not in held_lines][: args.compare]
            prompts = [client.encode(p) for _, p, _ in compare]
            theirs = peft_tokens(path, output, prompts, args.max_new_tokens, client.eos_token_ids)
            same = 0
            against = f"--local with the same {args.quant} blocks" if quantized else "--local"
            print(f"\npeft + transformers (full precision) vs swarm vs {against}, greedy, {len(compare)} prompts:")
            for (line, prompt, _), ids, peft_ids in zip(compare, prompts, theirs):
                local_ids = generate_local(client, ids, gen_cfg, server_dtype, adapter=adapter, quant=args.quant)
                equal = swarm_tokens[line] == local_ids and (quantized or peft_ids == local_ids)
                same += equal
                print(f"  {'=' if equal else '≠'} {prompt!r}: peft {peft_ids} swarm {swarm_tokens[line]} local {local_ids}")
            metrics = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
            evals = [m["eval_loss"] for m in metrics if m["type"] == "eval"]
            print(f"\neval loss {evals[0]:.3f} → {evals[-1]:.3f}; token for token equal: {same} of {len(compare)}")
            return 0 if train_rate >= 0.8 and same == len(compare) and evals[-1] < evals[0] else 1


if __name__ == "__main__":
    sys.exit(main())
