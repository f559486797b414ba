"""A py-libp2p host on its own trio thread, used from asyncio.

The host speaks TCP only, secured with Noise only (a default py-libp2p host also accepts plaintext,
TLS and secio: we refuse them) and multiplexed with yamux only (mplex, QUIC and TLS are 3-10x
slower). mDNS, UPnP, bootstrap, AutoTLS and metrics are off. Gossipsub carries announcements.

Everything here is awaited on the asyncio loop that called :meth:`Host.start`; the libp2p work runs
on the trio thread of :mod:`swarm.p2p.bridge`, and stream handlers are called back on that asyncio
loop. Errors are :class:`P2PError` subclasses that name the peer and protocol:

* :class:`PeerUnreachableError` — a dial failed, was refused (e.g. the peer offers no Noise) or
  timed out, or the peer does not speak the protocol;
* :class:`StreamClosedError` — end of stream or reset while reading or writing. A killed peer looks
  like a clean end of stream in libp2p, so do not read EOF as "the peer finished on purpose";
* :class:`P2PTimeoutError` — an operation exceeded its timeout; the trio-side work was cancelled.
  A frozen peer makes reads hang forever, so every network wait here takes a timeout.

New connections cost ~250 ms (a fixed happy-eyeballs delay in py-libp2p): keep them and open
streams (~1.5 ms) on them. Close streams: yamux allows 256 open outbound streams per connection,
and open_stream then waits (until its timeout) for one to close.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import multiaddr
import trio
from libp2p import generate_new_ed25519_identity, new_host
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.exceptions import StreamFailure
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from swarm.p2p.bridge import P2PError, P2PTimeoutError, TrioThread
from swarm.p2p.circuits import DCUTR_DIAL_TIMEOUT, HOLE_PUNCH_WAIT, Circuits, DCUtRProtocol, is_circuit
from swarm.p2p.gossip import OUTBOUND_QUEUE, Subscription, _Pubsub  # noqa: F401  (OUTBOUND_QUEUE: part of this module's API)
from swarm.p2p.host_bounds import STREAM_BUFFER_LIMIT, bound_connections
from swarm.p2p.identity import Identity, IdentityInUseError, claim_identity, load_or_create_identity
from swarm.p2p.private import install as install_protector
from swarm.p2p.private import private_swarm_reason
from swarm.p2p.streams import (
    CLOSE_TIMEOUT,
    FrameStalledError,
    Message,
    MessageTooLargeError,
    Stream,
    StreamClosedError,
    _quietly,
)

__all__ = ["DialTimeoutError", "Host", "P2PError", "P2PTimeoutError", "PeerUnreachableError"]
__all__ += ["FrameStalledError", "IdentityInUseError", "Message", "MessageTooLargeError", "Stream"]
__all__ += ["StreamClosedError", "Subscription"]
__all__ += ["STREAM_BUFFER_LIMIT", "load_or_create_identity"]

log = logging.getLogger(__name__)
install_protector()  # private swarms: our protector for every connection of a host with a key (p2p/private.py)
if not os.environ.get("LIBP2P_DEBUG"):  # py-libp2p's own switch for verbose logs
    # py-libp2p logs expected failures (a dial to a peer that just died) at ERROR; every failure
    # reaches our callers as an exception with the peer and protocol named, so keep it quiet
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    logging.getLogger("multiaddr").setLevel(logging.WARNING)

PING_PROTOCOL = "/ipfs/ping/1.0.0"  # every py-libp2p host answers it
PING_BYTES = 32
START_TIMEOUT = 30.0
HEARTBEAT_S = 1  # gossipsub heartbeat: meshes form within a second or two on loopback

# py-libp2p's yamux sends a window update after every read by default, so each message costs a
# second one back (sent before the read returns, handled by the sender's thread). Go-yamux's rule
# instead: an update once half the window is consumed. Measured here: a 1 KB frame's write call
# takes 0.23 ms instead of 0.5 ms. Read when yamux reads, so a user's own setting still wins.
os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")
MAX_ADDRS = 16  # addresses remembered per peer
SUBSCRIPTION_QUEUE = 4096  # messages a subscription holds unread before it drops new ones
MAX_PUBLISH_BYTES = (1 << 20) - (16 << 10)  # pubsub drops RPCs over 1 MiB; leave room for signature etc.


class PeerUnreachableError(P2PError):
    """A dial failed, was refused or timed out, or the peer does not speak the protocol."""


class DialTimeoutError(PeerUnreachableError, P2PTimeoutError):
    """A dial (or stream negotiation) timed out: both unreachable and a timeout."""


def _check_port_free(listen_host: str, port: int) -> None:
    """py-libp2p listens with SO_REUSEPORT, so a second host on a taken port starts "fine" and the
    kernel splits incoming connections between the two. Refuse that: bind a plain socket first."""
    family = socket.AF_INET6 if ":" in listen_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
        try:
            probe.bind((listen_host, port))
        except OSError as exc:
            msg = f"cannot listen on {listen_host}:{port}: {exc.strerror} (is another host running?)"
            raise P2PError(msg) from None


def _peer(peer_id: str) -> ID:
    try:
        return ID.from_base58(peer_id)
    except Exception as exc:
        raise PeerUnreachableError(f"{peer_id!r} is not a base58 peer id: {exc}") from None


async def _close_connections(lp) -> None:
    """Close every connection before the host stops. py-libp2p's own shutdown closes them only
    while being cancelled, i.e. not at all: peers would keep a dead connection open until our
    sockets got garbage-collected. All at once, since yamux's close sleeps 0.1 s per connection."""

    async def close(conn) -> None:
        try:
            await conn.close()
        except Exception as exc:
            log.debug("closing %r: %r", conn, exc)

    with trio.move_on_after(CLOSE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for conns in list(lp.get_network().connections.values()):
                for conn in list(conns):
                    nursery.start_soon(close, conn)
        await lp.close()


async def _no_auto_connect() -> None:
    return None


class Host:
    """A libp2p host (Noise, yamux, TCP, gossipsub) on a trio thread; see the module docstring."""

    peer_id: str
    addrs: list[str]

    def __init__(self, identity: Identity, listen: multiaddr.Multiaddr, psk: str | None = None, relay_slots: int = 0,
                 hole_punch: bool = True):
        """Use :meth:`start`."""
        self._hole_punch = hole_punch
        self._psk = psk
        self._relay_slots = relay_slots
        self._circuits: Circuits | None = None  # trio side: relaying, reservations, relayed dials
        self._dcutr = None  # trio side: hole punching (DCUtR)
        self._identity = identity
        self._key_pair = identity.key_pair
        self._listen = listen
        self.peer_id = identity.peer_id
        # this run of the peer id: its start time, then random bits, so that a later run of the
        # same key sorts after an earlier one (announcements carry it: see swarm.p2p.table)
        self.instance = f"{time.time_ns():016x}{secrets.token_hex(4)}"
        self.addrs = []
        self._bridge = TrioThread(name=f"libp2p-{self.peer_id[-6:]}")
        self._subs: dict[str, set[Subscription]] = {}
        # trio side only:
        self._lp = None
        self._pubsub: _Pubsub | None = None
        self._addr_book: dict[ID, list[multiaddr.Multiaddr]] = {}  # the order in which dials try them
        self._dialing: dict[ID, trio.Lock] = {}

    @classmethod
    async def start(
        cls, *, listen_host: str = "127.0.0.1", port: int = 0, identity: Path | Identity | None = None,
        swarm_key: bytes | None = None, relay_slots: int = 0, hole_punch: bool = True,
    ) -> Host:
        """Start a host listening on ``listen_host:port`` (0 picks a free port) and return once it
        listens. ``identity`` is a key file, claimed for the host's lifetime (see
        :func:`~swarm.p2p.identity.claim_identity`), or an :class:`Identity` claimed already (the
        host releases it when it closes or fails to start); None means a fresh random key.
        Raises P2PError if the host cannot start (e.g. the port is taken), IdentityInUseError (a
        P2PError) if another process holds the key file. ``swarm_key``: a private swarm's key (see
        :mod:`swarm.p2p.private`): only peers holding it can connect. ``relay_slots``: peers this host
        relays for at once (0: none; see :mod:`swarm.p2p.circuits`). ``hole_punch``: try to make each
        relayed connection this host dials direct (it must listen on an address its NAT maps:
        ``listen_host`` 0.0.0.0 or its own, not loopback)."""
        ip = "ip6" if ":" in listen_host else "ip4"
        try:
            listen = multiaddr.Multiaddr(f"/{ip}/{listen_host}/tcp/{port}")
        except Exception as exc:
            raise P2PError(f"cannot listen on {listen_host!r} port {port}: {exc}") from None
        if port:
            _check_port_free(listen_host, port)
        if identity is None:
            identity = Identity(generate_new_ed25519_identity())
        elif not isinstance(identity, Identity):
            identity = claim_identity(identity)
        self = cls(identity, listen, swarm_key.hex() if swarm_key is not None else None, relay_slots, hole_punch)
        try:
            self.addrs = await self._bridge.start(self._services, timeout=START_TIMEOUT)
        except BaseException as exc:
            identity.release()
            if isinstance(exc, Exception) and not isinstance(exc, P2PError):
                raise P2PError(f"cannot start a libp2p host on {self._listen}: {type(exc).__name__}: {exc}") from exc
            raise
        return self

    @asynccontextmanager
    async def _services(self):
        # trio side: build and run the host, pubsub and gossipsub; yield our full listen addresses
        noise = NoiseTransport(self._key_pair, noise_privkey=create_x25519_key_pair().private_key)
        lp = new_host(
            key_pair=self._key_pair,
            sec_opt={NOISE_PROTOCOL_ID: noise},  # only Noise: no plaintext, TLS or secio
            muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
            listen_addrs=[self._listen],
            enable_mDNS=False,
            enable_upnp=False,
            enable_autotls=False,
            enable_metrics=False,
            bootstrap=None,
            psk=self._psk,  # a private swarm's key: connections are encrypted with it below Noise (p2p/private.py)
        )
        # The auto-connector dials every peer in the peerstore that has a public address while we
        # hold under 150 connections, and a failed dial blocks explicit dials to that peer for 60 s:
        # we dial only when asked to.
        lp.get_network().auto_connector.maybe_connect = _no_auto_connect
        bound_connections(lp.get_network())
        gossipsub = GossipSub(
            protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID],
            degree=6,
            degree_low=4,
            degree_high=12,
            heartbeat_initial_delay=0.1,
            heartbeat_interval=HEARTBEAT_S,
            # "Adaptive" gossip stretches the heartbeat to 30-60 s when it deems the network unhealthy;
            # spam protection drops >10 msg/s per peer and topic (own publishes included); eclipse
            # protection wants 3 distinct IPs, which loopback and small swarms never have.
            adaptive_gossip_enabled=False,
            spam_protection_enabled=False,
            eclipse_protection_enabled=False,
        )
        pubsub = _Pubsub(lp, gossipsub, on_message=self._on_message)
        circuits = Circuits(lp, self._relay_slots, self._psk)
        dcutr = DCUtRProtocol(lp, dial_timeout=DCUTR_DIAL_TIMEOUT)  # relayed connections made direct where NATs allow
        try:
            async with lp.run(listen_addrs=[self._listen]):
                async with background_trio_service(pubsub), background_trio_service(gossipsub), \
                        background_trio_service(circuits.protocol), background_trio_service(dcutr), \
                        trio.open_nursery() as nursery:
                    await pubsub.wait_until_ready()
                    circuits.nursery = nursery
                    self._lp, self._pubsub, self._circuits, self._dcutr = lp, pubsub, circuits, dcutr
                    self._my_id_bytes = lp.get_id().to_bytes()
                    yield [str(a) for a in lp.get_addrs()]
                    nursery.cancel_scope.cancel()  # reservations' renewals
                await _close_connections(lp)
        finally:
            pubsub.seen_messages.stop()  # its sweeper thread would outlive the host

    async def close(self) -> None:
        """Stop the host and join its thread; pending calls get P2PError. Idempotent."""
        for subs in self._subs.values():
            for sub in subs:
                sub._end()
        self._subs.clear()
        try:
            await self._bridge.close()
        finally:
            self._identity.release()  # the key file is free for another process

    # ---- connections and streams ------------------------------------------------------------

    def set_stream_handler(self, protocol: str, handler: Callable[[Stream], Awaitable[None]]) -> None:
        """Serve ``protocol``: each incoming stream runs ``await handler(stream)`` on this host's
        asyncio loop. The stream is closed when the handler returns and reset if it raises; the
        exception is logged (a P2PError briefly, others with their traceback), never fatal to the host."""

        async def on_stream(net_stream) -> None:  # trio side, one task per stream
            stream = Stream(self._bridge, net_stream, protocol)
            try:
                ok = await self._bridge.run_in_asyncio(self._run_handler(handler, stream))
            except P2PError:
                ok = False
            if not stream._finished:
                stream._finished = True
                await _quietly(net_stream.close if ok else net_stream.reset)

        self._bridge.run_soon(self._lp.set_stream_handler, TProtocol(protocol), on_stream)

    @staticmethod
    async def _run_handler(handler, stream: Stream) -> bool:
        try:
            await handler(stream)
            return True
        except P2PError as exc:
            log.info("handler for %s from %s ended: %s", stream.protocol, stream.remote_peer_id, exc)
        except Exception:
            log.exception("handler for %s from %s failed", stream.protocol, stream.remote_peer_id)
        return False

    async def connect(self, maddr: str, timeout: float = 10.0) -> str:
        """Connect to the peer at a full multiaddr (``.../p2p/<id>``) and return its peer id. Its
        addresses are remembered for :meth:`open_stream`. PeerUnreachableError on failure or timeout."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(maddr))
        except Exception as exc:
            raise PeerUnreachableError(f"cannot dial {maddr!r}: not a multiaddr ending in /p2p/<id> ({exc})") from None
        peer = info.peer_id.to_base58()
        try:
            await self._bridge.call(self._dial, info.peer_id, info.addrs, timeout=timeout, what=f"connect to {maddr}")
        except P2PTimeoutError as exc:
            raise DialTimeoutError(str(exc)) from None
        return peer

    def add_addrs(self, peer_id: str, addrs: list[str]) -> None:
        """Remember addresses of ``peer_id`` (e.g. from announcements) so open_stream can dial it.
        Addresses that do not parse are skipped."""
        pid = _peer(peer_id)
        parsed = []
        for a in addrs:
            try:
                m = multiaddr.Multiaddr(a)
                if m.get_peer_id() is not None:  # keep the transport part only
                    m = m.decapsulate(multiaddr.Multiaddr(f"/p2p/{m.get_peer_id()}"))
                parsed.append(m)
            except Exception as exc:
                log.debug("skipping address %r of %s: %s", a, peer_id, exc)
        if parsed:
            self._bridge.run_soon(self._remember, pid, parsed)

    async def open_stream(self, peer_id: str, protocol: str, timeout: float = 10.0) -> Stream:
        """A new stream to ``peer_id`` speaking ``protocol``, on the existing connection if there is
        one, else dialing the addresses we know. PeerUnreachableError if the peer cannot be reached
        (or does not speak ``protocol``) within ``timeout``."""
        pid = _peer(peer_id)
        try:
            ns = await self._bridge.call(
                self._new_stream,
                pid,
                protocol,
                timeout=timeout,
                what=f"open {protocol} to {peer_id}",
                orphan=lambda ns: self._bridge.spawn(_quietly, ns.reset),
            )
        except P2PTimeoutError as exc:
            raise DialTimeoutError(str(exc)) from None
        return Stream(self._bridge, ns, protocol)

    async def on_libp2p_thread(self, fn: Callable[..., Awaitable[object]], *args, what: str):
        """Run ``await fn(*args)`` on the host's trio thread (trio code using the ``*_here``
        methods of streams and hosts) and return its result; no timeout of its own (``fn`` bounds
        its waits), cancelled with the calling task."""
        return await self._bridge.call(fn, *args, timeout=None, what=what)

    def start_here(self, fn: Callable[..., Awaitable[object]], *args) -> bool:
        """On the trio thread: a background task owned by the host (see :meth:`TrioThread.start_here`)."""
        return self._bridge.start_here(fn, *args)

    def run_here_soon(self, fn: Callable[..., object], *args) -> None:
        """From the asyncio side: ``fn(*args)`` (synchronous) soon on the trio thread."""
        self._bridge.run_soon(fn, *args)

    async def open_stream_here(self, peer_id: str, protocol: str) -> Stream:
        """:meth:`open_stream` on the trio thread (the caller bounds the wait)."""
        return Stream(self._bridge, await self._new_stream(_peer(peer_id), protocol), protocol)

    async def dial_back(self, peer_id: str, addr: str, timeout: float) -> None:
        """Open a new connection to ``peer_id`` at ``addr`` (not reusing one we have) and close it
        again: whether the peer can be reached there. P2PError when it cannot."""
        try:
            maddr = multiaddr.Multiaddr(addr)
        except Exception as exc:
            raise PeerUnreachableError(f"not a multiaddr: {addr!r} ({exc})") from None
        await self._bridge.call(self._dial_back, _peer(peer_id), maddr, timeout=timeout, what=f"dial back {addr}")

    async def _punch(self, peer: ID) -> None:
        """Right after a relayed connection, before any stream uses it: try to make it direct
        (DCUtR, within :data:`~swarm.p2p.circuits.HOLE_PUNCH_WAIT` seconds); once a direct
        connection exists, the relayed one closes, so every stream takes the direct one."""
        with trio.move_on_after(HOLE_PUNCH_WAIT):
            try:
                if await self._dcutr.initiate_hole_punch(peer):
                    await self._circuits.close_relayed(peer)
                    log.info("connection to %s made direct (hole punching)", peer)
                    return
            except Exception as exc:  # the relayed connection stays
                log.debug("hole punch to %s failed: %r", peer, exc)
        log.info("connection to %s stays relayed (no hole punch through these NATs)", peer)

    async def _dial_back(self, peer: ID, addr: multiaddr.Multiaddr) -> None:
        try:
            conn = await self._lp.get_network().dial_addr(addr, peer)
        except Exception as exc:
            raise PeerUnreachableError(f"cannot dial {addr}: {exc}") from None
        await conn.close()

    async def reserve(self, relay_id: str, timeout: float = 10.0) -> bool:
        """A reservation on the relay ``relay_id`` (dialed at the addresses known for it): peers can
        then dial this host through it until it lapses (call again to renew it, before
        :data:`~swarm.p2p.circuits.RESERVATION_SECONDS`). Whether it was granted."""
        return await self._bridge.call(self._reserve, _peer(relay_id), timeout=timeout, what=f"reserve on {relay_id}")

    async def _reserve(self, relay: ID) -> bool:
        await self._dial(relay, [])
        try:
            return await self._circuits.reserve(relay)
        except Exception as exc:
            raise PeerUnreachableError(f"reservation on {relay}: {exc}") from None

    async def hole_punch(self, peer_id: str, timeout: float = 30.0) -> bool:
        """Try to replace a relayed connection to ``peer_id`` by a direct one (DCUtR: both peers
        dial each other at once from their listening ports, which most NATs let through); whether
        a direct connection exists after."""
        return await self._bridge.call(self._dcutr.initiate_hole_punch, _peer(peer_id), timeout=timeout,
                                       what=f"hole punch to {peer_id}")

    def release_relay(self, relay_id: str) -> None:
        """Stop renewing the reservation on ``relay_id`` (see :meth:`reserve`)."""
        self._bridge.run_soon(self._circuits.release, _peer(relay_id))

    def relayed(self, peer_id: str) -> bool:
        """Whether this host reaches ``peer_id`` only through relays now."""
        circuits = self._circuits
        return circuits is not None and circuits.relayed(_peer(peer_id))

    async def ping(self, peer_id: str, timeout: float = 5.0) -> float:
        """Round-trip time in seconds of one libp2p ping (32 bytes echoed on ``/ipfs/ping/1.0.0``),
        not counting the stream opening. Dials the peer if needed."""
        return await self._bridge.call(self._ping, _peer(peer_id), timeout=timeout, what=f"ping {peer_id}")

    def connected_peers(self) -> list[str]:
        """Peer ids with at least one open connection (a snapshot)."""
        connections = list(self._lp.get_network().connections.items())  # one C call: atomic under the GIL
        return [peer.to_base58() for peer, conns in connections if conns]

    # trio side
    def _remember(self, peer: ID, addrs: list[multiaddr.Multiaddr]) -> None:
        known = self._addr_book.setdefault(peer, [])
        known.extend(a for a in addrs if a not in known)
        if len(known) > MAX_ADDRS:  # keep the one that worked last (first) and the newest
            known[1:] = known[len(known) - MAX_ADDRS + 1 :]

    async def _dial(self, peer: ID, addrs: list[multiaddr.Multiaddr]) -> None:
        """Connect to ``peer`` unless connected: ``addrs`` first, then the other addresses we know
        of it, one at a time (each gets an equal share of the time left), until one works.

        py-libp2p's dial takes every address in its peerstore but tries only one per transport
        (the first TCP one), so a stale address (a restarted server's old port) would hide the
        live one: we hand it one address per dial. An address that worked is tried first next
        time; those that failed before it are forgotten (announcements bring them back if they
        are still current). libp2p's peerstore forgets addresses after 120 s, so the address book
        here is ours."""
        self._remember(peer, addrs)
        async with self._dialing.setdefault(peer, trio.Lock()):  # one dial per peer at a time
            network = self._lp.get_network()
            if network.connections.get(peer):
                return
            book = self._addr_book[peer]
            order = [*addrs, *(a for a in book if a not in addrs)]
            failed: list[multiaddr.Multiaddr] = []
            errors: list[str] = []
            for i, addr in enumerate(order):
                self._lp.get_peerstore().clear_addrs(peer)
                network.unblock_peer(peer)  # an explicit dial always tries, even right after a failed one
                share = max(0.0, trio.current_effective_deadline() - trio.current_time()) / (len(order) - i)
                with trio.move_on_after(share):
                    try:
                        if is_circuit(addr):  # through a relay: py-libp2p's dial leaves these out
                            await self._circuits.dial(addr, peer)
                            if self._hole_punch:
                                await self._punch(peer)
                        else:
                            await self._lp.connect(PeerInfo(peer, [addr]))
                        book[:] = [addr, *(a for a in book if a != addr and a not in failed)]
                        return
                    except Exception as exc:  # SwarmException, OSError, exception groups from the dialer
                        errors.append(f"{addr}: {private_swarm_reason(exc) or exc}")
                failed.append(addr)
                if len(errors) < len(failed):
                    errors.append(f"{addr}: no connection within {share:.1f} s")
            book[:] = [*(a for a in book if a not in failed), *failed]  # failed ones last next time
            raise PeerUnreachableError(f"cannot connect to {peer} at any of its addresses: {'; '.join(errors)}")

    async def _new_stream(self, peer: ID, protocol: str):
        if not self._lp.get_network().connections.get(peer):
            if not self._addr_book.get(peer):
                raise PeerUnreachableError(f"open {protocol} to {peer}: not connected and no known address")
            await self._dial(peer, self._addr_book[peer])
        try:
            return await self._lp.new_stream(peer, [TProtocol(protocol)])
        except StreamFailure as exc:
            # py-libp2p 0.8.1 sometimes fails the negotiation of a new stream right after another
            # stream on the same connection was reset (seen under load); one more try succeeds.
            # A peer that really does not speak the protocol fails the second try too.
            try:
                return await self._lp.new_stream(peer, [TProtocol(protocol)])
            except Exception:  # StreamFailure again, or SwarmException: the connection died meanwhile
                pass
            raise PeerUnreachableError(f"open {protocol} to {peer}: protocol negotiation failed ({exc})") from exc
        except Exception as exc:
            raise PeerUnreachableError(f"open {protocol} to {peer}: {type(exc).__name__}: {exc}") from exc

    async def _ping(self, peer: ID) -> float:
        ns = await self._new_stream(peer, PING_PROTOCOL)
        stream = Stream(self._bridge, ns, PING_PROTOCOL)
        try:
            payload = secrets.token_bytes(PING_BYTES)
            t0 = time.perf_counter()
            await stream._write(payload)
            echo = await stream._read_exactly(PING_BYTES)
            rtt = time.perf_counter() - t0
        finally:
            with trio.CancelScope(shield=True):
                await _quietly(ns.close)
        if echo != payload:
            raise P2PError(f"ping {peer}: the echo differs from what was sent")
        return rtt

    # ---- gossipsub --------------------------------------------------------------------------

    async def subscribe(self, topic: str, limit: int = SUBSCRIPTION_QUEUE) -> Subscription:
        """A new subscription to ``topic`` (holding at most ``limit`` messages unread). Every
        subscribed host relays the topic: in a line A–B–C, B must subscribe for A's messages to reach C."""
        sub = Subscription(self, topic, limit)
        first = topic not in self._subs
        self._subs.setdefault(topic, set()).add(sub)
        if first:
            try:
                await self._bridge.call(self._join, topic, timeout=10.0, what=f"subscribe to {topic!r}")
            except BaseException:
                sub._end()
                subs = self._subs.get(topic, set())
                subs.discard(sub)
                if not subs:
                    self._subs.pop(topic, None)
                raise
        return sub

    def sign(self, data: bytes) -> bytes:
        """``data`` signed with this host's key (its peer id's: anyone can check it, see
        :func:`swarm.p2p.evidence.signed_by`)."""
        return self._key_pair.private_key.sign(data)

    async def publish(self, topic: str, data: bytes, timeout: float = 10.0) -> None:
        """Publish ``data`` (< ~1 MiB, else ValueError) to ``topic``: best effort, like all gossip.
        Our own subscriptions do not receive it."""
        if len(data) > MAX_PUBLISH_BYTES:
            raise ValueError(f"a pubsub message holds at most {MAX_PUBLISH_BYTES} bytes, got {len(data)}")
        await self._bridge.call(self._pubsub.publish, topic, bytes(data), timeout=timeout, what=f"publish to {topic!r}")

    async def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.topic)
        if subs is None or sub not in subs:
            return
        subs.discard(sub)
        if not subs:
            del self._subs[sub.topic]
            try:
                await self._bridge.call(self._pubsub.unsubscribe, sub.topic, timeout=10.0, what=f"leave {sub.topic!r}")
            except P2PError as exc:  # the host is closing: nothing to leave
                log.debug("%s", exc)

    async def _join(self, topic: str) -> None:
        await self._pubsub.subscribe(topic)  # the returned channel stays unused: see _Pubsub

    def _on_message(self, msg) -> None:  # trio side
        if msg.from_id == self._my_id_bytes:
            return  # our own publish
        sender = ID(msg.from_id).to_base58()
        for topic in msg.topicIDs:
            self._bridge.to_asyncio(self._deliver, topic, sender, msg.data)

    def _deliver(self, topic: str, sender: str, data: bytes) -> None:  # asyncio side
        for sub in self._subs.get(topic, ()):
            if sub._queue.qsize() < (sub.limit or SUBSCRIPTION_QUEUE):  # a flood is dropped: gossip is best effort
                sub._queue.put_nowait((sender, data))
