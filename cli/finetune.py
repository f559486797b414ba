"""``swarm finetune``: parse flags, check the data, load the client and the blocks, call
:func:`swarm.engine.finetune.finetune`, show progress and a summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from swarm.cli.common import InitialPeersOpt, ModelOpt, NoQuantServersOpt, WireDtypeOpt, err, fail, peers, setup_logging

INTERRUPTED = 130


def finetune(
    data: Annotated[Path, typer.Argument(help="Training data: JSON lines of {text}, {prompt, completion} or {messages}.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Directory for the adapter, metrics.jsonl and checkpoint/.")
    ],
    adapter: Annotated[str, typer.Option("--adapter", help="What to train: lora, prompt or deep-prompt.")] = "lora",
    model: ModelOpt = None,
    local: Annotated[bool, typer.Option("--local", help="Run every block in this process (no swarm).")] = False,
    initial_peers: InitialPeersOpt = None,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank.", rich_help_panel="LoRA")] = 8,
    alpha: Annotated[float, typer.Option("--alpha", help="LoRA alpha (scale alpha/rank).", rich_help_panel="LoRA")] = 16.0,
    dropout: Annotated[float, typer.Option("--dropout", help="LoRA dropout.", rich_help_panel="LoRA")] = 0.0,
    target_modules: Annotated[
        str | None,
        typer.Option(
            "--target-modules",
            help="Linears to adapt, comma-separated (q_proj,v_proj), or all-linear.",
            show_default="the attention's q and v (peft's default)",
            rich_help_panel="LoRA",
        ),
    ] = None,
    num_virtual_tokens: Annotated[
        int, typer.Option("--num-virtual-tokens", help="Trainable prompt length.", rich_help_panel="Prompt tuning")
    ] = 16,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the training data.", rich_help_panel="Training")] = 15,
    max_steps: Annotated[
        int | None,
        typer.Option("--max-steps", help="Stop after this many optimizer steps (the schedule spans them).", rich_help_panel="Training"),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per micro-batch.", rich_help_panel="Training")] = 8,
    grad_accum: Annotated[
        int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.", rich_help_panel="Training")
    ] = 1,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            help="Peak learning rate (AdamW; linear warmup, then cosine to zero).",
            show_default="2e-3 for lora, 1e-2 for prompts",
            rich_help_panel="Training",
        ),
    ] = None,
    warmup_steps: Annotated[
        int | None,
        typer.Option("--warmup-steps", help="Linear warmup steps.", show_default="10% of the steps", rich_help_panel="Training"),
    ] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.", rich_help_panel="Training")] = 0.0,
    max_grad_norm: Annotated[
        float, typer.Option("--max-grad-norm", help="Clip the gradient norm to this (inf: off).", rich_help_panel="Training")
    ] = 1.0,
    max_length: Annotated[
        int, typer.Option("--max-length", help="Cut longer examples to this many tokens.", rich_help_panel="Training")
    ] = 512,
    seed: Annotated[
        int, typer.Option("--seed", help="Seeds the split, data order, init and dropout.", rich_help_panel="Training")
    ] = 0,
    eval_fraction: Annotated[
        float, typer.Option("--eval-fraction", help="Share of examples held out for eval loss.", rich_help_panel="Training")
    ] = 0.1,
    save_every: Annotated[
        int,
        typer.Option("--save-every", help="Checkpoint every N steps (0: only at the end).", rich_help_panel="Training"),
    ] = 100,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run checkpointed in --output exactly.", rich_help_panel="Training")
    ] = False,
    dtype: Annotated[str, typer.Option("--dtype", help="Local blocks' dtype: float32 or bfloat16 (--local).")] = "float32",
    step_timeout: Annotated[float, typer.Option("--step-timeout", help="Seconds to wait for a server's reply.")] = 60.0,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for servers covering every block.")] = 30.0,
    wire_dtype: WireDtypeOpt = "auto",
    no_quant_servers: NoQuantServersOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
) -> None:
    """Train an adapter you own through the swarm's frozen blocks (or --local).

    Ctrl-C stops at once (exit 130); the last checkpoint stays and --resume continues from it."""
    try:
        _run(locals())
    except KeyboardInterrupt:
        err.print(_interrupted_message(output))
        raise typer.Exit(INTERRUPTED) from None


def _interrupted_message(output: Path) -> str:
    from swarm.engine.finetune import CHECKPOINT

    path = output / CHECKPOINT
    if not path.is_file():
        return "interrupted before the first checkpoint: nothing to resume"
    return f"interrupted: the last checkpoint is {path}; continue with the same command and --resume"


def _run(a: dict) -> None:
    from swarm.engine.finetune_data import DataError, read_jsonl

    try:  # flags and data first: a bad file fails before torch and the model load
        records = read_jsonl(a["data"])
    except DataError as exc:
        fail(str(exc))
    from swarm.engine.checkpoint import parse_dtype
    from swarm.engine.client import ClientModel, ModelNotAvailableError, resolve_model
    from swarm.engine.default_model import DEFAULT_MODEL
    from swarm.engine.families import UnsupportedModelError
    from swarm.engine.finetune import FinetuneConfig, preflight
    from swarm.engine.finetune_data import tokenize_records

    try:
        if a["step_timeout"] <= 0 or a["timeout"] < 0:
            raise ValueError("--step-timeout must be > 0 and --timeout >= 0 seconds")
        from swarm.p2p.compression import check_choice

        check_choice(a["wire_dtype"])
        cfg = FinetuneConfig(
            output=a["output"], adapter=a["adapter"], rank=a["rank"], alpha=a["alpha"], dropout=a["dropout"],
            target_modules=a["target_modules"], num_virtual_tokens=a["num_virtual_tokens"], epochs=a["epochs"],
            max_steps=a["max_steps"], batch_size=a["batch_size"], grad_accum=a["grad_accum"], lr=a["lr"],
            warmup_steps=a["warmup_steps"], weight_decay=a["weight_decay"], max_grad_norm=a["max_grad_norm"],
            max_length=a["max_length"], seed=a["seed"], eval_fraction=a["eval_fraction"], save_every=a["save_every"],
            resume=a["resume"], base_model=a["model"] or DEFAULT_MODEL, dtype=a["dtype"],
        )
        torch_dtype = parse_dtype(a["dtype"])
        client = ClientModel.load(resolve_model(a["model"], quiet=a["as_json"]))
        eos = client.eos_token_ids[0] if client.eos_token_ids else client.tokenizer.eos_token_id
        dataset = tokenize_records(records, client.tokenizer, a["data"], cfg.max_length, eos)
        preflight(cfg, client, dataset)
    except (ValueError, ModelNotAvailableError, UnsupportedModelError) as exc:
        fail(str(exc))  # DataError and CheckpointError are ValueErrors
    errors: tuple[type[BaseException], ...] = (ValueError, OSError)
    blocks = None
    try:
        if a["local"]:
            from swarm.engine.adapters import LocalBlocks

            checkpoint = client.checkpoint
            blocks = LocalBlocks(checkpoint.load_blocks(0, checkpoint.num_blocks, torch_dtype))
        else:
            blocks, swarm_errors = _connect(client, a)
            errors += swarm_errors
        result = _train(cfg, blocks, client, dataset, a["as_json"])
    except errors as exc:
        fail(str(exc) or type(exc).__name__)
    finally:
        if blocks is not None and hasattr(blocks, "close"):
            blocks.close()
    _summary(result, cfg, dataset, a["as_json"])


def _connect(client, a: dict):
    """The swarm's blocks as a module (``RemoteBlocks``), and the errors that mean "the swarm
    cannot do it" (reported in one line)."""
    initial = peers(a["initial_peers"])
    if not initial:
        raise ValueError("--initial-peers: give a peer of the swarm (as printed by `swarm serve`), or train with --local")
    from swarm.p2p.client import ClientConfig, SwarmError
    from swarm.p2p.host import P2PError
    from swarm.p2p.remote_blocks import RemoteBlocks
    from swarm.p2p.routing import NoRouteError
    from swarm.p2p.wire import RemoteError, WireError

    setup_logging(False)  # failovers are reported on stderr, as by `swarm generate`
    ccfg = ClientConfig(
        initial_peers=initial, step_timeout=a["step_timeout"], wait_timeout=a["timeout"], wire_dtype=a["wire_dtype"],
        full_precision=a["no_quant_servers"],
    )
    errors = (SwarmError, NoRouteError, TimeoutError, P2PError, RemoteError, WireError)
    try:
        return RemoteBlocks.connect(client.checkpoint, initial, ccfg), errors
    except errors as exc:
        raise ValueError(str(exc) or type(exc).__name__) from None


