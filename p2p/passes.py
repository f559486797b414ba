"""Stateless passes: ``forward`` and ``backward`` over a sub-range of a server's blocks, optionally
with a client's adapter (LoRA, deep prompts; kept by digest in an
:class:`~swarm.p2p.adapter_store.AdapterStore`). Backward recomputes the forward and returns the
gradient with respect to the input hidden states and to the adapter's tensors (the blocks' weights
are frozen). A request may name a wire dtype (``wire``, see :mod:`swarm.p2p.compression`) for the
output or input gradient. The client must keep its side of the stream open until the reply: an end
of stream or a reset means nobody waits for the result any more, and the computation stops before
its next block. Before each block (forward and backward), the inference steps waiting on the
server run (see :meth:`~swarm.p2p.scheduler.ComputeQueue.between`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING

from swarm.engine.adapters import run_backward, run_forward, suspended
from swarm.engine.checkpoint import StepCancelled
from swarm.engine.quant import quantization
from swarm.engine.steps import check_hidden
from swarm.p2p.compression import pack_off_loop, session_wire, unpack
from swarm.p2p.evidence import pass_digest
from swarm.p2p.host import P2PError, P2PTimeoutError, StreamClosedError
from swarm.p2p.limits import FrameBudgetError
from swarm.p2p.wire import BAD_REQUEST, BUSY, SERVER_ERROR, Frame, WireError, read_frame, write_frame

if TYPE_CHECKING:
    from swarm.p2p.server import BlockServer

log = logging.getLogger("swarm.server")


async def handle_pass(server: BlockServer, kind: str, stream) -> None:
    """A ``forward`` (hidden [, adapter...]) or ``backward`` (hidden, grad_output [, adapter...])
    request, answered with a ``result``: the output, or the gradient with respect to hidden
    followed by the adapter tensors' gradients (named by its ``names`` field)."""
    frame, watcher, stop = None, None, threading.Event()
    peer = stream.remote_peer_id
    try:
        frame = await read_frame(
            stream, timeout=server.cfg.request_timeout, max_frame=server.cfg.max_frame,
            frame_timeout=server.cfg.request_timeout, budget=server.frames,
        )
        if frame.kind != kind:
            raise WireError(f"expected a {kind} frame, got {frame.kind}")
        blocks = server.check_range(frame["start"], frame["end"])
        wire = session_wire(frame.fields.get("wire"))
        hidden = frame.tensors[0]
        check_hidden(blocks, hidden)
        tokens = hidden.shape[0] * hidden.shape[1]
        if not 1 <= hidden.shape[0] <= server.cfg.max_batch or tokens > server.cfg.max_stateless_tokens:
            raise ValueError(
                f"a {kind} pass takes batch 1 to {server.cfg.max_batch} and {server.cfg.max_stateless_tokens} "
                f"tokens here, got {list(hidden.shape[:2])}; split it"
            )
        server.check_context(hidden.shape[1], f"a {kind} pass of length")
        base = 1 if kind == "forward" else 2
        if kind == "backward" and not frame.tensors[1].is_floating_point():
            raise ValueError(f"grad_output must be floating point, got {frame.tensors[1].dtype}")
        tensors, spec = await server.adapters.resolve(peer, frame, base, blocks)
        if kind == "backward" and tensors and frame.grant is not None:
            # the reply carries the adapter's float32 gradients, which the request (naming the
            # adapter by digest) need not: count them with the frame until the reply is written
            frame.grant.grow(sum(4 * t.numel() for t in tensors.values()))
        # the client keeps its side open until the reply: an end or a reset means nobody waits
        watcher = asyncio.create_task(_watch_for_end(stream, stop))
        check = _between_blocks(server, stop)
        if kind == "forward":
            output = await server.compute(run_forward, blocks, hidden, tensors, spec, check, peer=peer, kind="pass")
            outputs = [await pack_off_loop(output, wire)]
            reply = Frame("result", {}, outputs)
        else:
            grad_input, grads = await server.compute(
                run_backward, blocks, hidden, frame.tensors[1], tensors, spec, check, peer=peer, kind="pass"
            )
            outputs = [await pack_off_loop(grad_input, wire), *grads.values()]
            reply = Frame("result", {"names": list(grads)}, outputs)
        # signed (swarm.p2p.evidence), with the precision it was computed in: a lie in it is
        # evidence anyone can check
        precision = (server.cfg.dtype, quantization(server.blocks))
        digest = await asyncio.to_thread(
            pass_digest, server.model, kind, frame["start"], frame["end"], wire, frame.fields.get("adapter"),
            frame.tensors[:base], [unpack(t) for t in outputs], precision)
        reply.fields.update(sig=server.host.sign(digest), prec=list(precision))
        server.served(hidden.shape[0] * hidden.shape[1])  # computed: hidden was [batch, seq, hidden]
        await write_frame(stream, reply, timeout=server.cfg.request_timeout)
    except StepCancelled:
        log.info("%s request from %s abandoned by its client: stopped", kind, peer[-8:])
    except WireError as exc:
        await server.reply_error(stream, exc, exc.code)
    except FrameBudgetError as exc:
        await server.reply_error(stream, exc, BUSY)
    except (ValueError, TypeError) as exc:
        await server.reply_error(stream, exc, BAD_REQUEST)
    except (RuntimeError, MemoryError) as exc:  # our own failure: the client goes elsewhere
        log.exception("%s request from %s failed", kind, peer[-8:])
        await server.reply_error(stream, exc, SERVER_ERROR)
    except (P2PTimeoutError, StreamClosedError) as exc:
        log.info("%s request from %s ended early: %s", kind, peer[-8:], exc)
    finally:
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        if frame is not None:
            frame.release()


def _between_blocks(server: BlockServer, stop: threading.Event):
    """What a pass checks before each block's forward and backward: the inference steps waiting
    run first (interactive first, even inside a long pass), then whether anyone still waits."""

    def check() -> bool:
        server.queue.between(suspended)
        return stop.is_set()

    return check


async def _watch_for_end(stream, stop: threading.Event) -> None:
    """Set ``stop`` when the peer sends anything more, ends its side or resets the stream."""
    try:
        await stream.read(1)
    except P2PError:
        pass
    stop.set()
