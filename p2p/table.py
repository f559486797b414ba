"""What a peer knows of the swarm: one :class:`ServerInfo` per server, fed by announcements.

Servers announce themselves on a gossipsub topic per model every ``period`` seconds; an entry
that has not been refreshed for ``expiry_periods`` periods is dropped, and an ``offline``
announcement drops it at once. Gossip is best-effort (REFERENCE §4), so the table is rebuilt
continuously rather than trusted to hear every message.

Each announcement names the ``instance`` (the run of the process) it comes from, ordered by start
time: a server restarted with the same key replaces its old entry, and an offline announcement
removes only the entry of the run that sent it, never a newer run of the same peer id (gossip may
deliver the old run's goodbye after the new run's hello).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgpack
from swarm import __version__
from swarm.engine.checkpoint import DTYPES, Checkpoint
from swarm.engine.quant import QUANTS
from swarm.p2p.wire import PeerId

MAX_SERVERS = 10_000  # entries a table takes (one per peer id); a flood of made-up peers is ignored beyond
MAX_ADDRS = 16  # addresses taken from one announcement
MAX_MOVES = 10  # recent moves taken from one announcement
MAX_NAME = 96  # characters of an announced model name (a Hub repo id is at most 96)
BANDWIDTH_SOURCES = ("measured", "given", "assumed", "")
THROUGHPUT_SOURCES = ("measured", "cached", "given", "")
STATES = ("joining", "online", "offline")


def model_id(checkpoint: Checkpoint) -> str:
    """What a model is, wherever it lies: ``MODEL_TYPE-HASH``, the hash over the config fields
    that define the computation and the weights' fingerprint (:meth:`Checkpoint.fingerprint`).
    Copies of a checkpoint (another directory, float32 or bfloat16, sharded or not) get the same
    id, so they serve one swarm; another fine-tune or variant gets another id and never mixes in."""
    identity = {"config": _model_fields(checkpoint.raw_config), "weights": checkpoint.fingerprint()}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"{checkpoint.raw_config.get('model_type', 'model')}-{digest}"


def model_name(model_dir: Path) -> str:
    """What people call the model in a checkpoint directory: the directory's name (the name `swarm
    api` serves it by), or ``ORG/NAME`` for a Hugging Face Hub snapshot (whose directory,
    ``models--ORG--NAME/snapshots/REVISION``, is named by its revision). Shown beside the
    :func:`model_id`, which says what the model is but not what it is called."""
    model_dir = Path(os.path.abspath(model_dir))  # "." and ".." by name; a symlink keeps its own name
    repo = model_dir.parent.parent.name
    if model_dir.parent.name == "snapshots" and repo.startswith("models--"):
        return "/".join(repo.removeprefix("models--").split("--", 1))
    return model_dir.name


def announced_text(value: object, limit: int) -> str:
    """A string field of an announcement as it may be shown (``swarm status``, logs, the web page),
    or "" when it is not a printable string: every peer is a stranger, and a control character
    could rewrite a terminal. Cut to ``limit`` characters."""
    return value[:limit] if isinstance(value, str) and value.isprintable() else ""


def _model_fields(raw: dict) -> dict:
    # what defines the computation; drop fields that only describe how a file was written
    ignore = {"dtype", "torch_dtype", "transformers_version", "_name_or_path", "architectures", "use_cache"}
    return {k: v for k, v in raw.items() if k not in ignore}


def announce_topic(model: str) -> str:
    return f"/swarm/{model}/servers"


REACH = ("unknown", "public", "private", "relayed")  # see swarm.p2p.nat


@dataclass(frozen=True)
class ServerInfo:
    peer_id: PeerId
    addrs: tuple[str, ...]
    model: str
    start: int
    end: int
    state: str = "online"
    throughput: float = 1.0  # tokens/s this server can add to a chain (min of compute and network)
    capacity: float = 0.0  # tokens/s it carries with sessions batched (engine.throughput.CAPACITY_BATCH; 0: as throughput)
    dtype: str = "float32"
    quant: str = "none"  # its blocks' linears: none, int8 or nf4
    weight_bytes: int = 0  # bytes its blocks' weights take in its memory
    cache_tokens_left: int = 0
    version: str = __version__
    public_name: str = ""
    period: float = 5.0  # seconds between this server's announcements (its entry expires after 3)
    instance: str = ""  # this run of the server's process (start time, random bits): later runs sort after
    sessions: int = 0  # load: inference sessions open now
    served: float = 0.0  # load: tokens per second computed over the last announcement period (all requests)
    queued: int = 0  # load: computations waiting for its compute thread now
    batch: float = 0.0  # load: sessions per batched pass lately (mean; 0: none run yet)
    max_batch: int = 1  # sessions one batched pass may hold (--max-batch; 1 where its kernels cannot batch exactly)
    compute: float = 0.0  # tokens/s of its compute (decode steps/s of a block ÷ blocks a request uses)
    network: float = 0.0  # tokens/s its link carries (bandwidth ÷ bits of a hidden state)
    bandwidth: float = 0.0  # Mbit/s of its link
    bandwidth_source: str = ""  # measured (a timed echo to a peer), given (--bandwidth) or assumed
    throughput_source: str = ""  # measured now, cached (an earlier measurement here) or given (--throughput N)
    moves: tuple = ()  # recent moves: (unix time, from start, from end, to start, to end), oldest first
    model_name: str = ""  # what people call the model (:func:`model_name`; "" from servers before it was announced)
    reach: str = "unknown"  # whether peers dialed it back at its addresses: public, private, relayed or unknown (p2p/nat.py)
    relay: bool = False  # it relays connections for servers nobody can dial (p2p/circuits.py)
    device: str = "cpu"  # where its blocks compute: cpu, or its GPUs' names ("" from servers before it was announced)
    received: float = field(default=0.0, compare=False)  # local monotonic time of the last update (not sent)

    @property
    def carries(self) -> float:
        """Tokens/s it carries for the swarm, its sessions batched (what balancing places servers
        by); its one-session throughput where it announced no capacity."""
        return max(self.capacity, self.throughput)

    def to_wire(self) -> dict:
        data = asdict(self)
        data.pop("received")
        data["addrs"] = list(self.addrs)
        data["moves"] = [list(m) for m in self.moves]
        return data

    @classmethod
    def from_wire(cls, data: dict, received: float | None = None) -> ServerInfo:
        """Parse an announcement; raises ``ValueError`` (with what is wrong) for a malformed one."""
        try:
            info = cls(
                peer_id=PeerId(str(data["peer_id"])),
                # printable and short: they are dialed, logged and shown in `swarm status`
                addrs=tuple(
                    a for a in list(data.get("addrs", ()))[:MAX_ADDRS] if isinstance(a, str) and len(a) <= 256 and a.isprintable()
                ),
                model=str(data["model"]),
                start=int(data["start"]),
                end=int(data["end"]),
                state=str(data.get("state", "online")),
                throughput=float(data.get("throughput", 1.0)),
                capacity=float(data.get("capacity", 0.0)),
                dtype=str(data.get("dtype", "float32")),
                quant=str(data.get("quant", "none")),
                weight_bytes=_count(data.get("weight_bytes", 0)),
                cache_tokens_left=int(data.get("cache_tokens_left", 0)),
                version=str(data.get("version", "")),
                public_name=announced_text(data.get("public_name", ""), 64),
                period=float(data.get("period", 5.0)),
                instance=str(data.get("instance", ""))[:64],
                sessions=int(data.get("sessions", 0)),
                served=float(data.get("served", 0.0)),
                queued=_count(data.get("queued", 0)),
                batch=float(data.get("batch", 0.0)),
                max_batch=_count(data.get("max_batch", 1)),
                compute=float(data.get("compute", 0.0)),
                network=float(data.get("network", 0.0)),
                bandwidth=float(data.get("bandwidth", 0.0)),
                bandwidth_source=str(data.get("bandwidth_source", "")),
                throughput_source=str(data.get("throughput_source", "")),
                moves=tuple(_move(m) for m in list(data.get("moves") or ())[-MAX_MOVES:]),
                model_name=announced_text(data.get("model_name", ""), MAX_NAME),
                reach=str(data.get("reach", "unknown")),
                relay=data.get("relay", False) is True,
                device=announced_text(data.get("device", ""), MAX_NAME),
                received=time.monotonic() if received is None else received,
            )
        except (KeyError, IndexError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"malformed server announcement: {exc!r}") from None
        if (info.state not in STATES or info.reach not in REACH or info.quant not in QUANTS or info.dtype not in DTYPES
                or not 0 <= info.weight_bytes < 2**62 or not 0 <= info.start < info.end or not 0 <= info.throughput < math.inf
                or not 0 < info.period <= 3600 or not 0 <= info.sessions < 2**31 or not 0 <= info.served < math.inf
                or not 0 <= info.queued < 2**31 or not 0 <= info.batch <= 1 << 16 or not 1 <= info.max_batch <= 1 << 16
                or not all(0 <= x < math.inf for x in (info.compute, info.network, info.bandwidth, info.capacity))
                or info.bandwidth_source not in BANDWIDTH_SOURCES or info.throughput_source not in THROUGHPUT_SOURCES
                or not all(math.isfinite(m[0]) and 0 <= m[1] < m[2] and 0 <= m[3] < m[4] for m in info.moves)):
            raise ValueError(f"malformed server announcement: state {info.state!r}, blocks {info.start}:{info.end}")
        return info


def _count(value) -> int:
    """A non-negative integer field of an announcement (not a float, string or bool)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}"[:200])
    return value


def _move(entry) -> tuple[float, int, int, int, int]:
    """One announced move, ``[time, from start, from end, to start, to end]``."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 5:
        raise ValueError(f"a move must be [time, from start, from end, to start, to end], got {entry!r}"[:200])
    return float(entry[0]), int(entry[1]), int(entry[2]), int(entry[3]), int(entry[4])


def parse_announcement(data: bytes | dict, sender: str) -> ServerInfo:
    """An announcement received from ``sender`` (msgpack bytes by gossip, or the dict of a direct
    ``announce`` frame). Raises ``ValueError`` for a malformed one, or one about another peer than
    its sender: no one speaks for someone else."""
    if isinstance(data, (bytes, bytearray)):
        try:
            data = msgpack.unpackb(data, raw=False)
        except (msgpack.UnpackException, ValueError, TypeError) as exc:
            raise ValueError(f"announcement is not valid msgpack ({type(exc).__name__})") from None
    info = ServerInfo.from_wire(data if isinstance(data, dict) else {})
    if info.peer_id != sender:
        raise ValueError(f"an announcement for {info.peer_id[-8:]} sent by {sender[-8:]}")
    return info


class PeerTable:
    """Servers of one model known to this peer. Not thread-safe: owned by one asyncio loop."""

    def __init__(self, model: str, num_blocks: int, period: float, expiry_periods: float = 3.0,
                 allowed: frozenset[PeerId] | None = None):
        self.model, self.num_blocks = model, num_blocks
        self.period, self.expiry_periods = period, expiry_periods
        self.allowed = allowed  # the peers that may serve (--allow-peers); None: any
        self._servers: dict[PeerId, ServerInfo] = {}

    def update(self, info: ServerInfo) -> bool:
        """Apply an announcement; returns whether it was taken. Ignored: another model, a range
        outside the model's blocks, a server not among the ``allowed``, and an earlier run of a
        server than the one in the table (so its offline announcement never removes a later run)."""
        if info.model != self.model or info.end > self.num_blocks:
            return False
        if self.allowed is not None and info.peer_id not in self.allowed:
            return False
        current = self._servers.get(info.peer_id)
        if current is not None and info.instance < current.instance:
            return False
        if current is None and len(self._servers) >= MAX_SERVERS:  # a flood of made-up peers
            return False
        if info.state != "offline":
            self._servers[info.peer_id] = info
        elif current is not None:  # that run, or a later one, leaves
            del self._servers[info.peer_id]
        else:
            return False
        return True

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._servers

    def remove(self, peer_id: PeerId) -> None:
        self._servers.pop(peer_id, None)

    def snapshot(self, now: float | None = None) -> dict[PeerId, ServerInfo]:
        """The live entries (expired ones are dropped first)."""
        now = time.monotonic() if now is None else now
        # each entry lives ``expiry_periods`` of its server's own announce period (at least ours)
        for peer_id in [
            p for p, s in self._servers.items() if now - s.received > self.expiry_periods * max(s.period, self.period)
        ]:
            del self._servers[peer_id]
        return dict(self._servers)

    def merge(self, infos: list[dict], now: float | None = None) -> None:
        """Seed from another peer's table (on joining); local entries win unless the other table
        knows a later run of that server; malformed entries are skipped."""
        if not isinstance(infos, list):
            return
        for data in infos:
            if not isinstance(data, dict):
                continue
            try:
                info = ServerInfo.from_wire(data, received=time.monotonic() if now is None else now)
            except ValueError:
                continue
            current = self._servers.get(info.peer_id)
            if current is None or info.instance > current.instance:
                self.update(info)


def coverage(
    servers: Mapping[PeerId, ServerInfo], num_blocks: int, states: tuple[str, ...] = ("online",)
) -> list[float]:
    """Total throughput serving each block (0 marks a gap), counting servers in ``states``.
    Servers are summed in peer-id order so the float sums are the same on every peer."""
    totals = [0.0] * num_blocks
    for peer_id in sorted(servers):
        s = servers[peer_id]
        if s.state in states:
            for b in range(s.start, min(s.end, num_blocks)):
                totals[b] += s.carries
    return totals


def gaps(servers: Mapping[PeerId, ServerInfo], num_blocks: int) -> list[tuple[int, int]]:
    """Maximal block ranges ``[start, end)`` that no online server covers."""
    covered = [False] * num_blocks + [True]
    for s in servers.values():
        if s.state == "online":
            covered[s.start : min(s.end, num_blocks)] = [True] * (min(s.end, num_blocks) - s.start)
    out, start = [], None
    for b, is_covered in enumerate(covered):
        if not is_covered and start is None:
            start = b
        elif is_covered and start is not None:
            out.append((start, b))
            start = None
    return out
