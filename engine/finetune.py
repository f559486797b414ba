"""Fine-tuning an adapter the client owns, through frozen blocks held anywhere.

The loop needs three things: the client's head (embeddings, final norm, LM head: a
:class:`~swarm.engine.client.ClientModel`), the blocks as a module with
``blocks(hidden [batch, seq, hidden], tensors, spec) -> hidden`` that is differentiable in
``hidden`` and in ``tensors`` (:class:`~swarm.engine.adapters.LocalBlocks` here, the swarm's
remote blocks through servers), and tokenized data (:mod:`swarm.engine.finetune_data`). Every
trainable tensor lives here, in float32; the blocks stay frozen.

One optimizer step (:func:`finetune`): the step's micro-batches (``grad_accum`` of them, each
``batch_size`` examples, right-padded) go forward as ``head.embed`` → (shallow prompt prepended)
→ ``blocks(hidden, tensors, spec)`` → ``head.logits``; the loss is the mean next-token
cross-entropy over every labelled position of the whole step; AdamW updates the tensors after
clipping their gradient norm; the learning rate warms up linearly, then follows a cosine to zero.

Determinism, so that a resumed run ends with exactly the adapter of an uninterrupted one: every
random choice derives from ``seed`` and the step: the held-out split, each epoch's order, the
initial adapter, and each micro-batch's LoRA dropout masks (``AdapterSpec.seed``, the same
wherever a block runs). A checkpoint (``OUTPUT/checkpoint/state.pt``, written atomically every
``save_every`` steps and at the end) holds the tensors, the optimizer's state, the step (which
fixes the data position and the learning rate), the global torch RNG state and the best eval loss
so far; resuming checks that every setting that shapes the run (and the model and the data) is the
one saved. With an eval split the adapter of the best eval loss is kept in ``OUTPUT/best``
(:mod:`swarm.engine.finetune_state`: what the run keeps on disk).

A loop of one's own uses the same pieces::

    records = read_jsonl("data.jsonl")                      # swarm.engine.finetune_data
    data = tokenize_records(records, client.tokenizer, "data.jsonl", 512, client.eos_token_ids[0])
    blocks = LocalBlocks(client.checkpoint.load_blocks(0, client.checkpoint.num_blocks))  # or RemoteBlocks
    tensors = {k: v.requires_grad_(True) for k, v in init_lora(client.checkpoint, targets, 8, seed=0).items()}
    batch = collate(data.examples[:8], pad_id=0)
    logits = forward_logits(client.head, blocks, batch.input_ids, tensors, AdapterSpec(scale=2.0))
    loss, count = token_loss(logits, batch.labels)
    (loss / count).backward()                               # gradients in every tensors[k].grad
"""

from __future__ import annotations

import hashlib
import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from swarm.engine.adapter_io import save_deep_prompt, save_lora, save_prompt
from swarm.engine.adapters import PROMPT_KEY, AdapterSpec, init_deep_prompts, init_lora, resolve_targets
from swarm.engine.finetune_data import IGNORE, Batch, Dataset, Example, collate, token_loss, with_virtual_tokens
from swarm.engine.finetune_state import (
    BEST,
    CHECKPOINT,
    METRICS,
    Best,
    Metrics,
    check_resume,
    load_checkpoint,
    replace_dir,
    restore_dir,
    save_checkpoint,
)

KINDS = ("lora", "prompt", "deep-prompt")
DEFAULT_LR = {"lora": 2e-3, "prompt": 1e-2, "deep-prompt": 1e-2}
DEFAULT_EPOCHS = 15  # when neither --epochs nor --max-steps is given
WARMUP_SHARE = 0.1  # default warmup: this share of the run's optimizer steps


