"""The ``swarm`` command: thin typer commands that parse flags and call one library function each."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from swarm.cli.common import (
    AllowPeersOpt,
    PushOpt,
    SwarmKeyOpt,
    StepTimeoutOpt,
    TimeoutOpt,
    Commands,
    DeviceOpt,
    DtypeOpt,
    InitialPeersOpt,
    ModelOpt,
    QuantOpt,
    NoQuantServersOpt,
    VerifyOpt,
    VerifyRateOpt,
    WireDtypeOpt,
    check_seconds,
    err,
    fail,
    peers,
    quiet_stdout,
    setup_logging,
)
from swarm.config import ClientOptions  # light: the client flags' defaults
from swarm.p2p.serve_options import ServeOptions  # light: no torch or libp2p (the flags' defaults)

app = typer.Typer(
    name="swarm",
    help="Run and fine-tune language models too large for one machine over a swarm of peers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=Commands,
)
GAPS = 3  # `swarm status`: some blocks have no server


def _print_version(value: bool) -> None:
    if value:
        from swarm import __version__

        print(f"swarm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", help="Print swarm's version and exit.", callback=_print_version, is_eager=True)
    ] = False,
) -> None:
    """Run and fine-tune language models too large for one machine over a swarm of peers."""


@app.command()
def serve(
    model: ModelOpt = None,
    blocks: Annotated[
        str, typer.Option("--blocks", help="Block range START:END (end exclusive), or auto.")
    ] = ServeOptions.blocks,
    num_blocks: Annotated[
        Optional[int], typer.Option(
            "--num-blocks", help="With --blocks auto: how many blocks (default: as many as fit in --memory)."
        ),
    ] = None,
    memory: Annotated[
        Optional[float],
        typer.Option(
            "--memory",
            help="GB this server may use for blocks and their KV cache (default: the memory available at start).",
        ),
    ] = None,
    choice_delay: Annotated[
        float,
        typer.Option(
            "--choice-delay",
            help="With --blocks auto: wait a random 0 to this many seconds before choosing (servers started "
            "together spread out).",
        ),
    ] = ServeOptions.choice_delay,
    port: Annotated[int, typer.Option("--port", help="TCP port to listen on (0: any free port).")] = ServeOptions.port,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface, announced by their addresses).")
    ] = ServeOptions.host,
    announce_addr: Annotated[
        Optional[list[str]],
        typer.Option(
            "--announce-addr",
            help="The multiaddr other peers should dial, e.g. /ip4/203.0.113.7/tcp/31337 behind a port forward "
            "(repeatable; default: the listen address).",
        ),
    ] = None,
    initial_peers: InitialPeersOpt = None,
    new_swarm: Annotated[bool, typer.Option("--new-swarm", help="Start a new swarm (no initial peers).")] = False,
    identity: Annotated[
        Optional[Path], typer.Option("--identity", help="Ed25519 key file (stable peer id); default under $SWARM_HOME.")
    ] = None,
    dtype: DtypeOpt = ServeOptions.dtype,
    quant: QuantOpt = ServeOptions.quant,
    device: DeviceOpt = ServeOptions.device,
    cache_tokens: Annotated[
        int, typer.Option("--cache-tokens", help="KV cache budget in tokens (batch × length).")
    ] = ServeOptions.cache_tokens,
    public_name: Annotated[str, typer.Option("--public-name", help="A name shown in `swarm status`.")] = "",
    announce_period: Annotated[
        float, typer.Option("--announce-period", help="Seconds between announcements.")
    ] = ServeOptions.announce_period,
    idle_timeout: Annotated[
        float, typer.Option("--idle-timeout", help="Close sessions idle this many seconds (their cache is freed).")
    ] = ServeOptions.idle_timeout,
    step_timeout: Annotated[Optional[float], typer.Option("--step-timeout", hidden=True)] = None,  # --idle-timeout's old name
    threads: Annotated[
        Optional[int],
        typer.Option("--threads", help="CPU threads for block computation (default: PyTorch's, one per core)."),
    ] = None,
    open_timeout: Annotated[
        float, typer.Option("--open-timeout", help="Close a session that sends no step this many seconds after opening.")
    ] = ServeOptions.open_timeout,
    request_timeout: Annotated[
        float,
        typer.Option("--request-timeout", help="Seconds a request may take to arrive; each frame gets this plus 1 s per MiB."),
    ] = ServeOptions.request_timeout,
    peer_cache_share: Annotated[
        float, typer.Option("--peer-cache-share", help="The part of --cache-tokens one peer may hold (0-1].")
    ] = ServeOptions.peer_cache_share,
    max_peer_sessions: Annotated[
        int, typer.Option("--max-peer-sessions", help="Inference sessions one peer may hold open at once.")
    ] = ServeOptions.max_peer_sessions,
    max_batch: Annotated[
        int,
        typer.Option(
            "--max-batch",
            help="Sessions whose steps run together as one batched pass (1: one at a time; results are the same).",
        ),
    ] = ServeOptions.max_batch,
    frame_memory: Annotated[
        int, typer.Option("--frame-memory", help="MiB of frames in flight from all peers together (one peer: 320).")
    ] = ServeOptions.frame_memory,
    throughput: Annotated[
        str,
        typer.Option(
            "--throughput",
            help="Announced speed in tokens/s: auto (min of compute, measured once and cached, and network), "
            "eval (measure compute again) or a number announced as it is.",
        ),
    ] = ServeOptions.throughput,
    bandwidth: Annotated[
        Optional[float],
        typer.Option(
            "--bandwidth",
            help="The link's speed in Mbit/s (default: measured against a peer; assumed 100 until one answers).",
        ),
    ] = None,
    balance_period: Annotated[
        float,
        typer.Option("--balance-period", help="With --blocks auto: check every random 0–2× this many seconds whether to move."),
    ] = ServeOptions.balance_period,
    balance_quality: Annotated[
        float,
        typer.Option(
            "--balance-quality",
            help="Move when the swarm's bottleneck would grow more than 1/this (0: never move; at most 1).",
        ),
    ] = ServeOptions.balance_quality,
    drain_timeout: Annotated[
        float,
        typer.Option("--drain-timeout", help="After a move, seconds the old range's sessions may take to finish."),
    ] = ServeOptions.drain_timeout,
    adapter_memory: Annotated[
        int,
        typer.Option("--adapter-memory", help="MiB of clients' training adapters kept, all peers together (one peer: 64)."),
    ] = ServeOptions.adapter_memory,
    session_adapter_memory: Annotated[
        int,
        typer.Option(
            "--session-adapter-memory",
            help="MiB of adapters held by inference sessions, all peers together (one peer: 256, one session: 64).",
        ),
    ] = ServeOptions.session_adapter_memory,
    require_reachable: Annotated[
        bool,
        typer.Option("--require-reachable", help="Refuse to serve unless another server can dial this one back at its "
                     "announced address (default: warn)."),
    ] = False,
    relay_slots: Annotated[
        int,
        typer.Option("--relay-slots", help="While reachable, relay for this many servers behind NATs at once "
                     "(reservations, and relayed connections; each connection bounded in time and bytes)."),
    ] = ServeOptions.relay_slots,
    no_relay: Annotated[bool, typer.Option("--no-relay", help="Relay for nobody (as --relay-slots 0).")] = False,
    swarm_key: SwarmKeyOpt = None,
    allow_peers: AllowPeersOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log sessions and swarm events.")] = False,
) -> None:
    """Serve a contiguous range of a model's blocks to the swarm."""
    flags = dict(locals())  # the parameters: each is the ServeOptions field of the same name
    from swarm.engine.client import ModelNotAvailableError
    from swarm.engine.families import UnsupportedModelError
    from swarm.engine.quant import QuantUnavailableError
    from swarm.p2p.host import P2PError
    from swarm.p2p.server_handle import ready_line, serve_forever

    del flags["verbose"], flags["step_timeout"]
    if step_timeout is not None:
        err.print("warning: --step-timeout is deprecated, use --idle-timeout", highlight=False, markup=False)
        flags["idle_timeout"] = step_timeout
    try:
        options = ServeOptions(**flags)
        setup_logging(verbose)
        cfg = options.server_config()
        serve_forever(cfg, on_ready=lambda server: print(ready_line(server), flush=True))
    except (ValueError, ModelNotAvailableError, UnsupportedModelError, OSError, P2PError, QuantUnavailableError) as exc:
        fail(str(exc))  # CheckpointError is a ValueError; OSError includes ConnectionError
    except KeyboardInterrupt:
        pass


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
    adapter: Annotated[
        Optional[Path],
        typer.Option(
            "--adapter",
            help="An adapter directory: LoRA or prompt tuning saved by peft or swarm finetune, or a swarm deep prompt.",
        ),
    ] = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = ClientOptions.device,
    quant: Annotated[
        str, typer.Option("--quant", help="With --local: quantize the blocks' linears as servers do (none, int8, nf4).")
    ] = "none",
    quant_blocks: Annotated[
        Optional[str],
        typer.Option("--quant-blocks", help="With --local --quant: only these blocks, START:END (default: all)."),
    ] = None,
    no_quant_servers: NoQuantServersOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with token ids and text.")] = False,
    draft: Annotated[
        str,
        typer.Option(
            "--draft",
            help="Speculative decoding: auto (n-gram drafts where they pay), ngram (prompt lookup), none, or a "
            "draft model's directory (same tokenizer). Greedy output is the same token for token; fewer round trips.",
        ),
    ] = "auto",
    draft_quant: Annotated[
        str, typer.Option("--draft-quant", help="With --draft PATH: quantize the draft model (none, int8, nf4).")
    ] = "none",
    draft_tokens: Annotated[
        int, typer.Option("--draft-tokens", help="Tokens drafted per step (1-16); 0: as many as pay, measured.")
    ] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Report what speculation did (on stderr).")] = False,
    initial_peers: InitialPeersOpt = None,
    step_timeout: StepTimeoutOpt = ClientOptions.step_timeout,
    push: PushOpt = ClientOptions.push,
    timeout: TimeoutOpt = ClientOptions.timeout,
    wire_dtype: WireDtypeOpt = "auto",
    verify: VerifyOpt = ClientOptions.verify,
    verify_rate: VerifyRateOpt = ClientOptions.verify_rate,
    swarm_key: SwarmKeyOpt = None,
    allow_peers: AllowPeersOpt = None,
) -> None:
    """Generate text: stream tokens through a chain of servers (or --local), printing them as they come.

    The output always ends with a newline, also when an error ends it early."""
    from swarm.engine.context import quick_prompt_check
    from swarm.engine.default_model import ALIASES, DEFAULT_MODEL, default_model_dir

    try:  # a prompt past the context is refused before torch, the model or the network load
        spec = model or DEFAULT_MODEL
        quick_prompt_check(default_model_dir() if spec in ALIASES else Path(spec).expanduser(), prompt)
    except ValueError as exc:
        fail(str(exc))
    from dataclasses import replace

    from swarm.cache.kv import CacheFullError
    from swarm.config import sampling
    from swarm.engine.client import ModelNotAvailableError, TextStream
    from swarm.engine.families import UnsupportedModelError
    from swarm.engine.generation import check_prompt_length
    from swarm.engine.quant import QuantUnavailableError
    from swarm.engine.speculative import DRAFTS, SpecStats
    from swarm.facade import Swarm
    from swarm.p2p.client import SwarmError
    from swarm.p2p.host import P2PError
    from swarm.p2p.routing import NoRouteError
    from swarm.p2p.wire import RemoteError, WireError

    try:
        options = ClientOptions(
            model=model, initial_peers=tuple(initial_peers or ()), local=local, dtype=dtype, adapter=adapter,
            step_timeout=step_timeout, timeout=timeout, push=push, no_quant_servers=no_quant_servers,
            wire_dtype=wire_dtype, quant=quant, quant_blocks=quant_blocks, swarm_key=swarm_key, allow_peers=allow_peers,
            verify=verify, verify_rate=verify_rate, device=device,
        )
        draft_path = None if draft in DRAFTS else draft
        if draft_path is not None and num_beams > 1:
            raise ValueError("--draft does not apply to beam search: drop --draft or --num-beams")
        cfg = sampling(
            max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, repetition_penalty=repetition_penalty, num_beams=num_beams, length_penalty=length_penalty,
            draft="none" if draft_path else draft, draft_tokens=draft_tokens,
        )
        client = Swarm.start(options, quiet=as_json, connect=False)
        drafter = client.draft_model(draft_path, quant=draft_quant) if draft_path else None  # AdapterError, CheckpointError: ValueErrors
        cfg = replace(cfg, eos_token_ids=client.client_model.eos_token_ids)
        prompt_ids = client.encode(prompt, chat=chat)
        if not prompt_ids:
            raise ValueError("the prompt is empty: give some text to continue")
        virtual = client.adapter.num_virtual_tokens if client.adapter is not None else 0
        check_prompt_length(len(prompt_ids), client.head.max_positions, virtual)  # before any network setup
    except (ValueError, ModelNotAvailableError, UnsupportedModelError, RuntimeError, QuantUnavailableError) as exc:
        fail(str(exc))

    wrote = False

    def write(text: str) -> None:
        nonlocal wrote
        wrote = wrote or bool(text)  # first: a Ctrl-C right after the write must still end the line
        sys.stdout.write(text)
        sys.stdout.flush()

    stream = None if as_json or num_beams > 1 else TextStream(client.client_model, write)
    # CheckpointError is a ValueError (e.g. damaged block tensors); CacheFullError: no memory for the cache
    errors = (ValueError, CacheFullError, SwarmError, NoRouteError, TimeoutError, P2PError, RemoteError, WireError)
    try:
        if not local:
            setup_logging(False)  # recoveries from failed servers are reported on stderr
        stats = SpecStats()

        def rewound(kept: int) -> None:  # a server was caught lying: its tokens are replaced
            if stream is None:
                return
            if wrote:
                write("\n")
            err.print(f"[yellow]a server was caught lying: the text from token {kept + 1} on is computed again; "
                      "the whole text follows[/]", highlight=False)
            write(stream.rewind(kept))

        tokens = client.generate_ids(prompt_ids, cfg, on_token=stream, stats=stats, draft=drafter, on_rewind=rewound)
    except BaseException as exc:
        if wrote:
            write("\n")  # end the partial output's line
        if isinstance(exc, KeyboardInterrupt):
            raise typer.Exit(130) from None
        if isinstance(exc, errors):
            fail(str(exc) or type(exc).__name__)
        raise
    finally:
        client.close()
    text = client.decode(tokens)
    if as_json:
        print(json.dumps({"prompt_ids": prompt_ids, "token_ids": tokens, "text": text}))
    elif stream is None:
        print(text)
    else:
        write(text[stream.printed :] + "\n")
    if verbose and stats.steps:
        print(stats.line(), file=sys.stderr)


