"""``swarm api``: parse flags and serve :mod:`swarm.api` (imported only when the command runs:
the rest of the CLI does not load the web stack)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from swarm.cli.common import (
    DeviceOpt,
    AllowPeersOpt,
    SwarmKeyOpt,
    PushOpt,
    StepTimeoutOpt,
    DtypeOpt,
    InitialPeersOpt,
    ModelOpt,
    NoQuantServersOpt,
    VerifyOpt,
    VerifyRateOpt,
    WireDtypeOpt,
    check,
    err,
    fail,
    setup_logging,
)
from swarm.config import ClientOptions  # light: the client flags' defaults


def api(
    model: ModelOpt = None,
    initial_peers: InitialPeersOpt = None,
    local: Annotated[bool, typer.Option("--local", help="Run every block in this process (no swarm).")] = False,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port to listen on (0: any free port).")] = 8000,
    api_key: Annotated[
        Optional[str],
        typer.Option("--api-key", envvar="SWARM_API_KEY",
                     help="Require 'Authorization: Bearer KEY' on /v1 (env: SWARM_API_KEY)."),
    ] = None,
    cors_origin: Annotated[
        Optional[list[str]],
        typer.Option("--cors-origin", help="Let web pages of this origin (e.g. http://localhost:3000, or *) call the API "
                                           "from a browser; repeatable (default: none)."),
    ] = None,
    adapter: Annotated[
        Optional[list[str]],
        typer.Option("--adapter", help="NAME=DIR: serve an adapter (from swarm finetune or peft) as model NAME; repeatable."),
    ] = None,
    name: Annotated[
        Optional[str], typer.Option("--name", help="The base model's name in the API.", show_default="the checkpoint directory's name")
    ] = None,
    default_max_tokens: Annotated[
        int, typer.Option("--default-max-tokens", help="New tokens at most for a request without max_tokens.")
    ] = 512,
    max_requests: Annotated[
        int, typer.Option("--max-requests", help="Generations at once; later requests wait for a slot.")
    ] = 16,
    draft: Annotated[
        str,
        typer.Option("--draft", help="Speculative decoding for requests that do not set 'draft': auto, ngram or none."),
    ] = "auto",
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = ClientOptions.device,
    step_timeout: StepTimeoutOpt = ClientOptions.step_timeout,
    timeout: Annotated[
        float,
        typer.Option("--timeout", help="Seconds a request waits for servers covering every block (then 503)."),
    ] = 10.0,
    push: PushOpt = ClientOptions.push,
    no_quant_servers: NoQuantServersOpt = False,
    wire_dtype: WireDtypeOpt = "auto",
    verify: VerifyOpt = ClientOptions.verify,
    verify_rate: VerifyRateOpt = ClientOptions.verify_rate,
    swarm_key: SwarmKeyOpt = None,
    allow_peers: AllowPeersOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log requests' failures in full and swarm events.")] = False,
) -> None:
    """Serve an OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions) and the
    swarm's web page (/) over one persistent swarm client (or --local)."""
    from swarm.engine.client import ModelNotAvailableError, resolve_model
    from swarm.engine.families import UnsupportedModelError

    try:
        check(0 <= port <= 65535, "--port", "between 0 and 65535 (0: any free port)", port)
        from swarm.api.backend import ApiConfig

        cfg = ApiConfig(
            client=ClientOptions(
                model=model, initial_peers=tuple(initial_peers or ()), local=local, dtype=dtype,
                step_timeout=step_timeout, timeout=timeout, push=push, no_quant_servers=no_quant_servers,
                wire_dtype=wire_dtype, swarm_key=swarm_key, allow_peers=allow_peers, verify=verify,
                verify_rate=verify_rate, device=device,
            ),
            name=name or "",
            adapters=parse_adapters(adapter or []),
            api_key=api_key,
            cors_origins=list(cors_origin or []),
            default_max_tokens=default_max_tokens,
            max_requests=max_requests,
            draft=draft,
        )
        setup_logging(verbose)
        resolve_model(model)  # the default model fetched (with progress) before the server starts
    except (ValueError, ModelNotAvailableError) as exc:
        fail(str(exc))

    from swarm.api.app import serve_api
    from swarm.p2p.client import SwarmError
    from swarm.p2p.host import P2PError

    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"warning: --host {host} without --api-key: anyone who reaches this port can use the swarm through it",
                  highlight=False, markup=False)

    def ready(url: str, backend) -> None:
        where = "this process (--local)" if local else "the swarm"
        print(f"serving {', '.join(backend.models)} from {where} at {url} (OpenAI API at {url}/v1)", flush=True)

    try:
        serve_api(cfg, host, port, on_ready=ready)
    except (ValueError, UnsupportedModelError, SwarmError, P2PError, TimeoutError, OSError, RuntimeError) as exc:
        fail(str(exc) or type(exc).__name__)  # a bad adapter or checkpoint, no swarm, the port in use
    except KeyboardInterrupt:
        pass


def parse_adapters(values: list[str]) -> dict[str, Path]:
    """``NAME=DIR`` flags as ``{name: directory}``; ``ValueError`` naming ``--adapter`` otherwise."""
    out: dict[str, Path] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        name = name.strip()
        if not sep or not name or not directory:
            raise ValueError(f"--adapter must be NAME=DIR (a model name and an adapter directory), got {value!r}")
        if name in out:
            raise ValueError(f"--adapter {name}=...: given twice")
        out[name] = Path(directory).expanduser()
    return out