@dataclass(frozen=True)
class FinetuneConfig:
    """What to train and how; each field is the ``swarm finetune`` flag of the same name.

    ``lr=None``: :data:`DEFAULT_LR` of the adapter kind. ``warmup_steps=None``: 10 % of the
    run's optimizer steps. The run's length: ``max_steps`` optimizer steps, over as many epochs as
    they need; ``epochs`` passes over the data; with both, whichever ends first; with neither,
    :data:`DEFAULT_EPOCHS` epochs (the cosine schedule spans the run). ``save_every=0``: a
    checkpoint only at the end. ``save_best`` (None: on when ``eval_fraction > 0``): keep the
    adapter of the lowest eval loss in ``OUTPUT/best``. ``dtype`` names the blocks' dtype; it only
    guards ``resume`` (the blocks come from outside). Raises ``ValueError`` naming the flag for a
    value out of range."""

    output: Path
    adapter: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | None = None  # None: the family's default (peft's), "all-linear", or names
    num_virtual_tokens: int = 16
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512
    seed: int = 0
    eval_fraction: float = 0.1
    save_every: int = 100
    resume: bool = False
    save_best: bool | None = None
    base_model: str = ""  # recorded in the adapter's config (base_model_name_or_path)
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "output", Path(self.output))
        checks = [
            (self.adapter in KINDS, "--adapter", f"one of {', '.join(KINDS)}", self.adapter),
            (self.rank >= 1, "--rank", "at least 1", self.rank),
            (math.isfinite(self.alpha) and self.alpha > 0, "--alpha", "a positive number", self.alpha),
            (0 <= self.dropout < 1, "--dropout", "in [0, 1)", self.dropout),
            (self.num_virtual_tokens >= 1, "--num-virtual-tokens", "at least 1", self.num_virtual_tokens),
            (self.epochs is None or self.epochs >= 1, "--epochs", "at least 1", self.epochs),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps", "at least 1", self.max_steps),
            (self.batch_size >= 1, "--batch-size", "at least 1", self.batch_size),
            (self.grad_accum >= 1, "--grad-accum", "at least 1", self.grad_accum),
            (self.lr is None or (math.isfinite(self.lr) and self.lr > 0), "--lr", "a positive number", self.lr),
            (self.warmup_steps is None or self.warmup_steps >= 0, "--warmup-steps", "at least 0", self.warmup_steps),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0, "--weight-decay", "at least 0", self.weight_decay),
            (self.max_grad_norm > 0, "--max-grad-norm", "a positive number (inf: no clipping)", self.max_grad_norm),
            (self.max_length >= 2, "--max-length", "at least 2", self.max_length),
            (0 <= self.seed < 2**63, "--seed", "in [0, 2^63)", self.seed),
            (0 <= self.eval_fraction < 1, "--eval-fraction", "in [0, 1)", self.eval_fraction),
            (self.save_every >= 0, "--save-every", "at least 0 (0: only at the end)", self.save_every),
        ]
        for ok, flag, rule, value in checks:
            if not ok:
                raise ValueError(f"{flag} must be {rule}, got {value}")
        if self.save_best and self.eval_fraction == 0:
            raise ValueError("--save-best keeps the adapter of the best eval loss: it needs --eval-fraction above 0")

    @property
    def epoch_limit(self) -> int | None:
        """The epochs that bound the run: ``epochs``, :data:`DEFAULT_EPOCHS` when neither it nor
        ``max_steps`` is given, None when ``max_steps`` alone decides."""
        if self.epochs is not None:
            return self.epochs
        return DEFAULT_EPOCHS if self.max_steps is None else None

    @property
    def keeps_best(self) -> bool:
        """Whether the run keeps its best adapter by eval loss in ``OUTPUT/best``."""
        return self.save_best if self.save_best is not None else self.eval_fraction > 0

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.adapter]

    @property
    def num_virtual(self) -> int:
        """Virtual tokens prepended to every sequence (0 for LoRA)."""
        return 0 if self.adapter == "lora" else self.num_virtual_tokens


TRAIN_EVAL_EXAMPLES = 256  # training examples whose loss the summary reports before and after


@dataclass
class FinetuneResult:
    """What a run did. Losses are mean per labelled token, measured without dropout before the
    first step and after the last: train losses over the training split (its first
    :data:`TRAIN_EVAL_EXAMPLES` examples when it is larger), eval losses over the whole held-out
    split (None without one)."""

    output: Path
    steps: int
    total_steps: int
    train_loss_before: float | None
    train_loss_after: float | None
    eval_loss_before: float | None
    eval_loss_after: float | None
    tokens: int
    examples: int
    eval_examples: int
    truncated: int
    dropped: int
    seconds: float
    best_step: int | None = None  # the step of the lowest eval loss (None: no best kept)
    best_eval_loss: float | None = None
    best_output: Path | None = None  # OUTPUT/best: the adapter of that step


