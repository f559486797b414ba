"""What `swarm api` serves requests with: the client's head and tokenizer, and either one persistent
swarm client or every block in this process (``--local``); and :class:`Job`, one request's
generation.

Threads and loops. The swarm client (its libp2p host, its peer table kept fresh by the servers'
announcements, its connections) lives on a :class:`~swarm.p2p.loop.BackgroundLoop`, as in `swarm
generate`; the HTTP server has its own loop. Each request's generation runs the engine's loop
(:func:`swarm.engine.generation.generate`, unchanged: the same tokens as `swarm generate`) on a
thread of its own, where the embeddings, the LM head and sampling compute; each step of the chain
is a call onto the swarm client's loop. Text reaches the request's handler through an asyncio
queue on the HTTP loop. So neither loop ever waits for torch.

Cancellation. :meth:`Job.cancel` (the client went away) cancels the call in flight on the swarm
client's loop (a step, a failover, a chain being opened) and ends the generation at once; the
chain's sessions are then closed (or reset, if a step was cut in half), so the servers free their
caches within a round trip.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from swarm.api.logprobs import stable
from swarm.api.requests import ApiError
from swarm.config import ClientOptions, check
from swarm.engine.adapter_io import Adapter, load_adapter
from swarm.engine.generation import GenerationConfig, TokenLogprob, generate, score_prompt
from swarm.engine.speculative import DRAFTS, SpecStats
from swarm.facade import Swarm
from swarm.p2p.table import gaps, model_name

log = logging.getLogger("swarm.api")

RESYNC_PERIOD = 10.0  # s: with a gap in the table, ask the initial peers for theirs this often


@dataclass
class ApiConfig:
    """What `swarm api` serves and how; ``ValueError`` naming the flag of a value out of range.

    ``client``: the swarm client's options (``--model``, ``--initial-peers`` or ``--local``,
    ``--dtype``, timeouts, wire...; see :class:`~swarm.config.ClientOptions`). ``name``: the base
    model's name in the API (default: the checkpoint's name, as `swarm status` shows it).
    ``adapters``: model name → adapter directory."""

    client: ClientOptions = field(default_factory=lambda: ClientOptions(timeout=10.0))
    name: str = ""
    adapters: dict[str, Path] = field(default_factory=dict)
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)  # browser origins allowed to call the API (CORS)
    default_max_tokens: int = 512  # for a request without max_tokens
    max_requests: int = 16  # generations at once; later requests wait for a slot
    draft: str = "auto"  # speculative decoding for requests that do not say (--draft; see swarm.engine.speculative)

    def __post_init__(self):
        check(self.api_key is None or self.api_key.strip() != "", "--api-key", "a non-empty key", repr(self.api_key))
        check(self.default_max_tokens >= 1, "--default-max-tokens", "at least 1", self.default_max_tokens)
        check(self.max_requests >= 1, "--max-requests", "at least 1", self.max_requests)
        check(self.draft in DRAFTS, "--draft", f"one of {', '.join(DRAFTS)}", self.draft)
        if self.api_key is not None:
            self.api_key = self.api_key.strip()
        self.client = self.client.with_env_peers()
        if not self.client.local and not self.client.initial_peers:
            raise ValueError("give --initial-peers (a multiaddr printed by `swarm serve`, or SWARM_INITIAL_PEERS), "
                             "or --local to run every block here")
        if self.client.adapter is not None:
            raise ValueError("--adapter of `swarm api` is NAME=DIR: each adapter is a model of its own")


class Backend:
    """The models a `swarm api` serves and what runs them: a :class:`~swarm.facade.Swarm` (the
    client's head and tokenizer, and the swarm joined once or every block here) and the
    adapters. Create with :meth:`start`; :meth:`close`."""

    def __init__(self, cfg: ApiConfig, handle: Swarm, adapters: dict[str, Adapter]):
        self.cfg, self.handle = cfg, handle
        self.client_model = handle.client_model
        self.name = cfg.name or model_name(handle.client_model.path)  # as `swarm status` and the ready lines say
        self.models: dict[str, Adapter | None] = {self.name: None, **adapters}
        self.swarm_model = handle.model_id
        self.jobs: set[Job] = set()  # running now (tests look at their chains)
        self.forked_choices = 0  # choices that continued from another choice's prompt step
        self.started = time.time()
        self._resync: concurrent.futures.Future | None = None

    @property
    def background(self):
        """The loop the swarm client lives on (None with ``--local``)."""
        return self.handle.background

    @property
    def swarm(self):
        """The swarm client (:class:`~swarm.p2p.client.SwarmClient`; None with ``--local``)."""
        return self.handle.client

    @property
    def blocks(self):
        """``--local``: every block, loaded once."""
        return self.handle.local_blocks

    @classmethod
    def start(cls, cfg: ApiConfig) -> Backend:
        """Load the head and tokenizer (and every block with ``local``), the adapters, and join the
        swarm. Raises ``ValueError`` (a bad adapter or checkpoint), :class:`SwarmError` (no initial
        peer answers), ``TimeoutError``."""
        handle = Swarm.start(cfg.client, connect=False)
        try:
            checkpoint = handle.checkpoint
            adapters = {name: load_adapter(path, checkpoint) for name, path in cfg.adapters.items()}
            backend = cls(cfg, handle, adapters)
            if backend.name in adapters:
                raise ValueError(f"--adapter {backend.name}=...: that is the base model's name; choose another")
            handle.connect()
        except BaseException:
            handle.close()
            raise
        if backend.swarm is not None:
            backend._resync = asyncio.run_coroutine_threadsafe(backend._keep_synced(), backend.background.loop)
        return backend

    def close(self) -> None:
        for job in list(self.jobs):
            job.cancel()
        if self._resync is not None:
            self._resync.cancel()
        self.handle.close()

    async def _keep_synced(self) -> None:
        """Announcements keep the table fresh; should they stop reaching us (the peers we heard them
        through left), a table with a gap is taken again from the initial peers."""
        while True:
            await asyncio.sleep(RESYNC_PERIOD)
            if gaps(self.swarm.table.snapshot(), self.swarm.num_blocks):
                try:
                    await self.swarm.sync()
                except Exception as exc:  # the next period tries again
                    log.info("resync with the initial peers failed: %s", exc)

    # --- text ---------------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        return self.handle.encode(prompt)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.handle.encode_chat(messages)

    def decode(self, ids: list[int]) -> str:
        return self.handle.decode(ids)

    # --- the swarm ----------------------------------------------------------------------------

    async def status(self) -> dict:
        """``swarm status --json``'s object for the client's table (every server pinged now);
        with ``--local``, this process as the one server, its sessions the jobs running now."""
        return await asyncio.to_thread(self.handle.status_report, self.name, len(self.jobs))

    def step_timeout(self, spans: int) -> float:
        """The longest one step of a chain of ``spans`` servers may take (its own per-span timeouts
        and failover deadlines fire first; this only guards against a bug), as `swarm generate`."""
        from swarm.p2p.client import chain_timeouts

        return chain_timeouts(self.swarm.cfg, spans)[1]

    def event_timeout(self) -> float | None:
        """The longest a job may go without a token: opening a chain, then a step through a chain
        of one server per block (None with ``--local``: computing here, nothing to wait for)."""
        if self.swarm is None:
            return None
        return self.open_timeout() + self.step_timeout(self.client_model.checkpoint.num_blocks)

    def open_timeout(self) -> float:
        from swarm.p2p.client import chain_timeouts

        return chain_timeouts(self.swarm.cfg, 0)[0]


class _Cancelled(Exception):
    """The request's client went away."""


class _StopString(Exception):
    """The text reached a stop string."""


class StopScanner:
    """Turns tokens into text deltas as they come: incomplete UTF-8 sequences are held back (as
    `swarm generate` prints), and so is any end of the text that could begin a stop string; once
    the text holds a stop string, it ends just before it."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...]):
        self.decode, self.stops = decode, stops
        self.tokens: list[int] = []
        self.offsets: list[int] = []  # where each token's text begins in the whole text
        self.sent = 0  # characters of the text handed out
        self.text = ""
        self.full = ""  # the text of every token so far (no stop string cut)
        self.stopped = False

    def push(self, token: int) -> str:
        """The new text that is sure to stay; sets ``stopped`` when a stop string appeared."""
        self.tokens.append(token)
        # where its text begins: after the text that is sure (an incomplete character at the end,
        # "\ufffd" until a later token completes it, begins where this token's text may)
        self.offsets.append(max(len(stable(self.full)), self.offsets[-1] if self.offsets else 0))
        text = self.full = self.decode(self.tokens)
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped, self.text = True, text[: max(cut, self.sent)]
            return self._advance(len(self.text))
        self.text = text
        if text.endswith("\ufffd"):
            return ""
        held = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._advance(len(text) - held)

    def flush(self) -> str:
        """The rest of the text once generation ended (without a stop string)."""
        return self._advance(len(self.text))

    def shown(self) -> int:
        """How many tokens have text in what was handed out: those whose text begins before its
        end (an end-of-sequence token, with no text, never counts)."""
        return bisect.bisect_left(self.offsets, self.sent)

    def _first_stop(self, text: str) -> int | None:
        begin = max(0, self.sent - max((len(s) for s in self.stops), default=0))
        found = [i for i in (text.find(s, begin) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _advance(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : upto], upto
        return delta


@dataclass
class Event:
    kind: str  # "text" (a delta), "end" (``finish``), "error" (``error``)
    text: str = ""
    finish: str = ""
    error: ApiError | None = None
    index: int = 0  # the choice it belongs to
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens whose text came out with it
    offsets: list[int] = field(default_factory=list)  # where those tokens' text begins in the choice's text


async def next_event(events: asyncio.Queue, backend: Backend, cancel: Callable[[], None]) -> Event:
    """The next event of ``events``; an error (and ``cancel()``) if none comes within the longest a
    chain may legitimately take (its own timeouts fire first: this guards against a bug)."""
    try:
        return await asyncio.wait_for(events.get(), backend.event_timeout())
    except TimeoutError:
        cancel()
        return Event("error", error=ApiError(503, "the swarm made no progress on this request in time",
                                             code="swarm_unavailable"))


class Job:
    """One choice's generation on its own thread: :meth:`next` gives its events (text deltas,
    then an end or an error), on ``events`` (its own queue unless given one, tagged with
    ``index``); :meth:`cancel` stops it at once. ``logprobs``: the top alternatives per token to
    report with each delta (None: none); ``echo``: also the prompt's (:attr:`prompt_logprobs`, set
    before the first event), scored here or, given ``prompt_from``, taken from that job (the
    same prompt: the choices of a request score it once). ``score_only``: no token, the prompt's
    log-probabilities alone (a completion's ``max_tokens`` 0 with ``echo``). Create on the HTTP
    loop."""

    def __init__(self, backend: Backend, prompt_ids: list[int], gen: GenerationConfig, stops: tuple[str, ...],
                 adapter: Adapter | None, index: int = 0, events: asyncio.Queue | None = None,
                 logprobs: int | None = None, echo: bool = False, prompt_from: Job | None = None,
                 score_only: bool = False):
        self.backend, self.prompt_ids, self.gen, self.adapter = backend, prompt_ids, gen, adapter
        self.index = index
        self.scanner = StopScanner(backend.decode, stops)
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = events if events is not None else asyncio.Queue()
        self.chain = None  # the RemoteChain serving it, once open
        self.finished = False
        self.top = logprobs  # as engine.generation.Scores
        scored = echo and logprobs is not None
        self.on_prompt = self._on_prompt if scored and prompt_from is None else None
        self.prompt_from = prompt_from if scored else None
        self.score_only = score_only
        self.prompt_logprobs: list[TokenLogprob] = []
        self.prompt_done = threading.Event()  # set once prompt_logprobs is final (or the job ended)
        # the choices of one request share the first's prompt step: it offers (chain, positions,
        # output) once the prompt ran (share_prefill); the others fork that chain (prefill_from)
        self.share_prefill = False
        self.prefill_from: Job | None = None
        self.prefill: tuple | None = None
        self.prefilled = threading.Event()  # set once prefill is offered, or the job ended
        self.forked = False  # this choice continued from another's prompt step
        self.spec = SpecStats()  # what speculative decoding did for it
        self._logprobs: list[TokenLogprob] = []  # one per token, as the scanner's
        self._reported = 0  # tokens whose log-probabilities went out
        self._cancelled = False
        self._why: ApiError | None = None
        self._pending: concurrent.futures.Future | None = None
        self._lock = threading.Lock()

    @property
    def tokens(self) -> list[int]:
        return self.scanner.tokens

    def start(self) -> None:
        self.backend.jobs.add(self)
        threading.Thread(target=self._run, name="swarm-api-job", daemon=True).start()

    async def next(self) -> Event:
        return await next_event(self.events, self.backend, self.cancel)

    def cancel(self, why: ApiError | None = None) -> None:
        """Stop the generation (idempotent; thread-safe): the call in flight on the swarm client's
        loop is cancelled, and the sessions are closed by the job's thread. ``why`` is the error
        a stream still listening gets (by default: the request was cancelled)."""
        with self._lock:
            self._cancelled = True
            self._why = self._why or why
            if self._pending is not None:
                self._pending.cancel()

    # --- the job's thread ---------------------------------------------------------------------

    def _emit(self, kind: str, text: str = "", **fields) -> None:
        if self.prompt_from is not None and kind != "error":  # the echoed prompt's scores, before the first text
            self.prompt_from.prompt_done.wait(self.backend.event_timeout())
            self.prompt_logprobs, self.prompt_from = self.prompt_from.prompt_logprobs, None
        event = Event(kind, text, index=self.index, **fields)
        if kind in ("text", "end") and self.top is not None:
            shown = self.scanner.shown()
            event.logprobs = self._logprobs[self._reported : shown]
            event.offsets = self.scanner.offsets[self._reported : shown]
            self._reported = max(self._reported, shown)
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the HTTP loop is closed: nobody listens any more
            pass

    def _run(self) -> None:
        try:
            prefix = self.adapter.prompt if self.adapter is not None else None
            if self.score_only:
                if self.on_prompt is not None:
                    open_session = self._open_swarm if self.backend.swarm is not None else self._open_local()
                    self._on_prompt(score_prompt(self.backend.client_model.head, open_session, self.prompt_ids,
                                                 self.top, prefix))
                self._emit("end", finish="length")
                return
            open_session = self._open_swarm if self.backend.swarm is not None else self._open_local()
            # a stop string ends the generation through ``stop`` (so it checks what is unchecked as
            # at any end, and a lie found then is handled as any other)
            generate(self.backend.client_model.head, open_session, self.prompt_ids, self.gen, self._on_token,
                     prefix=prefix, scores=self if self.top is not None else None, stats=self.spec,
                     on_rewind=self._on_rewind, stop=lambda: self.scanner.stopped)
            if self.scanner.stopped:
                raise _StopString()
            tokens, eos = self.scanner.tokens, self.gen.eos_token_ids
            finish = "stop" if tokens and tokens[-1] in eos else "length"
            tail = self.scanner.flush()
            if tail:
                self._emit("text", tail)
            self._emit("end", finish=finish)
        except _StopString:
            self._emit("end", finish="stop")
        except _Cancelled:
            self._emit("error", error=self._why or ApiError(499, "the request was cancelled"))
        except Exception as exc:
            self._emit("error", error=api_error(exc))
        finally:
            self.finished = True
            self.prompt_done.set()
            self.prefilled.set()
            self.backend.jobs.discard(self)

    def _on_prompt(self, logprobs: list[TokenLogprob]) -> None:
        self.prompt_logprobs = logprobs
        self.prompt_done.set()

    def on_token(self, logprob: TokenLogprob) -> None:
        """(engine.generation.Scores) a token's log-probability, just before :meth:`_on_token`."""
        self._logprobs.append(logprob)

    def _on_rewind(self, kept: int) -> None:
        """(generate's ``on_rewind``) the tokens from ``kept`` on came through a server caught
        lying and are chosen again: unless text of theirs went out already, the request goes on as
        if they never came; else it ends with an error event (what was sent may be wrong, and an
        API stream cannot take text back)."""
        from swarm.p2p.chain import SwarmError

        old = self.scanner
        if old.shown() > kept:
            raise SwarmError(
                f"a server was caught lying after part of this text was sent (from token {kept + 1} on it may be "
                f"wrong); the liar is banned now: retry the request"
            )
        self.scanner = StopScanner(old.decode, old.stops)
        for token in old.tokens[:kept]:
            self.scanner.push(token)
        self.scanner.sent = old.sent
        del self._logprobs[kept:]

    def _on_token(self, token: int) -> None:
        if self._cancelled:
            raise _Cancelled()
        delta = self.scanner.push(token)
        if delta:
            self._emit("text", delta)

    def _call(self, coro, timeout: float):
        """Run ``coro`` on the swarm client's loop and wait (at most ``timeout``); :meth:`cancel`
        cancels it."""
        with self._lock:
            if self._cancelled:
                coro.close()
                raise _Cancelled()
            future = asyncio.run_coroutine_threadsafe(coro, self.backend.background.loop)
            self._pending = future
        try:
            return future.result(timeout)
        except concurrent.futures.CancelledError:
            raise _Cancelled() from None
        except TimeoutError:
            future.cancel()
            raise
        finally:
            self._pending = None

    def _open_swarm(self, batch: int, max_length: int) -> _JobChain:
        from swarm.p2p.chain import ChainAdapter

        adapter = self.adapter
        remote = ChainAdapter(adapter.tensors, adapter.spec) if adapter is not None and adapter.tensors else None
        if self.prefill_from is not None and remote is None:
            forked = self._fork_prefill()
            if forked is not None:
                return forked
        self.chain = self._call(self.backend.swarm.open_chain(batch, max_length, remote), self.backend.open_timeout())
        return _JobChain(self, self.chain, share=self.share_prefill)

    def _fork_prefill(self) -> _JobChain | None:
        """Choices after the first: once the first choice's chain ran the prompt, a copy of its
        sessions at that point (the servers copy the caches) and its prompt step's output: the
        prompt is computed once for all choices, and each continues exactly as it would alone.
        None (then the prompt is computed anew) if that chain failed first or cannot be copied."""
        source = self.prefill_from
        source.prefilled.wait(self.backend.event_timeout())
        if source.prefill is None:
            return None
        chain, positions, output = source.prefill
        try:
            self.chain = self._call(chain.fork(positions), self.backend.open_timeout())
        except _Cancelled:
            raise
        except Exception as exc:  # the first choice's chain ended meanwhile, ...: compute the prompt here
            log.info("choice %d computes the prompt itself (%s: %s)", self.index, type(exc).__name__, exc)
            return None
        self.forked = True
        self.backend.forked_choices += 1
        return _JobChain(self, self.chain, first=output)

    def _open_local(self):
        def before_step() -> None:
            if self._cancelled:
                raise _Cancelled()

        return self.backend.handle.local_sessions(self.adapter, before_step)


class Choices:
    """A request's ``n`` choices: a :class:`Job` each, started together (the servers batch their
    steps), their events on one queue tagged with the choice's index. With a seed, choice ``i``
    samples with ``seed + i``: what that seed gives alone."""

    def __init__(self, backend: Backend, prompt_ids: list[int], gen: GenerationConfig, stops: tuple[str, ...],
                 adapter: Adapter | None, n: int = 1, logprobs: int | None = None, echo: bool = False,
                 score_only: bool = False):
        self.backend = backend
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.jobs: list[Job] = []
        for i in range(n):
            seeded = gen if gen.seed is None else replace(gen, seed=(gen.seed + i) % 2**64)
            job = Job(backend, prompt_ids, seeded, stops, adapter, index=i, events=self.events, logprobs=logprobs,
                      echo=echo, prompt_from=self.jobs[0] if i else None, score_only=score_only)
            if n > 1 and not score_only and backend.swarm is not None:  # one prompt step for all the choices
                job.share_prefill, job.prefill_from = i == 0, self.jobs[0] if i else None
            self.jobs.append(job)

    def start(self) -> None:
        for job in self.jobs:
            job.start()

    async def next(self) -> Event:
        return await next_event(self.events, self.backend, self.cancel)

    def cancel(self, why: ApiError | None = None) -> None:
        for job in self.jobs:
            job.cancel(why)

    @property
    def completion_tokens(self) -> int:
        return sum(len(job.tokens) for job in self.jobs)

    @property
    def speculation(self) -> dict | None:
        """What speculative decoding did for the choices together (None when no choice decoded
        through it: ``draft`` none, or beam search): the usage's ``speculation``."""
        steps = sum(job.spec.steps for job in self.jobs)
        if not steps:
            return None
        return {"drafted_tokens": sum(job.spec.drafted for job in self.jobs),
                "accepted_tokens": sum(job.spec.accepted for job in self.jobs), "round_trips": steps}


class _JobChain:
    """A job's :class:`~swarm.p2p.chain.RemoteChain` as the engine's inference session (as
    :class:`~swarm.p2p.sync_chain.SyncChain`, with each step cancellable by the job)."""

    def __init__(self, job: Job, chain, share: bool = False, first: torch.Tensor | None = None):
        self.job, self.chain = job, chain
        self._cut = False  # a step was cancelled half-way: the streams may hold half a frame
        self._share = share  # offer the prompt step's output and chain to the request's other choices
        self._first = first  # the prompt step's output, computed by another choice's chain (forked here)

    def step(self, hidden: torch.Tensor, hypo_ids: torch.Tensor | None = None, per_position: bool = False) -> torch.Tensor:
        if self._first is not None:  # the prompt: what the chain this one was copied from computed
            out, self._first = self._first.clone(), None
            return out
        self._cut = True
        out = self.job._call(self.chain.step(hidden, hypo_ids, per_position),
                             self.job.backend.step_timeout(len(self.chain.spans)))
        self._cut = False
        if self._share:
            self._share = False
            self.job.prefill = (self.chain, self.chain.position, out)
            self.job.prefilled.set()
        return out

    def rewind(self, position: int) -> None:
        from swarm.p2p.sync_chain import on_loop

        # on the loop: checks in the background read the chain
        self.job.backend.background.call(on_loop(self.chain.rewind, position), timeout=10)

    def settle(self) -> None:
        """Wait for the chain's checks of its servers (raises Rewound: see RemoteChain.settle)."""
        self._cut = True
        self.job._call(self.chain.settle(), self.job.backend.step_timeout(len(self.chain.spans)))
        self._cut = False

    def close(self) -> None:
        """Close every session (a reset after a cut step: the server ends the session as a failed
        one, freeing its cache at once). Never cancelled, bounded."""
        chain = self.chain
        try:
            self.job.backend.background.call(chain.abort() if self._cut else chain.close(), timeout=10)
        except Exception as exc:  # the servers free an abandoned session on their own timeout
            log.warning("closing a chain: %s", exc)


def api_error(exc: Exception) -> ApiError:
    """The HTTP error of a generation that failed: 503 where the swarm cannot serve (the missing
    blocks named), 500 for anything else (one line; the log has the rest)."""
    from swarm.cache.kv import CacheFullError
    from swarm.p2p.chain import SwarmError
    from swarm.p2p.host import P2PError
    from swarm.p2p.routing import NoRouteError
    from swarm.p2p.wire import RemoteError, WireError

    if isinstance(exc, NoRouteError):
        missing = ", ".join(f"{a}:{b}" for a, b in exc.missing)
        return ApiError(503, f"the swarm cannot serve this model now: blocks {missing} have no server ({exc})",
                        code="blocks_unserved")
    if isinstance(exc, (SwarmError, TimeoutError, P2PError, RemoteError, WireError, CacheFullError)):
        return ApiError(503, f"the swarm could not serve this request: {exc or type(exc).__name__}",
                        code="swarm_unavailable")
    log.error("a generation failed: %s: %s", type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}")


def with_max_tokens(gen: GenerationConfig, max_tokens: int) -> GenerationConfig:
    return replace(gen, max_new_tokens=max_tokens)
