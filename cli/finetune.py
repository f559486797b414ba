"""``swarm finetune``: parse the flags, call :func:`swarm.train.finetune` (``swarm.finetune``)
under a progress bar, print its errors in one line and a summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from swarm.cli.common import (
    DeviceOpt,
    AllowPeersOpt,
    SwarmKeyOpt,
    InitialPeersOpt,
    ModelOpt,
    NoQuantServersOpt,
    StepTimeoutOpt,
    TimeoutOpt,
    VerifyOpt,
    VerifyRateOpt,
    WireDtypeOpt,
    err,
    fail,
    setup_logging,
)
from swarm.config import ClientOptions  # light: the client flags' defaults

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
    epochs: Annotated[
        int | None,
        typer.Option(
            "--epochs",
            help="Passes over the training data (with --max-steps: whichever ends first).",
            show_default="15, or as many as --max-steps needs",
            rich_help_panel="Training",
        ),
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option(
            "--max-steps",
            help="Stop after this many optimizer steps, over as many epochs as they need (the schedule spans them).",
            rich_help_panel="Training",
        ),
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
    save_best: Annotated[
        bool | None,
        typer.Option(
            "--save-best/--no-save-best",
            help="Keep the adapter of the lowest eval loss in OUTPUT/best (evals: at the start, at each "
            "--save-every checkpoint, at the end).",
            show_default="on with an eval split: --eval-fraction above 0",
            rich_help_panel="Training",
        ),
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Local blocks' dtype: float32 or bfloat16 (--local).")] = "float32",
    device: DeviceOpt = ClientOptions.device,
    step_timeout: StepTimeoutOpt = ClientOptions.step_timeout,
    timeout: TimeoutOpt = ClientOptions.timeout,
    wire_dtype: WireDtypeOpt = "auto",
    no_quant_servers: NoQuantServersOpt = False,
    swarm_key: SwarmKeyOpt = None,
    allow_peers: AllowPeersOpt = None,
    verify: VerifyOpt = ClientOptions.verify,
    verify_rate: VerifyRateOpt = ClientOptions.verify_rate,
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
    from swarm.engine.client import ModelNotAvailableError
    from swarm.engine.families import UnsupportedModelError
    from swarm.train import CLIENT_OPTIONS, TRAIN_OPTIONS, finetune, swarm_errors

    if not a["local"]:
        setup_logging(False)  # failovers are reported on stderr, as by `swarm generate`
    bar = _Bar(quiet=a["as_json"])
    options = {k: a[k] for k in (*CLIENT_OPTIONS, *TRAIN_OPTIONS)}
    try:
        result = finetune(a["data"], output=a["output"], adapter=a["adapter"], on_event=bar.on_event,
                          quiet=a["as_json"], **options)
    except Exception as exc:  # what swarm.train.finetune documents (a DataError is a ValueError)
        errors = (ValueError, OSError, ModelNotAvailableError, UnsupportedModelError)
        if not isinstance(exc, errors + (() if a["local"] else swarm_errors())):
            raise
        bar.stop()  # before the message: a live bar would draw over it
        fail(str(exc) or type(exc).__name__)
    finally:
        bar.stop()
    _summary(result, a)


class _Bar:
    """The run's progress on stderr: the start line, a bar (on a terminal only), and eval losses
    as lines either way (none with ``quiet``)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress = None
        self.task = None

    def on_event(self, event: dict) -> None:
        kind = event["type"]
        if kind == "start":
            self._start(event)
        elif kind == "step" and self.progress is not None:
            self.progress.update(self.task, completed=event["step"], loss=f"{event['loss']:.4f}",
                                 speed=f"{event['tokens_per_s']:.0f}")
        elif kind == "eval" and not self.quiet:
            best = " (best so far)" if event.get("best") and event["step"] else ""
            err.print(f"step {event['step']}: eval loss {event['eval_loss']:.4f}{best}", highlight=False)

    def _start(self, event: dict) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        # started here, not before the call: fetching the default model shows a progress of its own
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err,
            disable=self.quiet or not err.is_terminal,
        )
        self.progress.start()
        self.task = self.progress.add_task(event["adapter"], total=event["total_steps"], completed=event["step"],
                                           loss="-", speed="-")
        if not self.quiet:
            err.print(
                f"training {event['adapter']} on {event['examples']} examples ({event['eval_examples']} held out): "
                f"{event['limit']}, lr {event['lr']:g}, warmup {event['warmup_steps']}"
                + (f", resuming at step {event['step']}" if event["step"] else ""),
                highlight=False,
            )

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _summary(result, a: dict) -> None:
    from dataclasses import asdict

    if a["as_json"]:
        best = None if result.best_output is None else str(result.best_output)
        summary = {**asdict(result), "output": str(result.output), "best_output": best, "adapter": a["adapter"]}
        print(json.dumps(summary))
        return

    def loss(before, after) -> str:
        return "-" if before is None else f"{before:.4f} → {after:.4f}"

    minutes, seconds = divmod(result.seconds, 60)
    total = result.examples + result.eval_examples + result.dropped
    lines = [
        (
            f"trained a {a['adapter']} adapter: {result.steps} steps over {result.examples} examples, "
            f"{result.tokens} tokens in {int(minutes)}m{seconds:04.1f}s"
        ),
        f"  train loss  {loss(result.train_loss_before, result.train_loss_after)}  (before → after, without dropout)",
        f"  eval loss   {loss(result.eval_loss_before, result.eval_loss_after)}  ({result.eval_examples} held-out examples)",
        (
            f"  truncated   {result.truncated} of {total} examples over --max-length {a['max_length']}"
            + (f" ({result.dropped} dropped: nothing left to learn)" if result.dropped else "")
        ),
        f"  adapter     {result.output}  (use: swarm generate --adapter {result.output} ...)",
    ]
    if result.best_output is not None:
        final = {0: ": the adapter before training", result.steps: ": the final adapter"}.get(result.best_step, "")
        lines.append(
            f"  best        {result.best_output}  "
            f"(eval loss {result.best_eval_loss:.4f} at step {result.best_step}{final})"
        )
    lines.append(f"  metrics     {result.output / 'metrics.jsonl'}")
    print("\n".join(lines))
    sys.stdout.flush()