from swarm.cli.finetune import finetune  # noqa: E402  (its own module: the command is long)

app.command()(finetune)

from swarm.cli.api_command import api  # noqa: E402  (its own module: the web stack loads only when it runs)

app.command()(api)


@app.command()
def status(
    initial_peers: InitialPeersOpt = None,
    model: Annotated[
        Optional[str], typer.Option("--model", help="Only this model's servers (default: the initial peer's model).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON (with --watch: one line per refresh).")
    ] = False,
    watch: Annotated[
        bool,
        typer.Option("--watch", help="Refresh every --interval seconds until Ctrl-C (not a terminal: frame by frame)."),
    ] = False,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between refreshes with --watch.")] = 5.0,
    swarm_key: SwarmKeyOpt = None,
    allow_peers: AllowPeersOpt = None,
) -> None:
    """Show the swarm: who serves which blocks, how fast, where the gaps are; and this machine's
    checks of each server (passed, failed) and the servers it banned for lying, with the reason.

    Exit status: 0 every block served; 3 some blocks unserved (gaps); 1 no initial peer answered.
    With --watch, the status of the last refresh.
    """
    import time

    from swarm.engine.client import ModelNotAvailableError
    from swarm.engine.default_model import swarm_home
    from swarm.p2p.client import SwarmError
    from swarm.p2p.ledger import read_ledger
    from swarm.p2p.loop import run
    from swarm.p2p.status import gather_status

    try:
        check_seconds("--interval", interval)
        initial = peers(initial_peers)
        from swarm.p2p.private import Membership

        membership = Membership.from_files(swarm_key, allow_peers)
        model_name = None
        if model is not None:
            from swarm.engine.checkpoint import Checkpoint
            from swarm.engine.client import resolve_model
            from swarm.p2p.table import model_id

            path = resolve_model(model, quiet=True)
            model_name = model_id(Checkpoint(path))
    except (ValueError, ModelNotAvailableError) as exc:
        fail(str(exc))

    def once() -> dict:
        try:
            # read afresh each refresh: this machine's clients may have checked or banned since
            return run(gather_status(initial, model_name, membership=membership, ledger=read_ledger(swarm_home())))
        except SwarmError as exc:
            fail(str(exc))

    from swarm.cli.render import status_view

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)  # a pipe or file has no width to fit: a row per server, not wrapped cells

    def show(data: dict) -> None:
        if as_json:
            print(json.dumps(data))
        else:
            console.print(status_view(data))
        sys.stdout.flush()  # a pipe or file sees every frame as it comes

    data = once()
    try:
        if watch and not as_json and console.is_terminal:
            from rich.live import Live

            with Live(status_view(data), console=console, auto_refresh=False) as live:
                while True:
                    time.sleep(interval)
                    data = once()
                    live.update(status_view(data), refresh=True)
        else:
            show(data)
            while watch:
                time.sleep(interval)
                data = once()
                show(data)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # the reader left (`| head -1`): end as after Ctrl-C, with the last refresh's status
        quiet_stdout()
    if data["gaps"]:
        raise typer.Exit(GAPS)


@app.command()
def keygen(
    swarm_key: Annotated[
        Path, typer.Option("--swarm-key", help="Where to write the new private swarm's key (go-libp2p's swarm.key format).")
    ],
    force: Annotated[bool, typer.Option("--force", help="Replace the file if it exists.")] = False,
) -> None:
    """Write a new private swarm's key; give the file to every member (serve, generate, finetune,
    status and api take --swarm-key FILE or SWARM_KEY_FILE)."""
    from swarm.p2p.private import write_swarm_key

    try:
        write_swarm_key(swarm_key, force=force)
    except ValueError as exc:
        fail(str(exc))
    print(f"wrote a new swarm key to {swarm_key}: keep it secret; every member of the swarm passes --swarm-key {swarm_key}")


if __name__ == "__main__":
    app()
