"""Fine-tuning as one call: :func:`finetune` (``swarm.finetune``), what `swarm finetune` runs.

It takes the command's flags as keywords (snake case), checks them and the data the way the
command does, so a Python caller and a command-line user read the same one-line messages::

    import swarm

    result = swarm.finetune("data.jsonl", output="my-adapter", adapter="lora", local=True, epochs=1)
    print(result.eval_loss_before, "->", result.eval_loss_after, "best:", result.best_output)

The loop itself is :func:`swarm.engine.finetune.finetune`; the swarm's blocks come from the same
:class:`~swarm.facade.Swarm` that :func:`swarm.open` gives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from swarm.engine.finetune import FinetuneConfig, FinetuneResult

# ClientOptions' fields a run takes (``adapter`` is the kind to train here, not one to apply)
CLIENT_OPTIONS = (
    "model", "initial_peers", "local", "dtype", "step_timeout", "timeout", "wire_dtype", "no_quant_servers",
    "swarm_key", "allow_peers", "verify", "verify_rate", "device",
)
# FinetuneConfig's fields a caller sets (``output`` and ``adapter`` are finetune's own arguments;
# ``base_model`` and ``dtype`` follow from the client's options)
TRAIN_OPTIONS = tuple(
    f.name for f in fields(FinetuneConfig) if f.name not in ("output", "adapter", "base_model", "dtype")
)
NO_PEERS = "--initial-peers: give a peer of the swarm (as printed by `swarm serve`), or train with --local"


def swarm_errors() -> tuple[type[BaseException], ...]:
    """The exceptions by which a swarm run fails for a reason of the swarm (no server for a
    block, a server's error, the wire, timeouts): what `swarm finetune` reports in one line."""
    from swarm.p2p.chain import SwarmError
    from swarm.p2p.host import P2PError
    from swarm.p2p.routing import NoRouteError
    from swarm.p2p.wire import RemoteError, WireError

    return (SwarmError, NoRouteError, TimeoutError, P2PError, RemoteError, WireError)


def finetune(
    data: str | Path,
    *,
    output: str | Path,
    adapter: str = "lora",
    on_event: Callable[[dict], None] | None = None,
    quiet: bool = False,
    **options,
) -> FinetuneResult:
    """Train an adapter of kind ``adapter`` (``lora``, ``prompt`` or ``deep-prompt``) on the JSON
    lines of ``data`` through the swarm's frozen blocks (or every block here with ``local=True``),
    and save it into ``output`` (with ``metrics.jsonl``, ``checkpoint/`` and, with an eval split,
    ``best/``: the adapter of the lowest eval loss). Returns the run's
    :class:`~swarm.engine.finetune.FinetuneResult`.

    ``options``: `swarm finetune`'s flags in snake case: the training's (``rank``, ``alpha``,
    ``dropout``, ``target_modules``, ``num_virtual_tokens``, ``epochs``, ``max_steps``,
    ``batch_size``, ``grad_accum``, ``lr``, ``warmup_steps``, ``weight_decay``,
    ``max_grad_norm``, ``max_length``, ``seed``, ``eval_fraction``, ``save_every``, ``resume``,
    ``save_best``; see :class:`~swarm.engine.finetune.FinetuneConfig`) and the client's
    (``model``, ``initial_peers`` (default: ``SWARM_INITIAL_PEERS``), ``local``, ``dtype``,
    ``step_timeout``, ``timeout``, ``wire_dtype``, ``no_quant_servers``, ``verify``, ``verify_rate``; see
    :class:`~swarm.config.ClientOptions`). ``on_event`` receives the run's records as they happen
    (see :func:`swarm.engine.finetune.finetune`). ``quiet``: no progress on stderr while the
    default model is fetched on its first use.

    Raises, before any model loads: ``TypeError`` for an unknown keyword;
    :class:`~swarm.engine.finetune_data.DataError` (a ``ValueError``, ``"FILE:LINE: ..."``) for
    bad data; ``ValueError`` naming the flag for a bad value. Then ``ValueError`` for data that
    does not fit the model, an ``output`` holding another run (without ``resume``) or a
    ``resume`` that differs from the saved run; :class:`~swarm.engine.client.ModelNotAvailableError`;
    ``OSError``; and the swarm's errors (:func:`swarm_errors`). ``KeyboardInterrupt`` stops the
    run at once: the last checkpoint stays, and ``resume=True`` continues it exactly."""
    unknown = sorted(set(options) - set(CLIENT_OPTIONS) - set(TRAIN_OPTIONS))
    if unknown:
        names = ", ".join(sorted({"output", "adapter", "on_event", "quiet", *CLIENT_OPTIONS, *TRAIN_OPTIONS}))
        raise TypeError(f"finetune() got unknown option {', '.join(unknown)} (options: {names})")
    from swarm.config import ClientOptions
    from swarm.engine.finetune_data import read_jsonl

    records = read_jsonl(data)  # first: a bad file fails before torch and the model load
    client_kw = {k: options[k] for k in CLIENT_OPTIONS if k in options}
    peers = client_kw.get("initial_peers")
    client_kw["initial_peers"] = (peers,) if isinstance(peers, str) else tuple(peers or ())
    client_options = ClientOptions.build(**client_kw).with_env_peers()
    from swarm.engine.default_model import DEFAULT_MODEL

    cfg = FinetuneConfig(
        output=Path(output), adapter=adapter, base_model=client_options.model or DEFAULT_MODEL,
        dtype=client_options.dtype, **{k: options[k] for k in TRAIN_OPTIONS if k in options},
    )
    if not client_options.local and not client_options.initial_peers:
        raise ValueError(NO_PEERS)
    return _run(cfg, client_options, records, Path(data), on_event, quiet)


def _run(cfg: FinetuneConfig, options, records, data: Path, on_event, quiet: bool) -> FinetuneResult:
    from swarm.engine.client import ClientModel, resolve_model
    from swarm.engine.finetune import finetune as train, preflight
    from swarm.engine.finetune_data import tokenize_records
    from swarm.facade import Swarm

    # the head in float32 whatever --dtype (which is the local blocks'): the trainable tensors'
    # gradients flow through it
    client = ClientModel.load(resolve_model(options.model, quiet=quiet), device=options.devices()[0])
    eos = client.eos_token_ids[0] if client.eos_token_ids else client.tokenizer.eos_token_id
    dataset = tokenize_records(records, client.tokenizer, data, cfg.max_length, eos)
    checked = preflight(cfg, client, dataset)  # every check that needs no blocks, before they load
    with Swarm(options, client, None) as swarm:
        return train(cfg, swarm.blocks, client, dataset, on_event=on_event, checked=checked)
