"""Protocol ids and the request/response helper shared by servers and clients."""

from __future__ import annotations

from swarm.p2p.wire import DEFAULT_MAX_FRAME, Frame, read_frame, write_frame

INFO = "/swarm/info/1.0.0"
INFERENCE = "/swarm/inference/1.0.0"
PUSH = "/swarm/push/1.0.0"  # a server hands a step's output to the next server of the chain
FORWARD = "/swarm/forward/1.0.0"
BACKWARD = "/swarm/backward/1.0.0"
PROBE = "/swarm/probe/1.0.0"  # a timed echo: how fast the link between two peers is
DIALBACK = "/swarm/dialback/1.0.0"  # dial me back at an address: can peers reach me there (p2p/nat.py)


async def request(host, peer_id: str, protocol: str, frame: Frame, timeout: float, max_frame: int = DEFAULT_MAX_FRAME) -> Frame:
    """Open a stream, send ``frame``, read one reply frame (of at most ``max_frame`` bytes), close.
    Every wait is bounded by ``timeout``; errors are the host's (PeerUnreachableError,
    StreamClosedError, P2PTimeoutError) or the wire's (WireError)."""
    stream = await host.open_stream(peer_id, protocol, timeout=timeout)
    try:
        await write_frame(stream, frame, timeout=timeout)
        return await read_frame(stream, timeout=timeout, max_frame=max_frame)
    finally:
        await stream.close()
