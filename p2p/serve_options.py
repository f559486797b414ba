"""A server's options as `swarm serve` takes them: the defaults, the rules and the derived limits,
in one place that the command, :class:`~swarm.p2p.server_handle.Server` and tests share.

Each field is named as its flag (``cache_tokens`` is ``--cache-tokens``) and in the flag's units
(GB, MiB, seconds), so a Python caller and a command-line user read the same one-line error, a
``ValueError`` naming the flag. :meth:`ServeOptions.server_config` then does what needs the
machine (claims the identity key, finds the model) and returns the server's own
:class:`~swarm.p2p.server.ServerConfig` (limits in bytes, the model resolved to a directory).

This module imports no torch or libp2p at load: the command reads its defaults from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

# MiB of adapters one peer may hold (at most the total the operator gives)
PEER_ADAPTER_MIB = 64  # clients' training adapters, kept by digest (also the most one request may carry)
PEER_SESSION_ADAPTER_MIB = 256  # held by one peer's inference sessions together
SESSION_ADAPTER_MIB = 64  # carried by one inference session (with its open)

MAX_BATCH = 256  # sessions in one batched pass, at most

# the options that are numbers: whole ones, and any (None: the option's automatic value)
WHOLE = ("relay_slots", "num_blocks", "port", "cache_tokens", "threads", "max_peer_sessions", "max_batch", "frame_memory",
         "adapter_memory", "session_adapter_memory")
NUMBERS = ("memory", "choice_delay", "bandwidth", "announce_period", "idle_timeout", "open_timeout", "request_timeout",
           "peer_cache_share", "balance_period", "balance_quality", "drain_timeout")
OPTIONAL = ("num_blocks", "memory", "bandwidth", "threads")


def check(ok: bool, flag: str, rule: str, value: object) -> None:
    """Raise ``ValueError`` naming ``flag`` and the rule its ``value`` breaks, unless ``ok``."""
    if not ok:
        raise ValueError(f"{flag} must be {rule}, got {value}")


def flag(name: str) -> str:
    """The flag of option ``name`` (``cache_tokens`` → ``--cache-tokens``)."""
    return "--" + name.replace("_", "-")


def check_seconds(flag: str, value: float, zero_ok: bool = False) -> None:
    """``value`` is a finite number of seconds, > 0 (or >= 0 with ``zero_ok``): a Python caller's
    ``"5"`` gets the flag's message, not a ``TypeError`` from a comparison."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = number and math.isfinite(value) and (value >= 0 if zero_ok else value > 0)
    check(ok, flag, "a number of seconds " + (">= 0" if zero_ok else "> 0"), value if number else repr(value))


def parse_blocks(spec: str, num_blocks: int | None = None) -> tuple[int, int] | None:
    """``"START:END"`` → (start, end); ``"auto"`` → None. With the model's ``num_blocks``, also
    checks the range is within it. Raises ``ValueError`` naming --blocks and what is wrong."""
    if spec == "auto":
        return None
    try:
        start, end = (int(x) for x in str(spec).split(":"))
    except ValueError:
        raise ValueError(f"--blocks must be START:END (e.g. 0:10) or auto, got {spec!r}") from None
    if start < 0:
        raise ValueError(f"--blocks {spec}: START must be at least 0")
    if start >= end:
        raise ValueError(f"--blocks {spec}: START must be less than END (END is exclusive: 0:4 is blocks 0 to 3)")
    if num_blocks is not None and end > num_blocks:
        raise ValueError(f"--blocks {spec}: this model has blocks 0:{num_blocks}")
    return start, end


def check_num_blocks(count: int | None, model_blocks: int) -> None:
    """``--num-blocks`` beyond the model's blocks is refused, not cut down: the user asked for a
    server that cannot exist (the count that fits in --memory, a guess, is cut down silently)."""
    check(count is None or count >= 1, "--num-blocks", "at least 1", count)
    check(count is None or count <= model_blocks, "--num-blocks", f"at most this model's {model_blocks} blocks", count)


