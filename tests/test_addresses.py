"""The addresses a server announces: --announce-addr checked and announced as given, a wildcard
listen address replaced by the interfaces' addresses, and both shown by `swarm status`."""

from __future__ import annotations

import asyncio

import pytest
from rich.console import Console

from swarm.cli.render import status_view
from swarm.p2p.addresses import check_announce_addr, check_initial_peer, interface_ips, public_addrs
from swarm.p2p.status import gather_status
from server_utils import served

PEER = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"

ANNOUNCE = [  # (given, announced or the error's words)
    ("/ip4/203.0.113.7/tcp/31337", f"/ip4/203.0.113.7/tcp/31337/p2p/{PEER}"),
    (f"/ip4/203.0.113.7/tcp/31337/p2p/{PEER}", f"/ip4/203.0.113.7/tcp/31337/p2p/{PEER}"),
    ("/ip6/2001:db8::7/tcp/4001", f"/ip6/2001:db8::7/tcp/4001/p2p/{PEER}"),
    ("/ip6/2001:DB8:0::7/tcp/04001", f"/ip6/2001:db8::7/tcp/4001/p2p/{PEER}"),  # written canonically
    ("/ip4/127.0.0.1/tcp/4001", f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"),  # a swarm on one machine
    ("/ip4/0.0.0.0/tcp/4001", ValueError("not an address other peers can dial")),
    ("/ip6/::/tcp/4001", ValueError("not an address other peers can dial")),
    ("/ip4/224.0.0.1/tcp/4001", ValueError("not an address other peers can dial")),
    ("/ip4/255.255.255.255/tcp/4001", ValueError("not an address other peers can dial")),
    ("/ip6/fe80::1/tcp/4001", ValueError("not an address other peers can dial")),  # link-local: needs a zone
    ("/ip4/240.0.0.1/tcp/4001", ValueError("not an address other peers can dial")),
    ("/ip4/0.1.2.3/tcp/4001", ValueError("not an address other peers can dial")),
    ("/ip4/203.0.113.7/tcp/0", ValueError("the port must be")),
    ("/dns4/swarm.example.org/tcp/443", ValueError("give /ip4/ADDRESS/tcp/PORT")),
    ("/ip4/203.0.113.7/udp/4001", ValueError("give /ip4/ADDRESS/tcp/PORT")),
    ("/ip4/203.0.113.7", ValueError("give /ip4/ADDRESS/tcp/PORT")),
    ("/tcp/4001", ValueError("give /ip4/ADDRESS/tcp/PORT")),
    ("/ip4/203.0.113.7/tcp/4001/ws", ValueError("give /ip4/ADDRESS/tcp/PORT")),
    ("203.0.113.7:4001", ValueError("not a multiaddr")),
    ("/ip4/203.0.113.999/tcp/4001", ValueError("not a multiaddr")),
    ("/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWCPVQGi6QpSEpyXLjXsZgzARPmYmXpnqrbqY6f6ACDz8G", ValueError("another peer id")),
]


@pytest.mark.parametrize("given, expected", ANNOUNCE)
def test_announce_addr_is_checked(given, expected):
    if isinstance(expected, ValueError):
        with pytest.raises(ValueError, match="--announce-addr") as err:
            check_announce_addr(given, PEER)
        assert str(expected) in str(err.value) and "\n" not in str(err.value)
    else:
        assert check_announce_addr(given, PEER) == expected


INITIAL = [  # (--initial-peers value, canonical form or the error's words)
    (f"/ip4/203.0.113.7/tcp/31337/p2p/{PEER}", f"/ip4/203.0.113.7/tcp/31337/p2p/{PEER}"),
    (f"/ip4/127.0.0.1/tcp/031337/p2p/{PEER}", f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER}"),  # loopback: a swarm on one machine
    (f"/ip6/0:0::1/tcp/4001/p2p/{PEER}", f"/ip6/::1/tcp/4001/p2p/{PEER}"),
    ("/ip4/10.0.0.2/tcp/1/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # an RSA key's (sha256) peer id
     "/ip4/10.0.0.2/tcp/1/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"),
    ("garbage", ValueError("not a multiaddr")),
    ("/ip4/999.1.1.1/tcp/1", ValueError("not a multiaddr")),
    ("/ip4/203.0.113.7/tcp/4001", ValueError("the /p2p/PEER_ID part is missing")),
    ("/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWgarbage", ValueError("not a multiaddr")),  # not a peer id
    ("/ip4/203.0.113.7/tcp/4001/p2p/garbage", ValueError("not a multiaddr")),
    (f"/ip4/203.0.113.7/tcp/0/p2p/{PEER}", ValueError("the port must be")),
    (f"/ip4/203.0.113.7/tcp/70000/p2p/{PEER}", ValueError("not a multiaddr")),
    (f"/ip4/0.0.0.0/tcp/4001/p2p/{PEER}", ValueError("not an address a peer can be reached at")),
    (f"/ip6/fe80::1/tcp/4001/p2p/{PEER}", ValueError("not an address a peer can be reached at")),
    (f"/dns4/swarm.example.org/tcp/443/p2p/{PEER}", ValueError("not /ip4/ADDRESS/tcp/PORT/p2p/PEER_ID")),
    (f"/ip4/203.0.113.7/udp/4001/p2p/{PEER}", ValueError("not /ip4/ADDRESS/tcp/PORT/p2p/PEER_ID")),
    (f"/p2p/{PEER}", ValueError("not /ip4/ADDRESS/tcp/PORT/p2p/PEER_ID")),
    (f"/ip4/203.0.113.7/tcp/4001/p2p/{PEER}/p2p/{PEER}", ValueError("not /ip4/ADDRESS/tcp/PORT/p2p/PEER_ID")),
]


@pytest.mark.parametrize("given, expected", INITIAL)
def test_initial_peer_is_checked(given, expected):
    if isinstance(expected, ValueError):
        with pytest.raises(ValueError, match="--initial-peers") as err:
            check_initial_peer(given)
        message = str(err.value)
        assert str(expected) in message and "printed by `swarm serve`" in message and "\n" not in message
    else:
        assert check_initial_peer(given) == expected


IFACES = ["127.0.0.1", "10.1.0.2", "192.0.2.5", "::1", "2001:db8::5"]
PUBLIC = [  # (listen addresses, interface addresses, announced)
    (["/ip4/0.0.0.0/tcp/5/p2p/P"], IFACES, ["/ip4/10.1.0.2/tcp/5/p2p/P", "/ip4/192.0.2.5/tcp/5/p2p/P"]),
    (["/ip6/::/tcp/5/p2p/P"], IFACES, ["/ip6/2001:db8::5/tcp/5/p2p/P"]),
    (["/ip4/0.0.0.0/tcp/5/p2p/P"], ["127.0.0.1", "::1"], ["/ip4/127.0.0.1/tcp/5/p2p/P"]),  # only loopback here
    (["/ip4/127.0.0.1/tcp/5/p2p/P"], IFACES, ["/ip4/127.0.0.1/tcp/5/p2p/P"]),  # a specific address stays
    (["/ip4/10.1.0.2/tcp/5/p2p/P", "/ip4/0.0.0.0/tcp/5/p2p/P"], IFACES, ["/ip4/10.1.0.2/tcp/5/p2p/P", "/ip4/192.0.2.5/tcp/5/p2p/P"]),
    (["/ip6/::/tcp/5/p2p/P"], ["127.0.0.1"], ValueError("no IPv6 address")),
]


@pytest.mark.parametrize("listen, interfaces, expected", PUBLIC)
def test_wildcard_listen_address_is_announced_as_the_interfaces(listen, interfaces, expected):
    if isinstance(expected, ValueError):
        with pytest.raises(ValueError, match="--host"):
            public_addrs(listen, interfaces)
    else:
        assert public_addrs(listen, interfaces) == expected


def test_interface_ips_include_loopback():
    assert "127.0.0.1" in interface_ips()


def _render(data: dict) -> str:
    console = Console(width=220, record=True)
    console.print(status_view(data))
    return console.export_text()


def test_server_announces_given_and_interface_addresses(tiny_checkpoints):
    model = tiny_checkpoints["llama"]

    async def main():
        async with served(model, "0:2", announce_addrs=["/ip4/203.0.113.7/tcp/31337"]) as (forwarded, _):
            # the announced address is what peers are told; the listen address still works for `status`
            async with served(model, "2:4", listen_host="0.0.0.0") as (wildcard, _):
                port = wildcard.host.addrs[0].split("/")[4]
                here = f"/ip4/127.0.0.1/tcp/{port}/p2p/{wildcard.host.peer_id}"
                data = await gather_status([forwarded.host.addrs[0], here])
        return forwarded, wildcard, data

    forwarded, wildcard, data = asyncio.run(main())
    assert forwarded.addrs == [f"/ip4/203.0.113.7/tcp/31337/p2p/{forwarded.host.peer_id}"]
    assert wildcard.addrs and not any("/0.0.0.0/" in a for a in wildcard.addrs)
    others = [ip for ip in interface_ips() if "." in ip and not ip.startswith("127.")]
    assert all("/127.0.0.1/" not in a for a in wildcard.addrs) if others else wildcard.addrs[0].startswith("/ip4/127.0.0.1/")
    by_peer = {s["peer_id"]: s for s in data["servers"]}
    assert by_peer[forwarded.host.peer_id]["addrs"] == forwarded.addrs
    assert by_peer[wildcard.host.peer_id]["addrs"] == wildcard.addrs
    assert "203.0.113.7:31337" in _render(data)


def test_server_refuses_an_announce_addr_of_another_peer(tiny_checkpoints):
    async def main():
        async with served(tiny_checkpoints["llama"], "0:2", announce_addrs=[ANNOUNCE[-1][0]]):
            pass

    with pytest.raises(ValueError, match="another peer id"):
        asyncio.run(main())
