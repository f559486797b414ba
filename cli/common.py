"""What the ``swarm`` commands share: one-line errors, flag checks, common options, logging.

Its own module so that every command's module imports it (``python -m swarm.cli.main`` would
import ``main`` twice if a command's module imported ``main``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup, TyperOption

from swarm.config import check, check_seconds  # noqa: F401  (the commands' flag checks)

err = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 1) -> None:
    from rich.markup import escape

    # escaped: messages quote paths, lists and errors ("[Errno 2]") that rich would read as markup
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


class Commands(TyperGroup):
    """The ``swarm`` group: its help and its commands' show no type after a flag.

    Typer's rich help prints each option's type in a column, flags included (``--local <bool>``,
    even ``--help <bool>``), which reads as if the flag took a value: ``swarm generate --local true
    "Hi"`` then takes ``true`` for the prompt. An empty metavar leaves the column blank for flags;
    done here, where every command passes on its way to its help, so a new command needs nothing."""

    def get_params(self, ctx):
        return _plain_flags(super().get_params(ctx))

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _plain_flags(command.get_params(ctx))
        return command


def _plain_flags(params: list) -> list:
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        help="Checkpoint: the default model's name, a local directory (config.json + safetensors) or a Hub repo id.",
        show_default="SmolLM2-135M-Instruct",
    ),
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Weights and activations dtype: float32, bfloat16 or float16.")]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        help="Where to compute: auto (a GPU where there is one), cpu, cuda, cuda:N, or GPUs to split blocks over "
        "(cuda:0,cuda:1).",
    ),
]
QuantOpt = Annotated[
    str, typer.Option("--quant", help="Weights of the blocks' linears: none, int8 (LLM.int8) or nf4 (4-bit NormalFloat).")
]
NoQuantServersOpt = Annotated[
    bool, typer.Option("--no-quant-servers", help="Use only servers whose weights are not quantized (int8, nf4).")
]
WireDtypeOpt = Annotated[
    str,
    typer.Option(
        "--wire-dtype",
        help="Hidden states and gradients on the wire: auto (each server's own dtype: exact), float32 (exact), "
        "bfloat16, or int8 (blockwise absmax, about a quarter of float32's bytes).",
    ),
]


StepTimeoutOpt = Annotated[float, typer.Option("--step-timeout", help="Seconds to wait for a server's reply.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds to wait for servers covering every block.")]
PushOpt = Annotated[
    bool, typer.Option("--push/--no-push", help="Servers pass each step straight to the next server of the chain.")
]
# the client's flags above are declared once here and shared by generate, api and (all but --push)
# finetune; their rules and defaults are swarm.config.ClientOptions'


VerifyOpt = Annotated[
    str,
    typer.Option(
        "--verify",
        help="Spot checks of the servers' outputs by other servers: sample (every new server's first steps, "
        "then --verify-rate of the steps or training passes), strict (every one, before its result is used) or off.",
    ),
]
VerifyRateOpt = Annotated[
    float, typer.Option("--verify-rate", help="With --verify sample: the share of steps checked once a server passed its first checks.")
]


InitialPeersOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--initial-peers",
        envvar="SWARM_INITIAL_PEERS",
        help="Multiaddr(s) of peers already in the swarm, as printed by `swarm serve` (env: SWARM_INITIAL_PEERS).",
    ),
]


SwarmKeyOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--swarm-key",
        envvar="SWARM_KEY_FILE",
        help="A private swarm's key file (from `swarm keygen --swarm-key FILE`): only peers holding it can "
        "connect (env: SWARM_KEY_FILE).",
        rich_help_panel="Private swarm",
    ),
]
AllowPeersOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--allow-peers",
        help="A file of peer ids (one per line) that may serve: others' announcements are ignored.",
        rich_help_panel="Private swarm",
    ),
]


def peers(values: Optional[list[str]]) -> list[str]:
    """``--initial-peers`` (repeated flags, or comma- or space-separated lists: the environment's
    form), each checked: ValueError naming the flag for one that is not a peer's full multiaddr."""
    from swarm.config import split_peers

    return split_peers(values)


def quiet_stdout() -> None:
    """After a ``BrokenPipeError`` on stdout (its reader is gone): point stdout at ``os.devnull``, so
    that the flush at exit does not fail again with "Exception ignored ... BrokenPipeError" on
    stderr (the advice of Python's ``signal`` module docs)."""
    import os

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test runner's buffer): nothing to flush
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def setup_logging(verbose: bool) -> None:
    import logging

    # plain lines on stderr: easy to read in a terminal and to grep in a log file
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
