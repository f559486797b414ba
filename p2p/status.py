"""The swarm's topology as seen from one initial peer: servers, ranges, states, speed, gaps; and
what this machine's checks found of them (its verification ledger: checks passed and failed, bans)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from swarm.p2p.client import SwarmError, fetch_info
from swarm.p2p.circuits import dial_allowance
from swarm.p2p.host import Host, P2PError
from swarm.p2p.ledger import Ledger
from swarm.p2p.private import Membership, private_hint
from swarm.p2p.table import MAX_NAME, PeerTable, ServerInfo, announced_text, coverage, gaps
from swarm.p2p.wire import PeerId, RemoteError, WireError


async def gather_status(
    initial_peers: list[str], model: str | None = None, timeout: float = 10.0, membership: Membership | None = None,
    ledger: Ledger | None = None,
) -> dict:
    """Ask the initial peers for their tables and ping every server listed.

    Returns ``{"model", "model_name", "num_blocks", "servers": [{peer_id, blocks, state, throughput,
    ...}], "gaps", "coverage", "bottleneck", "moves"}``.
    A server that does not answer its ping (killed, frozen, unreachable from here) is shown with
    state ``unreachable`` and counts for neither gaps nor coverage: the tables still list it until
    its entry expires (3 announce periods), but no client could use it.
    ``membership``: a private swarm's key and the servers allowed (see :mod:`swarm.p2p.private`).
    ``ledger``: this machine's checks and bans, added to the report (see :func:`status_report`).
    Raises :class:`SwarmError` when no initial peer answers (or none serves ``model``)."""
    membership = membership or Membership()
    if not initial_peers:
        raise SwarmError("give --initial-peers (a multiaddr printed by `swarm serve`) or set SWARM_INITIAL_PEERS")
    host = await Host.start(listen_host="0.0.0.0", port=0, swarm_key=membership.key)  # see SwarmClient.start
    try:
        infos, errors = [], []
        for maddr in initial_peers:
            try:
                infos.append(await fetch_info(host, maddr, timeout))
            except (P2PError, WireError, RemoteError) as exc:
                errors.append(f"{maddr}: {exc}")
        if model is not None:
            infos = [i for i in infos if i.get("model") == model] or infos
        if not infos:
            raise SwarmError("no initial peer answered:\n  " + "\n  ".join(errors) + private_hint(membership))
        model = model or infos[0]["model"]
        num_blocks = infos[0]["num_blocks"]
        table = PeerTable(model, num_blocks, period=1e9, allowed=membership.allowed)
        for info in infos:
            table.merge([info, *info.get("table", [])])
        servers = table.snapshot()
        for s in servers.values():
            host.add_addrs(s.peer_id, list(s.addrs))

        rtts = await ping_all(host, servers, timeout=min(timeout, 3.0))
        links = {p: "relayed" if host.relayed(p) else "direct" for p, r in rtts.items() if r is not None}
        # the name the initial peers announce (else any server's: a client has no checkpoint to name it)
        names = [announced_text(i.get("model_name", ""), MAX_NAME) for i in infos if i.get("model") == model]
        name = next((n for n in [*names, *(s.model_name for s in servers.values())] if n), "")
        return status_report(model, num_blocks, servers, rtts, errors, model_name=name, links=links, ledger=ledger)
    finally:
        await host.close()


async def ping_all(host: Host, servers: Mapping[PeerId, ServerInfo], timeout: float = 3.0) -> dict[PeerId, float | None]:
    """Round-trip time in seconds to every server at once (None: no answer within ``timeout``)."""

    async def rtt(peer_id):
        try:
            return await host.ping(peer_id, timeout=timeout + dial_allowance(servers[peer_id].addrs))
        except P2PError:
            return None

    return dict(zip(servers, await asyncio.gather(*(rtt(p) for p in servers))))


def status_report(
    model: str,
    num_blocks: int,
    servers: Mapping[PeerId, ServerInfo],
    rtts: Mapping[PeerId, float | None],
    unreachable_initial_peers: list[str] = (),
    model_name: str = "",
    links: Mapping[PeerId, str] | None = None,
    ledger: Ledger | None = None,
    now: float | None = None,
) -> dict:
    """The status object (``swarm status --json``, ``GET /v1/swarm`` of ``swarm api``) of a table
    snapshot and the servers' round-trip times: a server without an RTT is ``unreachable`` and
    counts for neither gaps nor coverage. ``model`` is the model's id, ``model_name`` what people
    call it ("" when unknown). ``links``: how this peer reaches each server, direct or relayed.
    ``ledger``: this machine's verification ledger; with it each server has ``"checks"``
    (``{"passed", "failed"}``, None when never checked) and ``"ban"`` (``{"reason", "since",
    "until"}``, None when not banned), and the report has ``"bans"``: every ban in force at ``now``
    (default: the time now), newest first, those of servers not in ``servers`` too
    (``"in_swarm": false``). Without it none of these keys are there."""
    links = links or {}
    reachable = {p: s for p, s in servers.items() if rtts.get(p) is not None}
    rows = [
        {
            "peer_id": s.peer_id,
            "name": s.public_name,
            "blocks": [s.start, s.end],
            "state": s.state if p in reachable else "unreachable",
            "throughput": s.throughput,
            "capacity": s.carries,
            "throughput_source": s.throughput_source,
            "compute": s.compute,
            "network": s.network,
            "bandwidth": s.bandwidth,
            "bandwidth_source": s.bandwidth_source,
            "sessions": s.sessions,
            "served": s.served,
            "queued": s.queued,
            "batch": s.batch,
            "max_batch": s.max_batch,
            "cache_tokens_left": s.cache_tokens_left,
            "dtype": s.dtype,
            "quant": s.quant,
            "weight_bytes": s.weight_bytes,
            "device": s.device or "cpu",
            "version": s.version,
            "rtt_ms": None if p not in reachable else round(rtts[p] * 1e3, 2),
            "addrs": list(s.addrs),
            "reach": s.reach,
            "relay": s.relay,
            "link": links.get(p),
        }
        for p, s in sorted(servers.items(), key=lambda item: (item[1].start, item[1].end, item[0]))
    ]
    totals = coverage(reachable, num_blocks)
    report = {
        "model": model,
        "model_name": model_name,
        "num_blocks": num_blocks,
        "servers": rows,
        "gaps": [list(g) for g in gaps(reachable, num_blocks)],
        "coverage": totals,
        "bottleneck": bottleneck(totals),
        "moves": recent_moves(servers),
        "unreachable_initial_peers": list(unreachable_initial_peers),
    }
    if ledger is not None:
        now = time.time() if now is None else now
        bans = {p: b for p, b in ledger.bans.items() if b.until > now}
        for row in rows:
            counts = ledger.checks.get(row["peer_id"])
            row["checks"] = None if counts is None else {"passed": counts[0], "failed": counts[1]}
            ban = bans.get(row["peer_id"])
            row["ban"] = None if ban is None else ban.to_json()
        report["bans"] = [{"peer_id": p, **b.to_json(), "in_swarm": p in servers}
                          for p, b in sorted(bans.items(), key=lambda item: (-item[1].since, item[0]))]
    return report


def recent_moves(servers, limit: int = 10) -> list[dict]:
    """The latest moves the servers announce, newest first: ``{peer_id, name, time, from, to}``
    (``time``: seconds since the epoch, by the mover's clock; never later than now here, so a
    server announcing times in the future cannot push the others' moves out of view)."""
    now = time.time()
    moves = [
        {"peer_id": s.peer_id, "name": s.public_name, "time": min(m[0], now), "from": [m[1], m[2]], "to": [m[3], m[4]]}
        for s in servers.values() for m in s.moves
    ]
    return sorted(moves, key=lambda m: -m["time"])[:limit]


def bottleneck(totals: list[float]) -> dict:
    """The swarm's bottleneck: the least total throughput of any block (tokens/s a chain through
    the swarm can reach at most) and the ranges of blocks that have it."""
    if not totals:
        return {"throughput": 0.0, "blocks": []}
    low = min(totals)
    ranges: list[list[int]] = []
    for b, total in enumerate(totals):
        if total == low:
            if ranges and ranges[-1][1] == b:
                ranges[-1][1] = b + 1
            else:
                ranges.append([b, b + 1])
    return {"throughput": low, "blocks": ranges}