def build_options(cls, options: dict):
    """``cls(**options)`` for a Python caller's keywords: ``TypeError`` listing the options for a
    name that is none of ``cls``' fields (as a function would), else what ``cls`` raises."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"unknown option {', '.join(unknown)} (options: {', '.join(sorted(names))})")
    return cls(**options)


def split_peers(values) -> tuple[str, ...]:
    """Repeated flags and comma- or space-separated lists (the environment's form) alike, each
    checked (:func:`~swarm.p2p.addresses.check_initial_peer`: ValueError naming --initial-peers)."""
    from swarm.p2p.addresses import check_initial_peer

    if isinstance(values, str):
        values = [values]
    return tuple(check_initial_peer(p) for v in values or () for p in str(v).replace(",", " ").split())


@dataclass(frozen=True)
class ServeOptions:
    """`swarm serve`'s options (see the module's docstring; the flags' help says what each does).

    ``model``: the default model's name (None: the default model), a checkpoint directory or a Hub
    repo id. ``blocks``: ``"START:END"`` (end exclusive) or ``"auto"``. ``memory``: GB; the
    ``*_memory`` limits: MiB. ``identity``: a key file (None: one under ``$SWARM_HOME``).
    ``throughput``: ``"auto"``, ``"eval"`` or tokens/s (a number, or its text)."""

    model: str | None = None
    blocks: str = "auto"
    num_blocks: int | None = None
    memory: float | None = None
    choice_delay: float = 5.0
    port: int = 0
    host: str = "127.0.0.1"
    announce_addr: tuple[str, ...] = ()
    initial_peers: tuple[str, ...] = ()
    new_swarm: bool = False
    identity: Path | None = None
    dtype: str = "float32"
    quant: str = "none"
    device: str = "auto"  # where the blocks compute (auto: a GPU where there is one; engine/devices.py)
    cache_tokens: int = 32768
    public_name: str = ""
    announce_period: float = 5.0
    idle_timeout: float = 300.0
    threads: int | None = None
    open_timeout: float = 60.0
    request_timeout: float = 30.0
    peer_cache_share: float = 0.5
    max_peer_sessions: int = 32
    max_batch: int = 32
    frame_memory: int = 1024
    throughput: str | float = "auto"
    bandwidth: float | None = None
    balance_period: float = 60.0
    balance_quality: float = 0.75
    drain_timeout: float = 60.0
    adapter_memory: int = 256
    session_adapter_memory: int = 1024
    swarm_key: Path | None = None  # a private swarm's key file (None: $SWARM_KEY_FILE, else an open swarm)
    allow_peers: Path | None = None  # a file of the peer ids allowed to serve
    require_reachable: bool = False  # refuse to serve unless a peer could dial it back
    relay_slots: int = 16  # peers it relays for at once while reachable (see p2p/circuits.py)
    no_relay: bool = False  # relay for nobody (--relay-slots 0)

    def __post_init__(self):
        set_ = object.__setattr__
        if self.model is not None:
            set_(self, "model", str(self.model))
        for name in ("identity", "swarm_key", "allow_peers"):
            if getattr(self, name) is not None:
                set_(self, name, Path(getattr(self, name)).expanduser())
        set_(self, "announce_addr", (self.announce_addr,) if isinstance(self.announce_addr, str) else
             tuple(self.announce_addr or ()))
        set_(self, "initial_peers", split_peers(self.initial_peers))
        self._check()

    def _check(self) -> None:
        for name in WHOLE + NUMBERS:  # a Python caller's "4096" gets the flag's name too, not a TypeError
            value = getattr(self, name)
            if value is None and name in OPTIONAL:
                continue
            whole = name in WHOLE
            if not isinstance(value, int if whole else (int, float)) or isinstance(value, bool):
                raise ValueError(f"{flag(name)} must be {'a whole number' if whole else 'a number'}, got {value!r}")
            if not whole:
                object.__setattr__(self, name, float(value))  # as the flag parses it: 0 is 0.0
        n, m, b = self.num_blocks, self.memory, self.bandwidth
        check(n is None or n >= 1, "--num-blocks", "at least 1", n)
        check(m is None or 0 < m < math.inf, "--memory", "a positive number of GB", m)
        check_seconds("--choice-delay", self.choice_delay, zero_ok=True)
        check(b is None or 0 < b < math.inf, "--bandwidth", "a positive number of Mbit/s", b)
        check(0 <= self.port <= 65535, "--port", "between 0 and 65535 (0: any free port)", self.port)
        check(self.identity is None or not self.identity.is_dir(), "--identity", "a key file, not a directory", self.identity)
        check(self.cache_tokens >= 1, "--cache-tokens", "at least 1", self.cache_tokens)
        check_seconds("--announce-period", self.announce_period)
        check_seconds("--idle-timeout", self.idle_timeout)
        check(self.threads is None or self.threads >= 1, "--threads", "at least 1", self.threads)
        check_seconds("--open-timeout", self.open_timeout)
        check_seconds("--request-timeout", self.request_timeout)
        check(0 < self.peer_cache_share <= 1, "--peer-cache-share", "a fraction in (0, 1]", self.peer_cache_share)
        check(self.max_peer_sessions >= 1, "--max-peer-sessions", "at least 1", self.max_peer_sessions)
        check(1 <= self.max_batch <= MAX_BATCH, "--max-batch", f"between 1 and {MAX_BATCH}", self.max_batch)
        check(self.frame_memory >= 1, "--frame-memory", "at least 1 (MiB)", self.frame_memory)
        check(0 <= self.relay_slots <= 1024, "--relay-slots", "between 0 and 1024 (0: relay for nobody)", self.relay_slots)
        from swarm.engine.checkpoint import parse_dtype
        from swarm.engine.quant import bnb, parse_quant
        from swarm.engine.throughput import parse_throughput

        from swarm.engine.devices import check_dtype, parse_device

        check_dtype(parse_device(self.device), parse_dtype(self.dtype))  # ValueError naming --device or --dtype
        if parse_quant(self.quant) != "none":
            bnb()  # a missing bitsandbytes is one line now, not an error after the model loads
        object.__setattr__(self, "throughput", parse_throughput(self.throughput))
        check_seconds("--balance-period", self.balance_period)
        q = self.balance_quality
        check(0 <= q <= 1, "--balance-quality", "between 0 and 1 (0: never move)", q)
        check_seconds("--drain-timeout", self.drain_timeout, zero_ok=True)
        check(self.adapter_memory >= 1, "--adapter-memory", "at least 1 (MiB)", self.adapter_memory)
        mib = self.session_adapter_memory
        check(mib >= 1, "--session-adapter-memory", "at least 1 (MiB)", mib)
        fixed = parse_blocks(self.blocks)
        if fixed is not None and n is not None:
            raise ValueError(f"--num-blocks is for --blocks auto; --blocks {self.blocks} says how many already "
                             "(drop one of the two)")
        if not self.initial_peers and not self.new_swarm:
            raise ValueError("give --initial-peers (a multiaddr printed by another server) or --new-swarm to start one")
        self.membership()  # a key or list that cannot be read: one line now

    def membership(self):
        """The private swarm's :class:`~swarm.p2p.private.Membership` from ``swarm_key`` and
        ``allow_peers`` (``ValueError`` naming the flag and the file)."""
        from swarm.p2p.private import Membership

        return Membership.from_files(self.swarm_key, self.allow_peers)

    @classmethod
    def build(cls, **options) -> ServeOptions:
        """The options of a Python caller: ``TypeError`` for a name that is not an option (as a
        function would), ``ValueError`` naming the flag for a bad value."""
        return build_options(cls, options)

    def server_config(self):
        """The server's :class:`~swarm.p2p.server.ServerConfig`, once the machine allows it: the
        identity key claimed (refused at once when another process holds it), ``$SWARM_HOME``
        usable where the server writes there (the default identity, the throughput cache), each
        ``--announce-addr`` checked against the peer id, the model found (fetched if need be) and
        ``--blocks``/``--num-blocks`` checked against its blocks.

        Raises ``ValueError`` (a bad ``--announce-addr``, a range the model cannot have, an
        unusable home, a damaged checkpoint),
        :class:`~swarm.p2p.identity.IdentityInUseError`, ``OSError`` or
        :class:`~swarm.engine.client.ModelNotAvailableError`; nothing stays claimed then."""
        from swarm.engine.checkpoint import Checkpoint
        from swarm.engine.client import resolve_model
        from swarm.engine.default_model import usable_home
        from swarm.p2p.addresses import check_announce_addr
        from swarm.p2p.identity import claim_default_identity, claim_identity
        from swarm.p2p.server import ServerConfig

        home = usable_home() if self.identity is None or isinstance(self.throughput, str) else None
        key = claim_identity(self.identity) if self.identity else claim_default_identity(home)
        try:
            announce = list(dict.fromkeys(check_announce_addr(a, key.peer_id) for a in self.announce_addr))
            membership = self.membership()
            if not membership.may_serve(key.peer_id):
                raise ValueError(f"--allow-peers: this server's peer id {key.peer_id} is not in {self.allow_peers} "
                                 "(add it, or the other members will ignore this server)")
            model_dir = resolve_model(self.model)
            model_blocks = Checkpoint(model_dir).num_blocks  # a range this model cannot have: refused now
            if parse_blocks(self.blocks, model_blocks) is None:
                check_num_blocks(self.num_blocks, model_blocks)
        except BaseException:
            key.release()
            raise
        return ServerConfig(
            model_dir=model_dir,
            blocks=self.blocks,
            num_blocks=self.num_blocks,
            memory=self.memory,
            choice_delay=self.choice_delay,
            bandwidth=self.bandwidth,
            dtype=self.dtype,
            quant=self.quant,
            device=self.device,
            cache_tokens=self.cache_tokens,
            listen_host=self.host,
            port=self.port,
            announce_addrs=announce,
            identity=key,
            membership=membership,
            require_reachable=self.require_reachable,
            relay_slots=0 if self.no_relay else self.relay_slots,
            initial_peers=list(self.initial_peers),
            new_swarm=self.new_swarm,
            public_name=self.public_name,
            announce_period=self.announce_period,
            idle_timeout=self.idle_timeout,
            threads=self.threads,
            open_timeout=self.open_timeout,
            request_timeout=self.request_timeout,
            peer_cache_share=self.peer_cache_share,
            max_peer_sessions=self.max_peer_sessions,
            batch_steps=self.max_batch,
            frame_memory=self.frame_memory << 20,
            throughput=self.throughput,
            balance_period=self.balance_period,
            balance_quality=self.balance_quality,
            drain_timeout=self.drain_timeout,
            adapter_memory=self.adapter_memory << 20,
            peer_adapter_memory=min(PEER_ADAPTER_MIB, self.adapter_memory) << 20,
            session_adapter_memory=self.session_adapter_memory << 20,
            peer_session_adapter_memory=min(PEER_SESSION_ADAPTER_MIB, self.session_adapter_memory) << 20,
            max_adapter_bytes=min(SESSION_ADAPTER_MIB, self.session_adapter_memory) << 20,
        )
