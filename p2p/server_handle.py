"""Two ways to run a :class:`~swarm.p2p.server.BlockServer`: :func:`serve_forever`, as `swarm serve`
does (its event loop on a thread, block computation on the main thread, until a signal), and
:class:`Server`, a server in this process beside other work (notebooks, programs, tests): its loop
runs on a thread of its own and computation on another, so the caller's thread stays free. And
the line `swarm serve` prints once it is ready.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading

from swarm.p2p.loop import BackgroundLoop, MainThreadExecutor
from swarm.p2p.serve_options import ServeOptions
from swarm.p2p.server import BlockServer, ServerConfig

log = logging.getLogger(__name__)

STOP_TIMEOUT = 30.0  # seconds close() waits for the offline announcement and the sessions to end


def dial_order(addrs: list[str]) -> list[str]:
    """The announced addresses, IPv4 first (the one to print and hand to another peer)."""
    return [a for a in addrs if "/ip4/" in a] + [a for a in addrs if "/ip4/" not in a]


def ready_line(server: BlockServer) -> str:
    """``NAME: serving blocks START:END of MODEL_ID at MULTIADDR (also at ...)``: what `swarm serve`
    prints when it is ready (scripts and tests wait for it: :data:`swarm.launch.READY`). The name
    people call the model comes first, so that ``of MODEL_ID at MULTIADDR`` stays one word each."""
    first, *more = dial_order(server.addrs)
    also = f" (also at {', '.join(more)})" if more else ""
    return (f"{server.model_name}: serving blocks {server.start_block}:{server.end_block} of {server.model} "
            f"at {first}{also}")


def serve_forever(cfg: ServerConfig, on_ready=None) -> None:
    """Run a server until SIGINT/SIGTERM, then announce offline and exit cleanly.

    The event loop runs on a background thread and block computation on this (the main) thread,
    where PyTorch's kernels are fastest (see :class:`~swarm.p2p.loop.MainThreadExecutor`)."""
    compute = MainThreadExecutor()
    background = BackgroundLoop()
    stop_requested = threading.Event()

    def request_stop(*_):
        stop_requested.set()
        compute.wake()

    # SIGTERM from before the start, whose ready line a supervisor may answer with a signal at
    # once: then the server stops as soon as it has started. Ctrl-C during the start interrupts it.
    signal.signal(signal.SIGTERM, request_stop)
    try:
        starting = asyncio.run_coroutine_threadsafe(BlockServer.start(cfg, on_ready, compute), background.loop)
        starting.add_done_callback(lambda _: compute.wake())
        compute.run_until(starting.done)
        server = starting.result()
        signal.signal(signal.SIGINT, request_stop)
        compute.run_until(stop_requested.is_set)
        stopping = asyncio.run_coroutine_threadsafe(server.stop(), background.loop)
        stopping.add_done_callback(lambda _: compute.wake())
        compute.run_until(stopping.done)
    finally:
        background.close()


class Server:
    """A server of a model's blocks, running in this process until :meth:`close` (or the end of a
    ``with`` block)::

        with swarm.Server(blocks="0:15", new_swarm=True) as first, \\
             swarm.Server(blocks="15:30", initial_peers=[first.address]):
            ...

    ``model``: the default model's name (None: the default model), a checkpoint directory or a
    Hub repo id. ``blocks``: ``"START:END"`` (end exclusive) or ``"auto"``. ``options``: `swarm
    serve`'s, by the names of its flags (``cache_tokens=4096`` is ``--cache-tokens 4096``; see
    :class:`~swarm.p2p.serve_options.ServeOptions`). Returns once the server is online.

    Raises ``TypeError`` for an option that does not exist, ``ValueError`` naming the flag of a
    bad value (the same message `swarm serve` prints), and what the start raises (see
    :meth:`BlockServer.start <swarm.p2p.server.BlockServer.start>`); nothing is left running then.
    ``threads`` sets PyTorch's threads for the whole process.
    """

    def __init__(self, model=None, *, blocks: str = "auto", initial_peers=None, new_swarm: bool = False, **options):
        opts = ServeOptions.build(model=model, blocks=blocks, initial_peers=initial_peers or (), new_swarm=new_swarm,
                                  **options)
        cfg = opts.server_config()
        self._loop = BackgroundLoop()
        try:
            self._server = self._loop.call(BlockServer.start(cfg))
        except BaseException:
            self._loop.close()
            raise
        self._closed = False

    @property
    def address(self) -> str:
        """The multiaddr to give other peers (``initial_peers``), as `swarm serve` prints it."""
        return self.addresses[0]

    @property
    def addresses(self) -> list[str]:
        """Every multiaddr this server announces, IPv4 first."""
        return dial_order(self._server.addrs)

    @property
    def blocks(self) -> tuple[int, int]:
        """The blocks served now, (start, end) with end exclusive (an ``auto`` server may move)."""
        return self._server.start_block, self._server.end_block

    @property
    def model(self) -> str:
        """The id the swarm knows the model by (its family and a digest of its config)."""
        return self._server.model

    @property
    def peer_id(self) -> str:
        return self._server.host.peer_id

    def close(self) -> None:
        """Announce going offline, end the sessions, stop (idempotent). A stop that takes longer
        than :data:`STOP_TIMEOUT` is logged and the server closed regardless."""
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.call(self._server.stop(), timeout=STOP_TIMEOUT)
        except (TimeoutError, OSError) as exc:  # closing goes on: the loop's close cancels what is left
            log.warning("stopping the server took too long or failed (%s); closing it anyway", exc or type(exc).__name__)
        finally:
            self._loop.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"blocks {self.blocks[0]}:{self.blocks[1]} at {self.address}"
        return f"<swarm.Server {self.model} {state}>"
