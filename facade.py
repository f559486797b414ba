"""One way in: :func:`open` gives a :class:`Swarm`, a model's client joined once and reused.

A :class:`Swarm` holds the client's side of a model (tokenizer, embeddings, LM head) and either a
swarm client (its libp2p host on a background thread, a peer table kept fresh by the servers'
announcements) or, with ``local=True``, every block in this process. `swarm generate`, `swarm api`,
the tests and the benchmarks use it as a program does::

    import swarm

    with swarm.open(initial_peers=["/ip4/127.0.0.1/tcp/PORT/p2p/ID"]) as s:
        print(s.generate("The capital of France is", max_new_tokens=8))

Generation runs the engine's loop unchanged (:func:`swarm.engine.generation.generate`), so the
tokens are those of `swarm generate` (and of ``--local``) for the same options. A :class:`Swarm`
may be used from several threads at once: each generation opens its own sessions.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from swarm.config import ClientOptions, sampling
from swarm.engine.adapter_io import Adapter, load_adapter
from swarm.engine.adapters import AdapterSpec, LocalBlocks
from swarm.engine.checkpoint import BlockRange, Checkpoint
from swarm.engine.client import ClientModel, TextStream, local_sessions, resolve_model
from swarm.engine.finetune import forward_logits
from swarm.engine.finetune_data import Batch, token_loss, with_virtual_tokens
from swarm.engine.generation import GenerationConfig, check_prompt_length, generate
from swarm.engine.draft_model import ModelDrafter
from swarm.engine.speculative import Drafter, SpecStats

log = logging.getLogger("swarm")


class Swarm:
    """A model's client, joined once (see the module's docstring). Create with :func:`open`;
    :meth:`close` it, or use it as a context manager."""

    def __init__(self, options: ClientOptions, client_model: ClientModel, adapter: Adapter | None):
        self.options = options
        self.client_model = client_model
        self.adapter = adapter
        self.local_blocks: BlockRange | None = None  # local: every block, loaded once
        self.background = None  # swarm: the loop the client lives on (swarm.p2p.loop.BackgroundLoop)
        self.client = None  # swarm: a swarm.p2p.client.SwarmClient
        self._blocks: nn.Module | None = None
        self.compute_lock = threading.Lock()  # local: one step at a time (adapters patch the shared blocks)
        self._tokenizer = threading.Lock()  # a fast tokenizer refuses concurrent use ("Already borrowed")
        self._closed = False
        # the blocks of the last range the arbiter ran (strict checks with no second server run the
        # same range at every step: loaded once), and the lock its calls from several threads take
        self._arbiter_blocks: BlockRange | None = None
        self._arbiter_lock = threading.Lock()

    # --- opening and closing ---------------------------------------------------------------

    @classmethod
    def start(cls, options: ClientOptions, quiet: bool = False, connect: bool = True) -> Swarm:
        """Load the client's model and adapter, then (``connect``) :meth:`connect`. Raises
        ``ValueError`` (a bad checkpoint or adapter), :class:`~swarm.engine.client.ModelNotAvailableError`,
        and what :meth:`connect` raises. ``quiet``: no progress on stderr when the default model
        is fetched."""
        options = options.with_env_peers()
        client_model = ClientModel.load(resolve_model(options.model, quiet=quiet), options.torch_dtype, options.devices()[0])
        adapter = load_adapter(options.adapter, client_model.checkpoint) if options.adapter is not None else None
        quantized, ckpt = options.quantized(), client_model.checkpoint
        if isinstance(quantized, range) and quantized.stop > ckpt.num_blocks:
            raise ValueError(f"--quant-blocks must be within this model's blocks 0:{ckpt.num_blocks}, "
                             f"got {options.quant_blocks}")
        self = cls(options, client_model, adapter)
        if connect:
            self.connect()
        return self

    def connect(self) -> None:
        """Load every block (``local``) or join the swarm, once. Raises
        :class:`~swarm.p2p.client.SwarmError` (no initial peer, or none answers for this model),
        ``TimeoutError``, and with ``local`` what loading the blocks raises."""
        self._check_open()
        if self.local_blocks is not None or self.client is not None:
            return
        options, ckpt = self.options, self.checkpoint
        if options.local:
            quantized = options.quantized()
            self.local_blocks = ckpt.load_blocks(
                0, ckpt.num_blocks, options.torch_dtype, quant=options.quant,
                quantized=None if quantized in (None, "all") else quantized, devices=options.devices(),
            )
            return
        from swarm.p2p.client import SwarmError, start_client
        from swarm.p2p.loop import BackgroundLoop

        if not options.initial_peers:
            raise SwarmError(
                "no swarm to join: pass --initial-peers with a multiaddr printed by `swarm serve` (or set "
                "SWARM_INITIAL_PEERS); to start a swarm, run `swarm serve --new-swarm --blocks auto`; "
                "or use --local to run every block here"
            )
        self.background = BackgroundLoop()
        try:
            cfg = options.client_config()
            cfg.arbiter = self._arbiter
            self.client = start_client(self.background, self.model_id, ckpt.num_blocks, cfg)
        except BaseException:
            self.background.close()
            self.background = None
            raise

    def _arbiter(self, start: int, end: int, inputs: torch.Tensor, adapter) -> torch.Tensor:
        """Blocks ``[start, end)`` run here in float32 on ``inputs`` (with a chain's ``adapter``):
        the third opinion when two servers disagree and no third serves them (p2p/checking.py)."""
        from swarm.engine.adapters import attach, run_forward

        with self._arbiter_lock:
            blocks = self._arbiter_blocks
            if blocks is None or (blocks.start, blocks.end) != (start, end):
                blocks = self._arbiter_blocks = attach(self.checkpoint.load_blocks(start, end, torch.float32))
            if adapter is None:
                return run_forward(blocks, inputs)
            return run_forward(blocks, inputs, adapter.tensors, adapter.spec)

    def close(self) -> None:
        """Leave the swarm and free the blocks (idempotent). The handle refuses further use."""
        if self._closed:
            return
        self._closed = True
        self.local_blocks = self._blocks = self._arbiter_blocks = None
        if self.background is not None:
            try:
                if self.client is not None:
                    self.background.call(self.client.close(), timeout=15)
            except (TimeoutError, OSError) as exc:
                log.warning("closing the swarm client: %s", exc)
            finally:
                self.background.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Swarm is closed: open another with swarm.open(...)")

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- what it holds ---------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The model's tokenizer (a transformers tokenizer)."""
        return self.client_model.tokenizer

    @property
    def checkpoint(self) -> Checkpoint:
        """The model's checkpoint (its config, block count and weights' files)."""
        return self.client_model.checkpoint

    @property
    def head(self) -> nn.Module:
        """The client's part of the model: embeddings, final norm and LM head."""
        return self.client_model.head

    @property
    def model_id(self) -> str:
        """The id servers announce this model by (the family and a digest of its config)."""
        from swarm.p2p.table import model_id

        return model_id(self.checkpoint)

    @property
    def blocks(self) -> nn.Module:
        """Every block of the model as a differentiable ``torch.nn.Module``: ``blocks(hidden
        [batch, seq, hidden], tensors=None, spec=None) -> hidden``, with the adapter ``tensors``
        (see :func:`init_lora`) applied with ``spec``; gradients flow to ``hidden`` and to every
        tensor, through the servers (with failover) or here with ``local``."""
        self._check_open()
        if self._blocks is None:
            self.connect()
            if self.local_blocks is not None:
                self._blocks = LocalBlocks(self.local_blocks)
            else:
                from swarm.p2p.remote_blocks import RemoteBlocks

                self._blocks = RemoteBlocks(self.client, self.background, checkpoint=self.checkpoint)
        return self._blocks

    # --- text ------------------------------------------------------------------------------

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        """Token ids of ``prompt``; with ``chat``, wrapped as one user turn by the chat template."""
        with self._tokenizer:
            return self.client_model.encode(prompt, chat=chat)

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of a conversation by the model's chat template, ending where the assistant's
        answer starts."""
        with self._tokenizer:
            return self.client_model.encode_chat(list(messages))

    def decode(self, ids: Sequence[int]) -> str:
        with self._tokenizer:
            return self.client_model.decode(list(ids))

    # --- generation ------------------------------------------------------------------------

    def generation_config(self, **options) -> GenerationConfig:
        """`swarm generate`'s sampling flags as keywords (``max_new_tokens=32``, ``sample``,
        ``temperature``, ``top_k``, ``top_p``, ``seed``, ``repetition_penalty``, ``num_beams``,
        ``length_penalty``, ``draft``), with this model's end-of-sequence tokens. ``ValueError`` naming the
        flag of a bad value; ``TypeError`` for an unknown keyword."""
        return sampling(**options, eos_token_ids=self.client_model.eos_token_ids)

    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        cfg: GenerationConfig,
        on_token: Callable[[int], None] | None = None,
        on_chain: Callable | None = None,
        stats: SpecStats | None = None,
        draft: Drafter | None = None,
        on_rewind: Callable[[int], None] | None = None,
    ) -> list[int]:
        """The new tokens after ``prompt_ids`` (an end-of-sequence token, if produced, last);
        ``on_token`` is called with each as it is chosen, ``on_chain`` with each chain of servers
        as it opens; ``stats`` counts what speculative decoding did (``cfg.draft``, or ``draft``: a
        drafter such as :meth:`draft_model`'s; greedy decoding and sampling, the tokens unchanged);
        ``on_rewind(n)``: only the first ``n`` tokens reported so far stand, the rest were computed
        through a server caught lying and are reported again. Raises ``ValueError`` for a prompt past the model's context, and the swarm's
        errors (:class:`~swarm.p2p.client.SwarmError`, ``NoRouteError``, ``TimeoutError``...)."""
        self._check_open()
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise ValueError("the prompt is empty: give some text to continue")
        adapter = self.adapter
        prefix = adapter.prompt if adapter is not None else None
        virtual = adapter.num_virtual_tokens if adapter is not None else 0
        check_prompt_length(len(prompt_ids), self.head.max_positions, virtual)  # before any network setup
        self.connect()
        return generate(self.head, self._sessions(on_chain), prompt_ids, cfg, on_token, prefix=prefix, stats=stats,
                        draft=draft, on_rewind=on_rewind)

    def draft_model(self, path: str | Path, quant: str = "none") -> ModelDrafter:
        """A draft model for speculative decoding (``generate_ids(..., draft=...)``): the
        checkpoint at ``path``, held here whole (bfloat16, or ``quant`` int8/nf4), which must share
        this model's tokenizer. ``ValueError`` naming the directory otherwise."""
        return ModelDrafter.load(path, self.client_model.path, quant=quant)

    def _sessions(self, on_chain: Callable | None):
        if self.local_blocks is None:
            from swarm.p2p.client import swarm_sessions

            return swarm_sessions(self.background, self.client, self.adapter, on_chain)
        return self.local_sessions(self.adapter)

    def local_sessions(self, adapter: Adapter | None, before_step: Callable[[], None] | None = None):
        """``local``: the engine's session opener over the blocks held here, each step under
        :attr:`compute_lock` (an adapter patches the shared blocks for its step), ``before_step``
        called first (it may raise to stop the generation)."""
        opener, lock = local_sessions(self.local_blocks, adapter), self.compute_lock

        def open_session(batch: int, max_length: int):
            session = opener(batch, max_length)
            step = session.step

            def locked_step(hidden, hypo_ids=None, per_position=False):
                if before_step is not None:
                    before_step()
                with lock:
                    return step(hidden, hypo_ids, per_position)

            session.step = locked_step
            return session

        return open_session

    def generate(self, prompt: str, *, chat: bool = False, **sampling_options) -> str:
        """The text generated after ``prompt`` (``chat``: wrapped as one user turn by the chat
        template), as `swarm generate` prints it. Keywords: see :meth:`generation_config`."""
        cfg = self.generation_config(**sampling_options)
        return self.decode(self.generate_ids(self.encode(prompt, chat=chat), cfg))

    def chat(self, messages: Sequence[dict], **sampling_options) -> str:
        """The assistant's answer to a conversation (``[{"role": "user", "content": "Hi"}, ...]``)
        by the model's chat template."""
        cfg = self.generation_config(**sampling_options)
        return self.decode(self.generate_ids(self.encode_chat(messages), cfg))

    def stream(self, prompt: str, *, chat: bool = False, **sampling_options) -> Iterator[str]:
        """The text of :meth:`generate`, in pieces as tokens come (an incomplete UTF-8 character is
        held back until it is whole). Leaving the loop early stops the generation and frees its
        sessions. Beam search knows its text only at the end: one piece."""
        cfg = self.generation_config(**sampling_options)
        prompt_ids = self.encode(prompt, chat=chat)
        pieces: queue.Queue = queue.Queue()
        stop = threading.Event()
        done = object()

        class _Stopped(Exception):
            pass

        text = TextStream(self.client_model, pieces.put)

        def on_token(token: int) -> None:
            if stop.is_set():
                raise _Stopped()
            with self._tokenizer:
                text(token)

        def on_rewind(kept: int) -> None:  # tokens from ``kept`` on came through a liar and are replaced
            from swarm.p2p.chain import SwarmError

            with self._tokenizer:
                if text.printed > len(self.decode(text.tokens[:kept])):  # their text went out: it cannot be taken back
                    raise SwarmError(f"a server was caught lying after part of this text was given out (from token "
                                     f"{kept + 1} on it may be wrong); the liar is banned now: generate again")
                del text.tokens[kept:]

        def run() -> None:
            try:
                tokens = self.generate_ids(prompt_ids, cfg, on_token=None if cfg.num_beams > 1 else on_token,
                                           on_rewind=on_rewind)
                pieces.put(self.decode(tokens)[text.printed :] if cfg.num_beams == 1 else self.decode(tokens))
                pieces.put(done)
            except _Stopped:
                pieces.put(done)
            except BaseException as exc:  # handed to the caller's thread
                pieces.put(exc)

        worker = threading.Thread(target=run, name="swarm-stream", daemon=True)
        worker.start()
        interrupted = False
        try:
            while True:
                piece = pieces.get()
                if piece is done:
                    return
                if isinstance(piece, BaseException):
                    raise piece
                if piece:
                    yield piece
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            stop.set()
            if not interrupted:  # Ctrl-C returns at once; the worker stops at its next token
                worker.join()

    # --- training --------------------------------------------------------------------------

    def logits(self, input_ids: torch.Tensor, tensors: dict[str, torch.Tensor] | None = None,
               spec: AdapterSpec | None = None) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` of ``input_ids`` ``[batch, seq]`` through the head and
        :attr:`blocks`, with the adapter ``tensors`` (a ``prompt_embeddings`` tensor is put before
        the input), differentiable in every tensor."""
        return forward_logits(self.head, self.blocks, input_ids, dict(tensors or {}), spec or AdapterSpec())

    def loss(self, batch: Batch, tensors: dict[str, torch.Tensor] | None = None,
             spec: AdapterSpec | None = None) -> torch.Tensor:
        """The mean next-token cross-entropy of a :class:`Batch` (from :func:`batches`) over its
        labelled positions, with the adapter ``tensors`` applied with ``spec``:
        ``loss.backward()`` fills each tensor's ``.grad`` (through the servers)."""
        logits = self.logits(batch.input_ids, tensors, spec)
        virtual = logits.shape[1] - batch.input_ids.shape[1]  # a prompt's positions, before the input's
        total, count = token_loss(logits, with_virtual_tokens(batch.labels, virtual))
        return total / max(count, 1)

    # --- the swarm -------------------------------------------------------------------------

    def status(self) -> dict:
        """The swarm's topology, the report of `swarm status --json` (every server pinged now);
        with ``local``, this process as the one server."""
        return self.status_report()

    def status_report(self, name: str | None = None, local_sessions: int = 0) -> dict:
        """:meth:`status` with the model called ``name`` (default: the checkpoint's name) and,
        with ``local``, ``local_sessions`` generations running here (`swarm api` counts its own)."""
        from swarm.p2p.status import ping_all, status_report
        from swarm.p2p.table import ServerInfo, model_name

        num_blocks, name = self.checkpoint.num_blocks, name or model_name(self.client_model.path)
        self.connect()
        if self.client is None:
            me = ServerInfo(peer_id="local", addrs=(), model=self.model_id, start=0, end=num_blocks,
                            public_name="this process (--local)", sessions=local_sessions, dtype=self.options.dtype)
            return status_report(self.model_id, num_blocks, {me.peer_id: me}, {me.peer_id: 0.0}, model_name=name)

        async def gather() -> dict:
            servers = self.client.table.snapshot()
            rtts = await ping_all(self.client.host, servers, 2.0)
            return status_report(self.model_id, num_blocks, servers, rtts, model_name=name)

        return self.background.call(gather(), timeout=30)


def open(model: str | Path | None = None, *, initial_peers: Sequence[str] | str | None = None, local: bool = False,
         **options) -> Swarm:
    """A :class:`Swarm`: the client of ``model`` (None: the default model; a checkpoint directory
    or a Hub repo id), joined through ``initial_peers`` (multiaddrs printed by `swarm serve`;
    default: ``SWARM_INITIAL_PEERS``), or with every block in this process (``local=True``).

    ``options`` are the client's flags in snake case: ``dtype``, ``adapter`` (a directory),
    ``step_timeout``, ``timeout``, ``push``, ``no_quant_servers``, ``wire_dtype``, ``quant`` and
    ``quant_blocks`` (local only). A bad value raises ``ValueError`` with the message the flag gets;
    an unknown keyword, ``TypeError``. Joining raises :class:`~swarm.p2p.client.SwarmError` when no
    initial peer answers."""
    if isinstance(initial_peers, str):
        initial_peers = [initial_peers]
    built = ClientOptions.build(
        model=None if model is None else str(model), initial_peers=tuple(initial_peers or ()), local=local, **options
    )
    return Swarm.start(built, quiet=True)


# --- the pieces of a training loop of one's own -----------------------------------------------


def read_dataset(path: str | Path, tokenizer, max_length: int = 512, eos_token_id: int | None = None):
    """The JSON-lines file ``path`` (``{text}``, ``{prompt, completion}`` or ``{messages}`` per
    line, as `swarm finetune` takes it), tokenized: a :class:`~swarm.engine.finetune_data.Dataset`
    whose ``examples`` have ``input_ids`` and ``labels``. ``tokenizer``: a :class:`Swarm` (its
    tokenizer, and the model's first stop token to end texts and completions, as `swarm finetune`
    does) or a transformers tokenizer (its ``eos_token_id``). Examples over ``max_length`` tokens
    are cut; ``eos_token_id`` overrides the end token. Raises ``DataError`` (a ``ValueError``) as
    ``FILE:LINE: what is wrong``."""
    from swarm.engine.finetune_data import read_jsonl, tokenize_records

    if max_length < 2:
        raise ValueError(f"--max-length must be at least 2, got {max_length}")
    if isinstance(tokenizer, Swarm):
        stops = tokenizer.client_model.eos_token_ids
        tokenizer = tokenizer.tokenizer
        default_eos = stops[0] if stops else tokenizer.eos_token_id
    else:
        default_eos = tokenizer.eos_token_id
    eos = default_eos if eos_token_id is None else eos_token_id
    return tokenize_records(read_jsonl(path), tokenizer, path, max_length, eos)


def batches(dataset, batch_size: int = 8, pad_id: int = 0) -> Iterator[Batch]:
    """The dataset's examples in order, ``batch_size`` at a time, right-padded with ``pad_id``
    (labels of padding are ignored by :meth:`Swarm.loss`)."""
    from swarm.engine.finetune_data import collate

    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    examples = dataset.examples if hasattr(dataset, "examples") else list(dataset)
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i : i + batch_size], pad_id)


def init_lora(checkpoint: Checkpoint, target_modules: Sequence[str] | str | None = None, rank: int = 8,
              seed: int = 0) -> dict[str, torch.Tensor]:
    """Fresh LoRA tensors for every block of ``checkpoint`` (as peft initializes them: A
    Kaiming-uniform, B zero; float32), ready to train (``requires_grad``). ``target_modules``:
    names such as ``["q_proj", "v_proj"]``, ``"all-linear"``, or None for the family's default (as
    peft's). Pass them to :meth:`Swarm.loss` with ``AdapterSpec(scale=alpha / rank)``; save them
    with :func:`save_lora` as a peft adapter."""
    from swarm.engine.adapters import init_lora as fresh, resolve_targets

    targets = resolve_targets(checkpoint, list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules)
    return {k: v.requires_grad_(True) for k, v in fresh(checkpoint, targets, rank, seed).items()}


def save_lora(directory: str | Path, checkpoint: Checkpoint, tensors: dict[str, torch.Tensor], alpha: float,
              dropout: float = 0.0, base_model: str = "") -> Path:
    """Write ``tensors`` (from :func:`init_lora`, trained) as a peft LoRA adapter in ``directory``
    (``adapter_config.json`` and ``adapter_model.safetensors``): `swarm generate --adapter DIR`
    and ``peft.PeftModel.from_pretrained`` load it. ``alpha``: the scale's numerator (the spec's
    scale is ``alpha / rank``)."""
    from swarm.engine.adapter_io import save_lora as save

    if not tensors:
        raise ValueError("no LoRA tensors to save")
    rank = next(v.shape[0] for k, v in tensors.items() if k.endswith(".lora_A"))
    targets = sorted({k.split(".", 1)[1].rsplit(".lora_", 1)[0] for k in tensors})
    directory = Path(directory)
    save(directory, checkpoint, {k: v.detach() for k, v in tensors.items()}, rank=rank, alpha=alpha, dropout=dropout,
         targets=targets, base_model=base_model)
    return directory
