"""Circuit relay v2 on a host's libp2p thread: relaying for others within bounds, reservations on
relays for a host nobody can dial, and dialing a peer through a relay.

py-libp2p 0.8.1 has the protocol (``libp2p.relay.circuit_v2``) but dials ``/p2p-circuit``
addresses only through its transport's own ``dial``: :meth:`Circuits.dial` does that for
:meth:`Host._dial <swarm.p2p.host.Host._dial>`. Everything here runs on the trio thread.

Bounds (:func:`relay_limits`, from ``--relay-slots``): reservations held for others and relayed
connections at once (each the slots), and for each relayed connection a duration and a byte
budget; the relay ends a connection past either (its two ends fail over like on any broken link).
"""

from __future__ import annotations

import logging

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport

log = logging.getLogger("swarm.relay")

RELAY_SLOTS = 16  # default --relay-slots: reservations and relayed connections held for others at once
CIRCUIT_SECONDS = 2 * 3600  # a relayed connection lasts at most this long
CIRCUIT_BYTES = 4 << 30  # ... and carries at most this many bytes, both ways together
RESERVATION_SECONDS = 3600  # a reservation's life; the peer renews it before it ends


def relay_limits(slots: int) -> RelayLimits:
    return RelayLimits(duration=CIRCUIT_SECONDS, data=CIRCUIT_BYTES, max_circuit_conns=slots,
                       max_reservations=slots, reservation_ttl=RESERVATION_SECONDS)


def is_circuit(addr) -> bool:
    return "/p2p-circuit" in str(addr)


def circuit_addr(relay_addr: str, relay_id: str, peer_id: str) -> str:
    """The address at which ``peer_id`` is reached through the relay ``relay_id`` at ``relay_addr``
    (a direct address of the relay, with or without its ``/p2p/`` part). Pure."""
    base = relay_addr.split("/p2p/", 1)[0]
    return f"{base}/p2p/{relay_id}/p2p-circuit/p2p/{peer_id}"


class Circuits:
    """A host's relay service and transport (see the module's docstring). ``slots`` 0: this host
    relays for nobody (it still accepts connections relayed to it, and dials through relays)."""

    def __init__(self, lp, slots: int):
        self.slots = slots
        self.protocol = CircuitV2Protocol(lp, limits=relay_limits(max(1, slots)), allow_hop=slots > 0)
        # STOP only: a dial through a relay never reserves a slot there for the dialer
        self.transport = CircuitV2Transport(lp, self.protocol, RelayConfig(roles=RelayRole.STOP))
        self.lp = lp
        self.nursery: trio.Nursery | None = None  # where reservations are renewed (set by the host)

    async def dial(self, addr: multiaddr.Multiaddr, peer: ID) -> None:
        """Connect to ``peer`` through the relay in ``addr`` (``.../p2p/RELAY/p2p-circuit[/p2p/PEER]``)."""
        if not str(addr).endswith(f"/p2p/{peer}"):
            addr = multiaddr.Multiaddr(f"{addr}/p2p/{peer}")
        await self.transport.dial(addr)

    async def reserve(self, relay: ID) -> bool:
        """A reservation on ``relay`` (connected already), renewed before it ends; whether the relay granted it."""
        stream = await self.lp.new_stream(relay, [HOP_PROTOCOL])
        try:
            return await self.transport.reserve(stream, relay, self.nursery)
        finally:
            try:
                await stream.close()
            except Exception:
                pass

    def relayed(self, peer: ID) -> bool:
        """Whether every connection to ``peer`` goes through a relay (False: one is direct, or none)."""
        conns = self.lp.get_network().get_connections(peer)
        return bool(conns) and all(_is_relayed(c) for c in conns)


def _is_relayed(conn) -> bool:
    try:
        return any(is_circuit(a) for a in conn.get_transport_addresses())
    except Exception:
        return False
