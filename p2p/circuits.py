"""Circuit relay v2 on a host's libp2p thread: relaying for others within bounds, reservations on
relays for a host nobody can dial, and dialing a peer through a relay.

py-libp2p 0.8.1 has the protocol (``libp2p.relay.circuit_v2``) but dials ``/p2p-circuit``
addresses only through its transport's own ``dial``: :meth:`Circuits.dial` does that for
:meth:`Host._dial <swarm.p2p.host.Host._dial>`. Everything here runs on the trio thread.

Bounds (:func:`relay_limits`, from ``--relay-slots``): reservations held for others (the slots),
relayed connections at once (:data:`CIRCUITS_PER_SLOT` per slot in all, :data:`PEER_CIRCUITS`
opened by one peer), and for each relayed connection a duration and a byte budget; the relay ends a connection past either (its two ends
fail over like on any broken link). A reservation is for the peer asking on its own connection
only (py-libp2p's takes any peer id the request names, so anyone could fill the slots with made-up
ones), a host accepts relayed connections only through relays it holds a reservation on, and each
relayed connection closes its own streams when it ends (py-libp2p's registry keeps
one per peer, so a second connection to the same server was cut when the first ended).

Reservations are renewed by their holder (:meth:`Circuits.reserve` again, see
:func:`swarm.p2p.nat.hold_relays`), not by py-libp2p's refresh worker, which renews every relay
ever reserved on, and spins when one has gone. A private swarm's key protects relayed connections
too (py-libp2p's dial through a relay skips it).
"""

from __future__ import annotations

import logging

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol  # noqa: F401  (the host runs it)
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport

from swarm.p2p.private import protected_conn

log = logging.getLogger("swarm.relay")

RELAY_SLOTS = 16  # default --relay-slots: reservations held for others at once
CIRCUITS_PER_SLOT = 4  # relayed connections carried at once, in all: this many per slot
PEER_CIRCUITS = 8  # ... opened by one peer
CIRCUIT_SECONDS = 2 * 3600  # a relayed connection lasts at most this long
CIRCUIT_BYTES = 4 << 30  # ... and carries at most this many bytes, both ways together
DCUTR_DIAL_TIMEOUT = 3  # seconds of each dial of a hole punch (py-libp2p's 10 s first try costs that much)
HOLE_PUNCH_WAIT = 10.0  # seconds a new relayed connection may take to become direct before it is used as it is
RESERVATION_SECONDS = 120  # a reservation's life: its holder renews it every few seconds (p2p/nat.py), one left behind lapses soon


def relay_limits(slots: int) -> RelayLimits:
    # relayed connections to one reserved peer: as many as in all (a peer's own cap, PEER_CIRCUITS,
    # is lower, so one peer alone cannot take a server's relayed connections)
    return RelayLimits(duration=CIRCUIT_SECONDS, data=CIRCUIT_BYTES, max_circuit_conns=slots * CIRCUITS_PER_SLOT,
                       max_reservations=slots, reservation_ttl=RESERVATION_SECONDS)


def is_circuit(addr) -> bool:
    return "/p2p-circuit" in str(addr)


def dial_allowance(addrs) -> float:
    """Seconds a first dial of a server at ``addrs`` may take beyond a direct one's: through a
    relay, it may also try to become direct (:data:`HOLE_PUNCH_WAIT`, and the relay's own dial)."""
    return HOLE_PUNCH_WAIT + 5 if any(is_circuit(a) for a in addrs) else 0.0


def circuit_addr(relay_addr: str, relay_id: str, peer_id: str) -> str:
    """The address at which ``peer_id`` is reached through the relay ``relay_id`` at ``relay_addr``
    (a direct address of the relay, with or without its ``/p2p/`` part). Pure."""
    base = relay_addr.split("/p2p/", 1)[0]
    return f"{base}/p2p/{relay_id}/p2p-circuit/p2p/{peer_id}"


class _NoRegistry(dict):
    """``CircuitV2Protocol._active_relays`` that keeps nothing: each circuit closes its own streams."""

    def __setitem__(self, key, value) -> None:
        pass


