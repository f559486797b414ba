"""Reachability: can peers dial a server at the addresses it announces?

A server behind a NAT or firewall, or one given a wrong ``--announce-addr``, would otherwise be
"online" and useless: nobody can open a session with it. So a server asks peers it knows to dial
it back (the ``/swarm/dialback`` protocol): each opens a *new* connection to one announced
address (never reusing the one the request came on) and says whether it worked. An address
that some peer reached is public; one that every peer asked failed to reach is not (a one-line
warning names it, or ``--require-reachable`` refuses to serve); with no peer to ask (the first
server of a swarm), the answer is unknown and the server asks again when peers come.

A peer dials back only the IP address the request came from (so nobody can use the swarm to
make peers dial a third party), one address at a time per peer and a few in total, each within
:data:`DIALBACK_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import logging
import random

import multiaddr

from swarm.p2p import protocols
from swarm.p2p.host import P2PError, P2PTimeoutError, StreamClosedError
from swarm.p2p.wire import BAD_REQUEST, Frame, RemoteError, WireError, expect, read_frame, write_frame

log = logging.getLogger("swarm.reach")

DIALBACK_TIMEOUT = 5.0  # seconds a peer tries to dial an address back
PEERS_ASKED = 3  # peers asked about each address at most (until one reaches it)
MAX_DIALBACKS = 4  # dial-backs this peer makes at once for all others together
RECHECK_UNKNOWN = 30.0  # seconds between checks while no peer could answer
RECHECK = 600.0  # seconds between checks otherwise (addresses and NATs change)


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
        observed = stream.remote_address
        why = may_dial_back(addr, observed[0] if observed else None)
        if why is not None:
            raise WireError(why, BAD_REQUEST)
        ok, error = False, ""
        async with server.dialbacks:
            try:
                await server.host.dial_back(stream.remote_peer_id, addr, DIALBACK_TIMEOUT)
                ok = True
            except P2PError as exc:
                error = str(exc)[:300]
        await write_frame(stream, Frame("dialback_reply", {"ok": ok, "error": error}), timeout=server.cfg.request_timeout)
    except WireError as exc:
        await server.reply_error(stream, exc, exc.code)
    except (P2PTimeoutError, StreamClosedError):
        pass


async def ask_dialback(host, peer_id: str, addr: str, timeout: float) -> bool:
    """Whether ``peer_id`` reached us at ``addr`` (RemoteError when it refused to try, P2PError
    when it did not answer)."""
    reply = await protocols.request(host, peer_id, protocols.DIALBACK, Frame("dialback", {"addr": addr}), timeout)
    if reply.kind == "error":
        raise RemoteError(reply.fields.get("message", "dial-back refused"), reply.fields.get("code", BAD_REQUEST))
    return bool(expect(reply, "dialback_reply")["ok"])


async def check_addresses(host, addrs: list[str], peers: list[str], timeout: float) -> dict[str, bool | None]:
    """Each address's result (see :func:`verdict`), asking ``peers`` in turn (at most
    :data:`PEERS_ASKED` each) until one reaches it."""
    results: dict[str, bool | None] = {}
    for addr in addrs:
        result: bool | None = None
        for peer in peers[:PEERS_ASKED]:
            try:
                if await ask_dialback(host, peer, addr, timeout):
                    result = True
                    break
                result = False
            except (P2PError, WireError, RemoteError) as exc:
                log.debug("dial-back of %s by %s: %s", addr, peer[-6:], exc)
        results[addr] = result
    return results


def peers_to_ask(server) -> list[str]:
    """Other servers of the table, online or joining, in random order (a different few each time)."""
    others = [p for p, s in server.table.snapshot().items() if p != server.host.peer_id and s.state != "offline"]
    random.shuffle(others)
    return others


async def check_reachability(server) -> str:
    """Ask peers to dial this server back at each announced address; set and return
    ``server.reach``, warning about each address no peer could reach."""
    peers = peers_to_ask(server)
    if not peers:
        server.reach = "unknown"
        return server.reach
    results = await check_addresses(server.host, list(server.addrs), peers, DIALBACK_TIMEOUT + 5)
    server.reach = verdict(results)
    for addr, result in results.items():
        if result is False:
            log.warning("no peer could dial this server at %s: it cannot serve there (behind a NAT or firewall, "
                        "or a wrong --announce-addr)", addr)
    return server.reach


async def reachability_loop(server, first: bool = True) -> None:
    """Check now (``first``), again while the answer is unknown (no peer to ask yet), and now and
    then after."""
    while True:
        if not first:
            await asyncio.sleep(RECHECK_UNKNOWN if server.reach == "unknown" else RECHECK)
        first = False
        before = server.reach
        try:
            await check_reachability(server)
        except Exception as exc:  # a check that fails keeps the last answer
            log.info("reachability check failed: %s", exc)
        if server.reach != before:
            log.info("reachability: %s (was %s)", server.reach, before)