@dataclass
class Plan:
    """How the examples map onto optimizer steps (pure function of the config and dataset size)."""

    train: list[Example]
    eval: list[Example]
    micro_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    limit: str  # the run's length and what sets it, in words: "60 steps (--max-steps)"


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A deterministic held-out split: ``round(fraction · n)`` examples (at least one when
    ``fraction > 0`` and at least one is left to train on) chosen by ``seed``. Returns (train, eval)."""
    n = len(examples)
    n_eval = min(max(round(fraction * n), 1 if fraction > 0 else 0), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, "split"))).tolist()
    held = set(order[:n_eval])
    return [ex for i, ex in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def plan(cfg: FinetuneConfig, dataset: Dataset) -> Plan:
    """The run's plan: its split, its steps per epoch, and its length (see :class:`FinetuneConfig`)."""
    train, held = split(dataset.examples, cfg.eval_fraction, cfg.seed)
    micro = math.ceil(len(train) / cfg.batch_size)
    per_epoch = math.ceil(micro / cfg.grad_accum)
    total, limit = run_length(cfg, per_epoch)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(WARMUP_SHARE * total)
    return Plan(train, held, micro, per_epoch, total, min(warmup, total), limit)


def run_length(cfg: FinetuneConfig, steps_per_epoch: int) -> tuple[int, str]:
    """The run's optimizer steps, and which limit gives them, in words for the start line."""
    epochs = cfg.epoch_limit
    by_epochs = None if epochs is None else steps_per_epoch * epochs
    if cfg.max_steps is not None and (by_epochs is None or cfg.max_steps <= by_epochs):
        return cfg.max_steps, f"{cfg.max_steps} steps (--max-steps)"
    if cfg.max_steps is not None:
        return by_epochs, f"{by_epochs} steps (--epochs {epochs} ends before --max-steps {cfg.max_steps})"
    given = f"--epochs {epochs}" if cfg.epochs is not None else f"{epochs} epochs"
    return by_epochs, f"{by_epochs} steps ({given})"


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warmup to ``peak`` over
    ``warmup`` steps (the first step already moves), then a cosine to zero at step ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def _mix(seed: int, *parts) -> int:
    """A 63-bit seed derived from ``seed`` and ``parts`` (independent streams for each use)."""
    text = ":".join(map(str, (seed, *parts)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def epoch_order(num: int, seed: int, epoch: int) -> list[int]:
    """The order of the training examples in ``epoch``."""
    return torch.randperm(num, generator=torch.Generator().manual_seed(_mix(seed, "epoch", epoch))).tolist()


def step_batches(cfg: FinetuneConfig, p: Plan, step: int) -> list[list[Example]]:
    """The micro-batches of optimizer step ``step``: the data position is a function of the step."""
    epoch, within = divmod(step, p.steps_per_epoch)
    order = epoch_order(len(p.train), cfg.seed, epoch)
    first = within * cfg.grad_accum
    micro = range(first, min(first + cfg.grad_accum, p.micro_per_epoch))
    return [[p.train[i] for i in order[m * cfg.batch_size : (m + 1) * cfg.batch_size]] for m in micro]


def init_trainable(cfg: FinetuneConfig, client) -> dict[str, torch.Tensor]:
    """Fresh float32 trainable tensors, by :mod:`~swarm.engine.adapters`' naming: LoRA as peft
    initialises it; a shallow prompt from the embeddings of ``num_virtual_tokens`` random
    vocabulary tokens (prompt tuning's usual start: rows of the right scale); deep prompts zero."""
    checkpoint = client.checkpoint
    if cfg.adapter == "lora":
        targets = resolve_targets(checkpoint, cfg.target_modules)
        return init_lora(checkpoint, targets, cfg.rank, _mix(cfg.seed, "init"))
    generator = torch.Generator().manual_seed(_mix(cfg.seed, "init"))
    ids = torch.randint(checkpoint.config.vocab_size, (1, cfg.num_virtual_tokens), generator=generator)
    with torch.no_grad():
        tensors = {PROMPT_KEY: client.head.token_embeddings(ids)[0].float().clone()}
    if cfg.adapter == "deep-prompt":
        tensors.update(init_deep_prompts(checkpoint.num_blocks, cfg.num_virtual_tokens, checkpoint.config.hidden_size))
    return tensors


def forward_logits(
    head: nn.Module,
    blocks: nn.Module,
    input_ids: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    spec: AdapterSpec,
) -> torch.Tensor:
    """``input_ids [batch, seq]`` → logits ``[batch, num_virtual + seq, vocab]`` (float32):
    embed, prepend ``tensors["prompt_embeddings"]`` if present, run ``blocks`` with the other
    tensors (LoRA, deep prompts), apply the LM head. Differentiable in every tensor."""
    hidden = head.embed(input_ids, prefix=tensors.get(PROMPT_KEY))  # [batch, num_virtual + seq, hidden]
    block_tensors = {k: v for k, v in tensors.items() if k != PROMPT_KEY}
    out = blocks(hidden, block_tensors, spec)
    return head.logits(out.to(hidden.dtype))


def train_step(
    cfg: FinetuneConfig,
    head: nn.Module,
    blocks: nn.Module,
    tensors: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    batches: list[Batch],
    step: int,
    lr: float,
) -> tuple[float, float]:
    """One optimizer step over ``batches`` (its micro-batches): the loss is the mean over every
    labelled position of the step, so micro-batches of any size weigh by their tokens; LoRA
    dropout masks come from ``(cfg.seed, step, micro-batch)``. Returns (loss, gradient norm
    before clipping)."""
    labels = [with_virtual_tokens(b.labels, cfg.num_virtual) for b in batches]
    count = sum(int((lab[:, 1:] != IGNORE).sum()) for lab in labels)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for j, (batch, lab) in enumerate(zip(batches, labels)):
        spec = AdapterSpec(scale=cfg.alpha / cfg.rank, dropout=cfg.dropout, seed=_mix(cfg.seed, "dropout", step, j))
        loss, _ = token_loss(forward_logits(head, blocks, batch.input_ids, tensors, spec), lab)
        (loss / count).backward()
        total += loss.item()
    params = [t for _, t in sorted(tensors.items())]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return total / count, float(grad_norm)


def evaluate(cfg: FinetuneConfig, head, blocks, tensors, examples: list[Example], pad_id: int) -> float | None:
    """Mean loss per labelled token over ``examples`` (no dropout, no gradient)."""
    if not examples:
        return None
    spec = AdapterSpec(scale=cfg.alpha / cfg.rank)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), cfg.batch_size):
            batch = collate(examples[i : i + cfg.batch_size], pad_id)
            logits = forward_logits(head, blocks, batch.input_ids, tensors, spec)
            loss, n = token_loss(logits, with_virtual_tokens(batch.labels, cfg.num_virtual))
            total, count = total + loss.item(), count + n
    return total / count