class RelayProtocol(CircuitV2Protocol):
    """py-libp2p's relay with the fixes of the module's docstring, and caps on the relayed
    connections it carries at once: ``max_total`` in all, :data:`PEER_CIRCUITS` opened by one peer."""

    def __init__(self, *args, max_total: int = RELAY_SLOTS * CIRCUITS_PER_SLOT, **kwargs):
        super().__init__(*args, **kwargs)
        self._active_relays = _NoRegistry()
        self.max_total = max_total
        self.open_circuits = 0
        self.opened_by: dict[ID, int] = {}

    async def _handle_connect(self, stream, msg) -> None:
        source = stream.muxed_conn.peer_id
        if self.open_circuits >= self.max_total or self.opened_by.get(source, 0) >= PEER_CIRCUITS:
            await self._send_status(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED,
                                    "this relay carries as many relayed connections as it may")
            await stream.reset()
            return
        self.open_circuits += 1
        self.opened_by[source] = self.opened_by.get(source, 0) + 1
        try:
            await super()._handle_connect(stream, msg)
        finally:
            self.open_circuits -= 1
            self.opened_by[source] -= 1
            if not self.opened_by[source]:
                del self.opened_by[source]

    accepts_from = staticmethod(lambda peer: True)  # set by Circuits: the relays this host holds reservations on

    async def _handle_stop_stream(self, stream) -> None:
        if not self.accepts_from(stream.muxed_conn.peer_id):  # a connection relayed by a peer it never asked
            await stream.reset()
            return
        await super()._handle_stop_stream(stream)

    async def _handle_reserve(self, stream, msg) -> None:
        msg.ClearField("peer")  # the reservation is for the connection's own peer
        await super()._handle_reserve(stream, msg)

    async def _relay_data(self, src_stream, dst_stream, peer_id, *args, **kwargs) -> None:
        try:
            await super()._relay_data(src_stream, dst_stream, peer_id, *args, **kwargs)
        finally:
            await self._close_stream(src_stream)
            await self._close_stream(dst_stream)


class Circuits:
    """A host's relay service and transport (see the module's docstring). ``slots`` 0: this host
    relays for nobody (it still accepts connections relayed to it, and dials through relays)."""

    def __init__(self, lp, slots: int, psk: str | None = None):
        self.slots, self.psk = slots, psk
        self.protocol = RelayProtocol(lp, limits=relay_limits(max(1, slots)), allow_hop=slots > 0,
                                      max_total=max(1, slots) * CIRCUITS_PER_SLOT)
        # STOP only: a dial through a relay never reserves a slot there for the dialer
        self.transport = CircuitV2Transport(lp, self.protocol, RelayConfig(roles=RelayRole.STOP))
        self.transport._refreshing = True  # its refresh worker never starts: holders renew (see above)
        # relayed connections come only through relays this host holds a reservation on
        self.protocol.accepts_from = lambda peer: peer in self.transport._reservations
        self.lp = lp
        self.nursery: trio.Nursery | None = None  # where reservations are renewed (set by the host)

    async def dial(self, addr: multiaddr.Multiaddr, peer: ID) -> None:
        """Connect to ``peer`` through the relay in ``addr`` (``.../p2p/RELAY/p2p-circuit[/p2p/PEER]``)."""
        if not str(addr).endswith(f"/p2p/{peer}"):
            addr = multiaddr.Multiaddr(f"{addr}/p2p/{peer}")
        relay_addr, dest = self.transport.parse_circuit_ma(addr)
        relay = ID.from_base58(relay_addr.get_peer_id())
        raw = await self.transport.dial_peer_info(dest_info=PeerInfo(dest, [addr]), relay_info=PeerInfo(relay, [relay_addr]))
        if self.psk is not None:  # as the swarm protects a direct dial (the other end protects it on accepting)
            raw = protected_conn(raw, self.psk)
        await self.lp.upgrade_outbound_connection(raw, dest)

    def release(self, relay: ID) -> None:
        """Stop holding a reservation on ``relay`` (it lapses there)."""
        self.transport._reservations.pop(relay, None)
        self.transport._reservation_proofs.pop(relay, None)

    async def reserve(self, relay: ID) -> bool:
        """A reservation on ``relay`` (connected already; again to renew it); whether the relay granted it."""
        stream = await self.lp.new_stream(relay, [HOP_PROTOCOL])
        try:
            return await self.transport.reserve(stream, relay, self.nursery)
        finally:
            try:
                await stream.close()
            except Exception:
                pass

    async def close_relayed(self, peer: ID) -> None:
        """Close the relayed connections to ``peer`` (a direct one exists)."""
        for conn in list(self.lp.get_network().get_connections(peer)):
            if _is_relayed(conn):
                try:
                    await conn.close()
                except Exception as exc:
                    log.debug("closing a relayed connection to %s: %r", peer, exc)

    def relayed(self, peer: ID) -> bool:
        """Whether every connection to ``peer`` goes through a relay (False: one is direct, or none)."""
        conns = self.lp.get_network().get_connections(peer)
        return bool(conns) and all(_is_relayed(c) for c in conns)


def _is_relayed(conn) -> bool:
    try:
        return any(is_circuit(a) for a in conn.get_transport_addresses())
    except Exception:
        return False