def _train(cfg, blocks, client, dataset, quiet: bool):
    """Run :func:`~swarm.engine.finetune.finetune` under a progress bar on stderr (a terminal only;
    eval losses are printed as lines either way)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from swarm.engine.finetune import finetune

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        disable=quiet or not err.is_terminal,
    )
    task = None

    def on_event(event: dict) -> None:
        nonlocal task
        kind = event["type"]
        if kind == "start":
            task = progress.add_task(
                f"{cfg.adapter}", total=event["total_steps"], completed=event["step"], loss="-", speed="-"
            )
            if not quiet:
                err.print(
                    f"training {cfg.adapter} on {event['examples']} examples ({event['eval_examples']} held out): "
                    f"{event['total_steps']} steps, lr {event['lr']:g}, warmup {event['warmup_steps']}"
                    + (f", resuming at step {event['step']}" if event["step"] else "")
                )
        elif kind == "step":
            progress.update(task, completed=event["step"], loss=f"{event['loss']:.4f}", speed=f"{event['tokens_per_s']:.0f}")
        elif kind == "eval" and not quiet:
            progress.console.print(f"step {event['step']}: eval loss {event['eval_loss']:.4f}")

    with progress:
        return finetune(cfg, blocks, client, dataset, on_event=on_event)


def _summary(result, cfg, dataset, as_json: bool) -> None:
    from dataclasses import asdict

    if as_json:
        print(json.dumps({**asdict(result), "output": str(result.output), "adapter": cfg.adapter}))
        return

    def loss(before, after) -> str:
        return "-" if before is None else f"{before:.4f} → {after:.4f}"

    minutes, seconds = divmod(result.seconds, 60)
    lines = [
        (
            f"trained a {cfg.adapter} adapter: {result.steps} steps over {result.examples} examples, "
            f"{result.tokens} tokens in {int(minutes)}m{seconds:04.1f}s"
        ),
        f"  train loss  {loss(result.train_loss_before, result.train_loss_after)}  (before → after, without dropout)",
        f"  eval loss   {loss(result.eval_loss_before, result.eval_loss_after)}  ({result.eval_examples} held-out examples)",
        (
            f"  truncated   {result.truncated} of {len(dataset.examples) + result.dropped} examples over --max-length "
            f"{cfg.max_length}" + (f" ({result.dropped} dropped: nothing left to learn)" if result.dropped else "")
        ),
        f"  adapter     {result.output}  (use: swarm generate --adapter {result.output} ...)",
        f"  metrics     {result.output / 'metrics.jsonl'}",
    ]
    print("\n".join(lines))
    sys.stdout.flush()