def run_identity(cfg: FinetuneConfig, client, dataset: Dataset) -> dict:
    """Every setting that shapes the run's numbers; ``resume`` refuses a run that differs."""
    keys = ["adapter", "epochs", "max_steps", "batch_size", "grad_accum", "warmup_steps", "weight_decay",
            "max_grad_norm", "max_length", "seed", "eval_fraction", "dtype"]
    keys += ["rank", "alpha", "dropout"] if cfg.adapter == "lora" else ["num_virtual_tokens"]
    identity = {k: getattr(cfg, k) for k in keys}
    identity["epochs"] = cfg.epoch_limit  # None: --max-steps alone sets the length
    identity["lr"] = cfg.peak_lr
    if cfg.adapter == "lora":
        identity["target_modules"] = resolve_targets(client.checkpoint, cfg.target_modules)
    identity["model"] = _fingerprint(client.checkpoint)
    identity["data"] = dataset.digest
    return identity


def check_lengths(cfg: FinetuneConfig, dataset: Dataset, max_positions: int | None) -> None:
    """``ValueError`` naming --max-length when the longest example (after the cut) plus the
    virtual tokens does not fit the model's context of ``max_positions`` (None: no limit)."""
    longest = max(len(ex.input_ids) for ex in dataset.examples) + cfg.num_virtual
    if max_positions is not None and longest > max_positions:
        virtual = f" plus {cfg.num_virtual} virtual tokens" if cfg.num_virtual else ""
        raise ValueError(
            f"--max-length {cfg.max_length}: the longest example{virtual} has {longest} positions, over this "
            f"model's context of {max_positions}; set --max-length {max_positions - cfg.num_virtual} or less"
        )


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fingerprint(checkpoint) -> str:
    # about a second for a 135M model: once per checkpoint object (preflight, then the run)
    if checkpoint not in _FINGERPRINTS:
        _FINGERPRINTS[checkpoint] = checkpoint.fingerprint()
    return _FINGERPRINTS[checkpoint]


