"""The addresses a server announces: where other peers should dial it.

A host listening on ``0.0.0.0`` (or ``::``) reports that as its address, and no peer can dial it:
:func:`public_addrs` puts this machine's interface addresses in its place. Behind a port forward
or a relay the reachable address is one the machine cannot see; ``swarm serve --announce-addr``
gives it, checked by :func:`check_announce_addr`. (Every interface's address is announced, so the
whole swarm learns them all: use ``--host`` with one address, or ``--announce-addr``, to announce
fewer.)
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
import sys
from pathlib import Path

import multiaddr

SIOCGIFFLAGS, SIOCGIFADDR, IFF_UP, IFF_RUNNING = 0x8913, 0x8915, 0x1, 0x40
PROBE = {4: "192.0.2.1", 6: "2001:db8::1"}  # documentation addresses: "connecting" a UDP socket sends nothing


def check_announce_addr(text: str, peer_id: str) -> str:
    """``text`` as a full multiaddr ending in ``/p2p/<peer_id>``, or ValueError saying what is wrong:
    it must name an IP address other peers can dial and a TCP port, and may end in this server's
    own peer id."""
    where = f"--announce-addr {text}"
    try:
        maddr = multiaddr.Multiaddr(text)
        parts = [(p.name, maddr.value_for_protocol(p.code)) for p in maddr.protocols()]
    except Exception as exc:  # the multiaddr package raises a handful of types for bad text
        raise ValueError(f"{where}: not a multiaddr ({exc}); give e.g. /ip4/203.0.113.7/tcp/31337") from None
    names = [name for name, _ in parts]
    if len(parts) not in (2, 3) or names[0] not in ("ip4", "ip6") or names[1] != "tcp" or names[2:] not in ([], ["p2p"]):
        raise ValueError(f"{where}: give /ip4/ADDRESS/tcp/PORT or /ip6/ADDRESS/tcp/PORT, optionally ending in /p2p/PEER_ID")
    ip = ipaddress.ip_address(parts[0][1])
    mapped = getattr(ip, "ipv4_mapped", None)
    if any(not _dialable(a) for a in (ip, mapped) if a is not None):
        raise ValueError(f"{where}: {ip} is not an address other peers can dial; give this machine's address as they reach it")
    if not 0 < int(parts[1][1]) <= 65535:
        raise ValueError(f"{where}: the port must be between 1 and 65535")
    if names[2:] and parts[2][1] != peer_id:
        raise ValueError(f"{where}: ends in another peer id than this server's ({peer_id}); drop the /p2p/ part")
    return f"/{names[0]}/{ip}/tcp/{int(parts[1][1])}/p2p/{peer_id}"


def check_initial_peer(text: str) -> str:
    """``text``, an ``--initial-peers`` value, in canonical form, or ValueError saying what is
    wrong with it: it must be a multiaddr such as `swarm serve` prints, an IP address (not a host
    name) other peers can dial, a TCP port and the peer's id (``/p2p/12D3KooW...``): without the id
    a client could not tell the peer it reached from an impostor."""
    where = f"--initial-peers {text}"
    example = "give a multiaddr printed by `swarm serve`, like /ip4/1.2.3.4/tcp/PORT/p2p/12D3KooW..."
    try:
        maddr = multiaddr.Multiaddr(text)  # checks each part: the address, the port, the peer id's multihash
        parts = [(p.name, maddr.value_for_protocol(p.code)) for p in maddr.protocols()]
    except Exception as exc:  # the multiaddr package raises a handful of types for bad text
        why = str(exc).split(" (string:")[0].removeprefix(f"Invalid MultiAddr {text!r}: ")
        raise ValueError(f"{where}: not a multiaddr ({why}); {example}") from None
    names = [name for name, _ in parts]
    if names[:2] not in (["ip4", "tcp"], ["ip6", "tcp"]) or names[2:] != ["p2p"]:
        missing = " (the /p2p/PEER_ID part is missing)" if names[-1:] != ["p2p"] else ""
        raise ValueError(f"{where}: not /ip4/ADDRESS/tcp/PORT/p2p/PEER_ID{missing}; {example}")
    ip = ipaddress.ip_address(parts[0][1])
    # (loopback is fine here, unlike in an announcement: a client on the server's machine dials it)
    if ip.is_unspecified or ip.is_multicast or (ip.version == 6 and ip.is_link_local):
        raise ValueError(f"{where}: {ip} is not an address a peer can be reached at; {example}")
    if not 0 < int(parts[1][1]) <= 65535:
        raise ValueError(f"{where}: the port must be between 1 and 65535; {example}")
    return f"/{names[0]}/{ip}/tcp/{int(parts[1][1])}/p2p/{parts[2][1]}"


def _dialable(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved or (ip.version == 6 and ip.is_link_local):
        return False  # (an IPv6 link-local address needs an interface zone a multiaddr cannot carry)
    return not (ip.version == 4 and ip in ipaddress.ip_network("0.0.0.0/8"))  # (240/4, broadcast included, is reserved)


def public_addrs(listen_addrs: list[str], interfaces: list[str]) -> list[str]:
    """``listen_addrs`` with each unspecified address (``0.0.0.0``, ``::``) replaced by the
    ``interfaces``' addresses of its family that are not loopback, in their order (or by the
    loopback ones when there are no others). ValueError when a family has none at all."""
    out = []
    for addr in listen_addrs:
        _, proto, host, *rest = addr.split("/")
        if proto not in ("ip4", "ip6") or not ipaddress.ip_address(host).is_unspecified:
            out.append(addr)
            continue
        family = [ipaddress.ip_address(ip) for ip in interfaces]
        family = [ip for ip in family if ip.version == (4 if proto == "ip4" else 6)]
        chosen = [ip for ip in family if not ip.is_loopback] or [ip for ip in family if ip.is_loopback]
        if not chosen:
            raise ValueError(f"--host {host}: this machine has no {proto[2:] == '6' and 'IPv6' or 'IPv4'} address to "
                             "announce; listen on another address or give --announce-addr")
        out += ["/".join(["", proto, str(ip), *rest]) for ip in chosen]
    return list(dict.fromkeys(out))


def interface_ips() -> list[str]:
    """This machine's addresses on interfaces that are up and running: the one of the default
    route first, then IPv4 (one per interface; Linux) and global or loopback IPv6 (Linux), else
    what the host name resolves to."""
    ips = [ip for ip in map(_route_source, (4, 6)) if ip]
    if sys.platform == "linux":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                request = struct.pack("256s", name.encode()[:15])
                try:
                    flags = struct.unpack("H", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, request)[16:18])[0]
                    if flags & IFF_UP and flags & IFF_RUNNING:
                        ips.append(socket.inet_ntoa(fcntl.ioctl(s.fileno(), SIOCGIFADDR, request)[20:24]))
                except OSError:  # no IPv4 address on this interface
                    continue
        inet6 = Path("/proc/net/if_inet6")
        for line in inet6.read_text().splitlines() if inet6.exists() else []:
            hexaddr, _, _, scope, flags, _ = line.split()
            # global or loopback (link-local needs a zone), not tentative, deprecated or failed (DAD)
            if int(scope, 16) in (0x00, 0x10) and not int(flags, 16) & 0x68:
                ips.append(str(ipaddress.IPv6Address(bytes.fromhex(hexaddr))))
    if not ips:
        try:
            ips = [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_STREAM)]
        except OSError:
            pass
    return list(dict.fromkeys(ips + ["127.0.0.1", "::1"]))


def _route_source(version: int) -> str | None:
    """The local address this machine's default route of IP ``version`` leaves from, if any."""
    try:
        with socket.socket(socket.AF_INET if version == 4 else socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.connect((PROBE[version], 9))
            return s.getsockname()[0]
    except OSError:
        return None
