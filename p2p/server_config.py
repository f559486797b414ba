"""What one server runs with (:class:`ServerConfig`): the user's options resolved, and limits
no flag sets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from swarm.p2p.identity import Identity
from swarm.p2p.private import Membership
from swarm.p2p.serve_options import PEER_ADAPTER_MIB, PEER_SESSION_ADAPTER_MIB, SESSION_ADAPTER_MIB, ServeOptions
from swarm.p2p.wire import DEFAULT_MAX_FRAME

_DEFAULT = ServeOptions  # the defaults of the options a user gives (see swarm.p2p.serve_options)


@dataclass
class ServerConfig:
    """What one :class:`BlockServer` runs with: the user's options resolved (the model's directory,
    the identity claimed, limits in bytes; built by :meth:`ServeOptions.server_config
    <swarm.p2p.serve_options.ServeOptions.server_config>`, which checks them), and limits no flag
    sets. Tests build one directly to set a limit small."""

    model_dir: Path
    blocks: str = _DEFAULT.blocks  # "START:END" or "auto"
    num_blocks: int | None = None  # with auto; default: as many as fit in memory (see engine.memory)
    memory: float | None = None  # GB the server may use (blocks + KV budget); default: what is available
    choice_delay: float = _DEFAULT.choice_delay  # with auto: wait a random 0–this many seconds before choosing blocks
    bandwidth: float | None = None  # Mbit/s of the link; default: measured against a peer, else assumed
    dtype: str = _DEFAULT.dtype
    quant: str = _DEFAULT.quant  # none, int8 or nf4: the blocks' linears (engine/quant.py)
    device: str = _DEFAULT.device  # auto, cpu, cuda, cuda:N or a list of GPUs (engine/devices.py)
    cache_tokens: int = _DEFAULT.cache_tokens
    listen_host: str = _DEFAULT.host
    port: int = _DEFAULT.port
    announce_addrs: list[str] = field(default_factory=list)  # announced instead of the listen addresses (--announce-addr)
    identity: Path | Identity | None = None  # a key file, one claimed already, or None: a fresh key
    membership: Membership = field(default_factory=Membership)  # a private swarm's key, the servers allowed
    require_reachable: bool = False  # refuse to serve unless a peer dialed it back (p2p/nat.py)
    relay_slots: int = 16  # peers it relays for at once, while reachable itself (0: none; p2p/circuits.py)
    initial_peers: list[str] = field(default_factory=list)
    new_swarm: bool = False
    public_name: str = ""
    announce_period: float = _DEFAULT.announce_period
    idle_timeout: float = _DEFAULT.idle_timeout  # an open session idle this long is closed and its cache freed
    threads: int | None = None  # CPU threads for block computation (torch.set_num_threads, for the process)
    session_timeout: float = 1800.0  # no session lives longer than this (its cache is freed)
    request_timeout: float = _DEFAULT.request_timeout  # also each frame's deadline from its first byte (plus a second per MiB)
    open_timeout: float = _DEFAULT.open_timeout  # a session with no step this long after its open is closed (the client's step timeout: a chain opens all its sessions before its first step)
    max_batch: int = 64  # rows of one session or pass
    batch_steps: int = _DEFAULT.max_batch  # sessions whose steps run as one pass (--max-batch; 1: one at a time)
    max_frame: int = DEFAULT_MAX_FRAME
    frame_memory: int = _DEFAULT.frame_memory << 20  # bytes of frames in flight from all peers together
    peer_frame_memory: int = DEFAULT_MAX_FRAME + (64 << 20)  # ... and from one peer (at most frame_memory)
    max_peer_sessions: int = _DEFAULT.max_peer_sessions  # open inference sessions one peer may hold
    peer_cache_share: float = _DEFAULT.peer_cache_share  # the part of --cache-tokens one peer may hold
    max_stateless_tokens: int = 8192  # batch × length of one forward or backward pass
    throughput: str | float = _DEFAULT.throughput  # auto, eval or a number (see engine.throughput.parse_throughput)
    balance_period: float = _DEFAULT.balance_period  # with --blocks auto: check every random 0–2× this whether to move
    balance_quality: float = _DEFAULT.balance_quality  # move when the swarm's bottleneck grows more than 1/this (0: never move)
    drain_timeout: float = _DEFAULT.drain_timeout  # after a move, sessions on the old range may finish this long, then fail over
    adapter_memory: int = _DEFAULT.adapter_memory << 20  # bytes of clients' training adapters kept (by digest), from all peers
    peer_adapter_memory: int = PEER_ADAPTER_MIB << 20  # ... and for one peer (also the most one request may carry)
    max_adapter_bytes: int = SESSION_ADAPTER_MIB << 20  # adapter tensors one inference session may carry (with its open)
    peer_session_adapter_memory: int = PEER_SESSION_ADAPTER_MIB << 20  # ... that one peer's sessions may hold here together
    session_adapter_memory: int = _DEFAULT.session_adapter_memory << 20  # ... that all sessions may hold together

    def devices(self):
        """The devices ``device`` names here (``ValueError`` naming --device)."""
        from swarm.engine.devices import parse_device

        return parse_device(self.device)