def save_adapter(cfg: FinetuneConfig, client, tensors: dict[str, torch.Tensor], directory: Path | None = None) -> None:
    """Write the adapter into ``directory`` (default ``cfg.output``) in its format (see
    :mod:`swarm.engine.adapter_io`)."""
    checkpoint, base = client.checkpoint, cfg.base_model or str(client.path)
    directory = cfg.output if directory is None else directory
    if cfg.adapter == "lora":
        targets = resolve_targets(checkpoint, cfg.target_modules)
        save_lora(directory, checkpoint, tensors, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                  targets=targets, base_model=base)
    elif cfg.adapter == "prompt":
        save_prompt(directory, checkpoint, tensors[PROMPT_KEY], base)
    else:
        deep = {k: v for k, v in tensors.items() if k != PROMPT_KEY}
        save_deep_prompt(directory, checkpoint, tensors[PROMPT_KEY], deep, base)


def preflight(cfg: FinetuneConfig, client, dataset: Dataset) -> tuple[dict, dict | None]:
    """Every check that needs no blocks, so a run that cannot go is refused before they load:
    ``--target-modules``, lengths against the context, and the output directory (a checkpoint
    there needs ``resume``; ``resume`` needs one saved by the same settings, model and data).
    Returns the run's identity and the saved state (None when starting fresh); raises
    ``ValueError`` naming the flag."""
    check_lengths(cfg, dataset, getattr(client.head, "max_positions", None))
    identity = run_identity(cfg, client, dataset)  # resolves --target-modules
    path = cfg.output / CHECKPOINT
    if not cfg.resume:
        if path.exists():
            raise ValueError(
                f"--output {cfg.output} holds a run's checkpoint already: continue it with --resume, "
                "or choose another --output"
            )
        return identity, None
    state = load_checkpoint(path)
    saved = state["run"]
    if state["version"] == 1 and cfg.epochs is None and saved.get("max_steps") is not None:
        # version 1 bounded every run by --epochs (15 by default), --max-steps too: the same run
        # when its steps ended first
        by_default_epochs = DEFAULT_EPOCHS * plan(cfg, dataset).steps_per_epoch
        if saved.get("epochs") == DEFAULT_EPOCHS and saved["max_steps"] <= by_default_epochs:
            saved["epochs"] = None
    check_resume(saved, identity, path)
    return identity, state


