"""Reachability: can peers dial a server at the addresses it announces? And relays for one
that nobody can dial.

A server behind a NAT or firewall, or one given a wrong ``--announce-addr``, would otherwise be
"online" and useless: nobody can open a session with it. So a server asks peers it knows to dial
it back (the ``/swarm/dialback`` protocol): each opens a *new* connection to one announced
address (never reusing the one the request came on) and says whether it worked. An address
that some peer reached is public; one that every peer asked failed to reach is not (a one-line
warning names it, or ``--require-reachable`` refuses to serve); with no peer to ask (the first
server of a swarm), the answer is unknown and the server asks again when peers come.

A server nobody can dial (behind a NAT) holds reservations on :data:`RELAYS_WANTED` relays: servers
that offer to relay (``--relay-slots``, on by default; announced only while they are not known to
be unreachable themselves). It announces its ``/p2p-circuit`` addresses through them instead,
and is shown as relayed; py-libp2p renews each reservation before it ends, and every
:data:`RELAY_CHECK` seconds a relay that left the table is replaced by another. A relay that
dies mid-generation is a failed link like any other: the client fails over and replays.

A peer dials back only the IP address the request came from (so nobody can use the swarm to
make peers dial a third party; an address with another IP is answered "not reached", since the
requester's connections do not come from it), one address at a time per peer and a few in total, each within
:data:`DIALBACK_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Mapping

import multiaddr

from swarm.p2p import protocols
from swarm.p2p.circuits import circuit_addr, is_circuit
from swarm.p2p.host import P2PError, P2PTimeoutError, StreamClosedError
from swarm.p2p.table import ServerInfo
from swarm.p2p.wire import BAD_REQUEST, BUSY, Frame, RemoteError, WireError, expect, read_frame, write_frame

log = logging.getLogger("swarm.reach")

DIALBACK_TIMEOUT = 5.0  # seconds a peer tries to dial an address back
PEERS_ASKED = 3  # peers asked about each address at most (until one reaches it)
MAX_DIALBACKS = 4  # dial-backs this peer makes at once for all others together
RECHECK_UNKNOWN = 30.0  # seconds between checks while no peer could answer
RECHECK = 600.0  # seconds between checks otherwise (addresses and NATs change)
PEER_POLL = 1.0  # seconds between looks for a first peer to ask, while the answer is unknown
RELAYS_WANTED = 2  # relays a server nobody can dial holds reservations on
RELAY_CHECK = 10.0  # seconds between checks that those relays are still there


def address_ip(addr: str) -> str | None:
    """The IP address of an ``/ip4/.../tcp/...`` or ``/ip6/.../tcp/...`` multiaddr, else None. Pure."""
    try:
        parts = multiaddr.Multiaddr(addr)
        ip = parts.value_for_protocol("ip4")
    except Exception:
        try:
            ip = multiaddr.Multiaddr(addr).value_for_protocol("ip6")
        except Exception:
            return None
    try:
        multiaddr.Multiaddr(addr).value_for_protocol("tcp")
    except Exception:
        return None
    return ip


def may_dial_back(addr: str, observed_ip: str | None) -> str | None:
    """Why ``addr`` may not be dialed back for a peer whose connection comes from ``observed_ip``
    (None: it may). Pure."""
    if "/p2p-circuit" in addr:
        return "a relayed address cannot be dialed back"
    ip = address_ip(addr)
    if ip is None:
        return f"{addr!r} is not an /ip4 or /ip6 TCP address"
    if observed_ip is None or ip != observed_ip:
        return f"dial-back goes only to the address your connection comes from ({observed_ip}), not {ip}"
    return None


def announced_reach(direct: str, relays: int) -> str:
    """What a server announces of itself: ``direct`` (:func:`verdict` of its own addresses), or
    relayed/private for one nobody can dial, by whether it holds reservations. Pure."""
    if direct != "private":
        return direct
    return "relayed" if relays else "private"


def direct_addrs(info) -> list[str]:
    return [a for a in info.addrs if not is_circuit(a)]


def relay_candidates(servers: Mapping[str, ServerInfo], me: str, current: list[str]) -> list[str]:
    """Servers to hold reservations on, best first: the current relays still offering, then the
    others offering to relay with a direct address, those known to be reachable before those not
    known yet, in peer-id order. Pure."""
    offering = {
        p: s for p, s in servers.items()
        if p != me and s.relay and s.state != "offline" and s.reach in ("public", "unknown") and direct_addrs(s)
    }
    kept = [p for p in current if p in offering]
    rest = sorted((p for p in offering if p not in kept), key=lambda p: (offering[p].reach != "public", p))
    return kept + rest


def verdict(results: dict[str, bool | None]) -> str:
    """The server's reachability from each announced address's result (True: a peer reached it,
    False: every peer asked failed, None: no peer answered). Pure."""
    if any(r is True for r in results.values()):
        return "public"
    if results and all(r is False for r in results.values()):
        return "private"
    return "unknown"


async def handle_dialback(server, stream) -> None:
    """Dial the requester back at the address it names, on a new connection; answer whether it worked."""
    try:
        frame = await read_frame(stream, timeout=server.cfg.request_timeout, max_frame=1 << 12,
                                 frame_timeout=server.cfg.request_timeout)
        frame.release()
        if frame.kind != "dialback" or not isinstance(frame.fields.get("addr"), str):
            raise WireError(f"expected a dialback frame naming an address, got {frame.kind}", BAD_REQUEST)
        addr = frame["addr"][:256]
        if stream.relayed:  # its address is the relay's: this peer cannot tell where the asker is reached
            await write_frame(stream, Frame("dialback_reply", {"ok": False, "unknown": True, "error": "relayed"}),
                              timeout=server.cfg.request_timeout)
            return
        if server.dialbacks.locked():
            raise WireError(f"busy: {MAX_DIALBACKS} dial-backs in progress already", BUSY)
        observed = stream.remote_address
        why = may_dial_back(addr, observed[0] if observed else None)
        ok, error = False, why or ""
        if why is None:
            async with server.dialbacks:
                try:
                    await server.host.dial_back(stream.remote_peer_id, addr, DIALBACK_TIMEOUT)
                    ok = True
                except P2PError as exc:
                    error = str(exc)[:300]
        # a refusal is an answer too: an address the peer does not come from is not where it is reached
        reply = {"ok": ok, "error": error, "observed": observed[0] if observed else ""}
        await write_frame(stream, Frame("dialback_reply", reply), timeout=server.cfg.request_timeout)
    except WireError as exc:
        await server.reply_error(stream, exc, exc.code)
    except (P2PTimeoutError, StreamClosedError):
        pass


async def ask_dialback(host, peer_id: str, addr: str, timeout: float) -> bool | None:
    """Whether ``peer_id`` reached us at ``addr`` (None: it cannot tell, as when we reach it
    through a relay; RemoteError when it refused to try, P2PError when it did not answer)."""
    reply = await protocols.request(host, peer_id, protocols.DIALBACK, Frame("dialback", {"addr": addr}), timeout)
    if reply.kind == "error":
        raise RemoteError(reply.fields.get("message", "dial-back refused"), reply.fields.get("code", BAD_REQUEST))
    fields = expect(reply, "dialback_reply").fields
    return None if fields.get("unknown") is True else bool(fields["ok"])


async def check_addresses(host, addrs: list[str], peers: list[str], timeout: float) -> dict[str, bool | None]:
    """Each address's result (see :func:`verdict`), asking ``peers`` in turn (at most
    :data:`PEERS_ASKED` each) until one reaches it."""
    results: dict[str, bool | None] = {}
    for addr in addrs:
        result: bool | None = None
        for peer in peers[:PEERS_ASKED]:
            try:
                answer = await ask_dialback(host, peer, addr, timeout)
                if answer:
                    result = True
                    break
                if answer is False:
                    result = False
            except (P2PError, WireError, RemoteError) as exc:
                log.debug("dial-back of %s by %s: %s", addr, peer[-6:], exc)
        results[addr] = result
    return results


def peers_to_ask(server) -> list[str]:
    """Other servers of the table, online or joining, that this one does not reach through a relay
    only (they would see the relay's address), in random order (a different few each time)."""
    others = [p for p, s in server.table.snapshot().items()
              if p != server.host.peer_id and s.state != "offline" and not server.host.relayed(p)]
    random.shuffle(others)
    return others


async def check_reachability(server) -> str:
    """Ask peers to dial this server back at each of its own (direct) addresses; set and return
    ``server.direct_reach``, warning about each address no peer could reach."""
    peers = peers_to_ask(server)
    if not peers:
        server.direct_reach = "unknown"
        return server.direct_reach
    results = await check_addresses(server.host, list(server.direct_addrs), peers, DIALBACK_TIMEOUT + 5)
    server.direct_reach = verdict(results)
    for addr, result in results.items():
        if result is False:
            log.warning("no peer could dial this server at %s: it cannot serve there (behind a NAT or firewall, "
                        "or a wrong --announce-addr); a relay will carry its connections if one offers", addr)
    return server.direct_reach


async def hold_relays(server) -> None:
    """Reservations on :data:`RELAYS_WANTED` relays: those held are renewed (which also finds one
    that lost this server's connection), those gone are replaced, at most :data:`RELAYS_WANTED`
    new ones tried per call; the server's announced addresses become its circuit addresses."""
    servers = server.table.snapshot()
    me = server.host.peer_id
    held: dict[str, str] = {}
    tried = 0
    for relay in relay_candidates(servers, me, list(server.relays)):
        if len(held) >= RELAYS_WANTED or (relay not in server.relays and tried >= RELAYS_WANTED):
            break
        addrs = direct_addrs(servers[relay])
        server.host.add_addrs(relay, addrs)
        tried += relay not in server.relays
        try:
            if await server.host.reserve(relay, timeout=DIALBACK_TIMEOUT + 5):
                held[relay] = server.relays.get(relay) or circuit_addr(addrs[0], relay, me)
                if relay not in server.relays:
                    log.info("reserved a slot on relay %s", relay[-6:])
            else:
                log.info("relay %s refused a reservation (its slots are full)", relay[-6:])
        except P2PError as exc:
            log.info("no reservation on relay %s: %s", relay[-6:], exc)
    for gone in set(server.relays) - set(held):
        server.host.release_relay(gone)
    if not held and (server.relays or server.reach != "private"):  # once, when it comes to that
        log.warning("no relay could take this server: nobody can dial it (waiting for a server offering --relay-slots)")
    server.relays = held
    server.addrs = list(held.values()) or list(server.direct_addrs)


async def _wait(server) -> None:
    """Until the next check: while the answer is unknown, :data:`RECHECK_UNKNOWN` seconds, or less
    when a peer to ask appears (the first server of a swarm learns as soon as a second joins)."""
    if server.direct_reach != "unknown":
        await asyncio.sleep(RELAY_CHECK if server.direct_reach == "private" else RECHECK)
        return
    had_peers = bool(peers_to_ask(server))
    deadline = time.monotonic() + RECHECK_UNKNOWN
    while time.monotonic() < deadline:
        await asyncio.sleep(min(PEER_POLL, max(0.0, deadline - time.monotonic())))
        if not had_peers and peers_to_ask(server):
            return


async def reachability_loop(server, first: bool = True) -> None:
    """Check now (``first``), again while the answer is unknown (no peer to ask yet), and now and
    then after; while nobody can dial this server, keep its relays."""
    checked = -math.inf
    while True:
        if not first:
            await _wait(server)
        first = False
        before = server.reach
        try:
            if server.direct_reach == "unknown" or time.monotonic() - checked >= RECHECK:
                await check_reachability(server)
                checked = time.monotonic()
            if server.direct_reach == "private":
                await hold_relays(server)
            elif server.relays:
                for relay in server.relays:
                    server.host.release_relay(relay)
                server.relays, server.addrs = {}, list(server.direct_addrs)
        except Exception as exc:  # a check that fails keeps the last answer
            log.info("reachability check failed: %s", exc)
        server.reach = announced_reach(server.direct_reach, len(server.relays))
        if server.reach != before:
            log.info("reachability: %s (was %s)", server.reach, before)
