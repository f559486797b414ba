"""The ``swarm`` command: thin typer commands that parse flags and call one library function each."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="swarm",
    help="Run and fine-tune language models too large for one machine over a swarm of peers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)

NOT_BUILT = 2


def _not_built(what: str) -> None:
    err.print(f"swarm: {what} is not built yet")
    raise typer.Exit(NOT_BUILT)


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        help="Checkpoint: the default model's name, a local directory (config.json + safetensors) or a Hub repo id.",
        show_default="SmolLM2-135M-Instruct",
    ),
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Weights and activations dtype: float32 or bfloat16.")]


@app.command()
def serve(
    blocks: Annotated[str, typer.Option("--blocks", help="Block range START:END, or auto.")] = "auto",
) -> None:
    """Serve a contiguous range of a model's blocks to the swarm."""
    _not_built("swarm serve (serving blocks over libp2p)")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt to continue.")],
    model: ModelOpt = None,
    local: Annotated[bool, typer.Option("--local", help="Run every block in this process (no swarm).")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Stop after this many tokens.")] = 32,
    sample: Annotated[bool, typer.Option("--sample", help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature (implies --sample).")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Sample among the k likeliest tokens (implies --sample).")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling mass (implies --sample).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for sampling (same seed, same output).")] = None,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty", help="> 1 discourages repeats.")] = 1.0,
    num_beams: Annotated[int, typer.Option("--num-beams", help="Beam search with this many beams.")] = 1,
    length_penalty: Annotated[float, typer.Option("--length-penalty", help="Beam score exponent on length.")] = 1.0,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    dtype: DtypeOpt = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with token ids and text.")] = False,
) -> None:
    """Generate text: stream tokens through a chain of servers (or --local), printing them as they come."""
    if not local:
        _not_built("swarm generate through the swarm (use --local to run every block here)")
    from swarm.engine.checkpoint import parse_dtype
    from swarm.engine.client import ClientModel, ModelNotAvailableError, TextStream, generate_local, resolve_model
    from swarm.engine.families import CheckpointError, UnsupportedModelError
    from swarm.engine.generation import GenerationConfig

    try:
        torch_dtype = parse_dtype(dtype)
        path = resolve_model(model, quiet=as_json)
        client = ClientModel.load(path, torch_dtype)
        do_sample = sample or any(v is not None for v in (temperature, top_k, top_p))
        cfg = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if temperature is not None else 1.0,
            top_k=top_k or 0,
            top_p=top_p if top_p is not None else 1.0,
            repetition_penalty=repetition_penalty,
            num_beams=num_beams,
            length_penalty=length_penalty,
            seed=seed,
            eos_token_ids=client.eos_token_ids,
        )
        prompt_ids = client.encode(prompt, chat=chat)
    except (ValueError, ModelNotAvailableError, CheckpointError, UnsupportedModelError, RuntimeError) as exc:
        _fail(str(exc))

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    stream = None if as_json or num_beams > 1 else TextStream(client, write)
    tokens = generate_local(client, prompt_ids, cfg, torch_dtype, on_token=stream)
    text = client.decode(tokens)
    if as_json:
        print(json.dumps({"prompt_ids": prompt_ids, "token_ids": tokens, "text": text}))
    elif stream is None:
        print(text)
    else:
        write(text[stream.printed :] + "\n")


@app.command()
def finetune(
    data: Annotated[str, typer.Argument(help="Training data (JSON lines).")],
    adapter: Annotated[str, typer.Option("--adapter", help="Adapter kind: lora.")] = "lora",
) -> None:
    """Train an adapter you own through the swarm's frozen blocks."""
    _not_built("swarm finetune (training adapters through the swarm)")


@app.command()
def status() -> None:
    """Show the swarm: who serves which blocks, how fast, where the gaps are."""
    _not_built("swarm status (the swarm's topology)")


if __name__ == "__main__":
    app()