def finetune(
    cfg: FinetuneConfig,
    blocks: nn.Module,
    client,
    dataset: Dataset,
    on_event: Callable[[dict], None] | None = None,
    checked: tuple[dict, dict | None] | None = None,
) -> FinetuneResult:
    """Train ``cfg.adapter`` on ``dataset`` through ``blocks`` and save it into ``cfg.output``.
    ``checked``: what :func:`preflight` returned for these arguments, when the caller ran it
    before loading the blocks (else it runs here).

    ``client``: a :class:`~swarm.engine.client.ClientModel` (head in float32). ``on_event``
    receives every record as it happens: ``{"type": "start", "total_steps", "step", ...}`` once,
    then the ``"step"`` and ``"eval"`` records also written to ``metrics.jsonl`` (an eval that
    gave a new best, saved in ``OUTPUT/best``, has ``"best": True``), then
    ``{"type": "checkpoint", "step"}`` after each save. An exception (``KeyboardInterrupt``
    included) propagates as it is: the last checkpoint stands, and ``resume`` continues from it
    exactly. Raises ``ValueError`` for a ``--target-modules`` name that matches nothing, an
    output holding another run's checkpoint (without ``resume``), or a ``resume`` whose settings,
    model or data differ from the saved run's."""
    p = plan(cfg, dataset)
    head = client.head
    pad_id = client.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = client.eos_token_ids[0] if client.eos_token_ids else 0
    ckpt_path = cfg.output / CHECKPOINT
    identity, state = checked if checked is not None else preflight(cfg, client, dataset)
    tensors = {k: v.requires_grad_(True) for k, v in init_trainable(cfg, client).items()}
    names = sorted(tensors)
    optimizer = torch.optim.AdamW([tensors[k] for k in names], lr=cfg.peak_lr, weight_decay=cfg.weight_decay)
    stats = {"tokens": 0, "seconds": 0.0, "eval_before": None, "train_before": None}
    step = 0
    best = Best()
    if state is not None:
        with torch.no_grad():
            for k in names:
                tensors[k].copy_(state["tensors"][k])
        optimizer.load_state_dict(state["optimizer"])
        step, stats = state["step"], state["stats"]
        torch.set_rng_state(state["rng"])
        best = Best.from_state(state["best"])
    cfg.output.mkdir(parents=True, exist_ok=True)
    best_dir = cfg.output / BEST
    restore_dir(best_dir)  # an interrupt in the middle of saving it
    keep_best = cfg.keeps_best and bool(p.eval)
    metrics = Metrics(cfg.output / METRICS, step if cfg.resume else None)
    emit = on_event or (lambda record: None)
    started = time.monotonic() - stats["seconds"]

    def record(entry: dict) -> None:
        metrics.write(entry)
        emit(entry)

    def train_loss_now() -> float | None:
        return evaluate(cfg, head, blocks, tensors, p.train[:TRAIN_EVAL_EXAMPLES], pad_id)

    def eval_now() -> float | None:
        loss = evaluate(cfg, head, blocks, tensors, p.eval, pad_id)
        if loss is None:
            return None
        entry = {"type": "eval", "step": step, "eval_loss": loss, "time": time.monotonic() - started}
        if keep_best and best.improves(loss):
            replace_dir(best_dir, lambda directory: save_adapter(cfg, client, tensors, directory))
            best.step, best.eval_loss = step, loss
            entry["best"] = True
        record(entry)
        return loss

    def checkpoint() -> None:
        stats["seconds"] = time.monotonic() - started
        save_checkpoint(ckpt_path, {
            "run": identity,
            "step": step,
            "position": {"epoch": step // p.steps_per_epoch, "micro_batch": (step % p.steps_per_epoch) * cfg.grad_accum},
            "tensors": {k: v.detach().clone() for k, v in tensors.items()},
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),  # the run draws from none; blocks given from outside might
            "stats": stats,
            "best": best.state(),
        })
        emit({"type": "checkpoint", "step": step})

    try:
        emit({"type": "start", "step": step, "total_steps": p.total_steps, "examples": len(p.train),
              "eval_examples": len(p.eval), "warmup_steps": p.warmup_steps, "lr": cfg.peak_lr,
              "adapter": cfg.adapter, "limit": p.limit, "best": str(best_dir) if keep_best else None})
        if step == 0:
            stats["eval_before"] = eval_now()
            stats["train_before"] = train_loss_now()
        while step < p.total_steps:
            t0 = time.monotonic()
            batches = [collate(examples, pad_id) for examples in step_batches(cfg, p, step)]
            lr = lr_at(step, cfg.peak_lr, p.warmup_steps, p.total_steps)
            loss_value, grad_norm = train_step(cfg, head, blocks, tensors, optimizer, batches, step, lr)
            step += 1
            tokens = sum(b.num_tokens for b in batches)
            stats["tokens"] += tokens
            seconds = time.monotonic() - t0
            record({"type": "step", "step": step, "epoch": (step - 1) // p.steps_per_epoch, "loss": loss_value,
                    "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "tokens_seen": stats["tokens"],
                    "tokens_per_s": tokens / seconds if seconds > 0 else 0.0, "time": time.monotonic() - started})
            if cfg.save_every and step % cfg.save_every == 0 and step < p.total_steps:
                eval_now()
                checkpoint()
        eval_after = eval_now()
        train_after = train_loss_now()
        checkpoint()
        save_adapter(cfg, client, tensors)
    finally:
        metrics.close()
    return FinetuneResult(
        output=cfg.output,
        steps=step,
        total_steps=p.total_steps,
        train_loss_before=stats.get("train_before"),
        train_loss_after=train_after,
        eval_loss_before=stats["eval_before"],
        eval_loss_after=eval_after,
        tokens=stats["tokens"],
        examples=len(p.train),
        eval_examples=len(p.eval),
        truncated=dataset.truncated,
        dropped=dataset.dropped,
        seconds=time.monotonic() - started,
        best_step=best.step if keep_best else None,
        best_eval_loss=best.eval_loss if keep_best else None,
        best_output=best_dir if keep_best and best.step is not None else None,
    )

