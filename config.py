"""The client's options, one config for every way in: `swarm generate`, `swarm finetune`, `swarm api`
and :func:`swarm.open` build a :class:`ClientOptions` and get the same checks and the same one-line
messages, each naming the flag to change (a field's flag is its name in kebab case: ``step_timeout``
is ``--step-timeout``), so a Python user and a command-line user read the same error.

Generation's options (``max_new_tokens``, ``temperature``...) are :func:`sampling`'s, by the same rule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from swarm.p2p.serve_options import build_options, check, check_seconds  # noqa: F401  (one set of rules' helpers)
from swarm.p2p.serve_options import split_peers as split_server_peers

ENV_PEERS = "SWARM_INITIAL_PEERS"


def split_peers(values: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Initial peers as a list: repeated flags, and comma- or space-separated lists (the
    environment's form) alike, each checked (:func:`~swarm.p2p.addresses.check_initial_peer`)."""
    return list(split_server_peers(values))


def env_peers() -> list[str]:
    """The initial peers of ``SWARM_INITIAL_PEERS``, checked (an empty list without it)."""
    return split_peers(os.environ.get(ENV_PEERS, ""))


@dataclass(frozen=True)
class ClientOptions:
    """How a client reaches the model: where the checkpoint is, the swarm (or ``local``), its
    timeouts and what it accepts from servers. Raises ``ValueError`` naming the flag of a value out
    of range (see the module's docstring).

    ``model``: the default model's name (None: the default model), a checkpoint directory or a Hub
    repo id. ``initial_peers``: multiaddrs printed by `swarm serve`. ``dtype``: the client's head
    (and with ``local`` the blocks'). ``adapter``: an adapter directory (LoRA or prompt tuning by
    peft or `swarm finetune`, or a swarm deep prompt). ``step_timeout``: seconds to wait for a
    server's reply. ``timeout``: seconds to wait for servers covering every block. ``push``:
    servers hand each step straight to the next of the chain. ``no_quant_servers``: only servers
    whose weights are not quantized. ``wire_dtype``: hidden states on the wire (auto, float32,
    bfloat16, int8). ``quant``/``quant_blocks`` (``local`` only): quantize these blocks' linears as
    servers with ``--quant`` would. ``swarm_key``: a private swarm's key file (None:
    ``$SWARM_KEY_FILE``); ``allow_peers``: a file of the peer ids allowed to serve (see
    :mod:`swarm.p2p.private`). ``verify``: spot checks of the servers' outputs, ``off``, ``sample``
    (the first steps with each server, then ``verify_rate`` of them) or ``strict`` (every step);
    see :mod:`swarm.p2p.checking`."""

    model: str | None = None
    initial_peers: tuple[str, ...] = ()
    local: bool = False
    dtype: str = "float32"
    adapter: Path | None = None
    step_timeout: float = 60.0
    timeout: float = 30.0
    push: bool = True
    no_quant_servers: bool = False
    wire_dtype: str = "auto"
    quant: str = "none"
    quant_blocks: str | None = None
    swarm_key: Path | None = None
    allow_peers: Path | None = None
    verify: str = "sample"
    verify_rate: float = 0.05
    device: str = "auto"

    def __post_init__(self):
        from swarm.engine.checkpoint import parse_dtype
        from swarm.p2p.compression import WIRE_CHOICES

        set_ = object.__setattr__
        set_(self, "initial_peers", tuple(split_peers(self.initial_peers)))
        if self.model is not None:
            set_(self, "model", str(self.model))
        for name in ("adapter", "swarm_key", "allow_peers"):
            if getattr(self, name) is not None:
                set_(self, name, Path(getattr(self, name)).expanduser())
        for name in ("step_timeout", "timeout"):  # as the flags parse them: -1 is -1.0
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                set_(self, name, float(value))
        check_seconds("--step-timeout", self.step_timeout)
        check_seconds("--timeout", self.timeout, zero_ok=True)
        check(self.wire_dtype in WIRE_CHOICES, "--wire-dtype", "one of " + ", ".join(WIRE_CHOICES), self.wire_dtype)
        from swarm.engine.devices import check_dtype

        check_dtype(self.devices(), parse_dtype(self.dtype))  # ValueError naming --device or --dtype
        self.verify_policy()  # ValueError naming --verify or --verify-rate
        self.quantized()  # checks --quant and --quant-blocks
        if self.local and (self.no_quant_servers or self.wire_dtype != "auto"):
            which = "--no-quant-servers" if self.no_quant_servers else "--wire-dtype"
            raise ValueError(f"{which} is about the servers of a swarm run; a --local run has none (drop one of the two)")
        if not self.local:
            self.membership()  # a key or list that cannot be read: one line now

    def membership(self):
        """The private swarm's :class:`~swarm.p2p.private.Membership` from ``swarm_key`` (None:
        ``$SWARM_KEY_FILE``, else an open swarm) and ``allow_peers`` (``ValueError`` naming the flag
        and the file)."""
        from swarm.p2p.private import Membership

        return Membership.from_files(self.swarm_key, self.allow_peers)

    @classmethod
    def build(cls, **options) -> ClientOptions:
        """The options of a Python caller: ``TypeError`` for a name that is not an option (as a
        function would), ``ValueError`` naming the flag for a bad value."""
        return build_options(cls, options)

    def devices(self):
        """Where the head (and with ``local`` the blocks) compute: ``device`` parsed
        (``ValueError`` naming --device)."""
        from swarm.engine.devices import parse_device

        return parse_device(self.device)

    @property
    def torch_dtype(self):
        from swarm.engine.checkpoint import parse_dtype

        return parse_dtype(self.dtype)

    def quantized(self) -> range | str | None:
        """The blocks a local run quantizes: "all", a range, or None (no ``quant``). Raises
        ``ValueError`` naming the flag for a bad value or one that needs ``local``."""
        from swarm.engine.quant import bnb, parse_quant

        if parse_quant(self.quant) == "none":
            if self.quant_blocks is not None:
                raise ValueError("--quant-blocks needs --quant int8 or nf4")
            return None
        if not self.local:
            raise ValueError(
                "--quant quantizes the blocks of a --local run; servers choose their own with `swarm serve --quant`"
            )
        bnb()  # QuantUnavailableError: one line naming what to install
        if self.quant_blocks is None:
            return "all"
        try:
            start, end = (int(x) for x in self.quant_blocks.split(":"))
        except ValueError:
            raise ValueError(f"--quant-blocks must be START:END (e.g. 0:10), got {self.quant_blocks!r}") from None
        if not 0 <= start < end:
            raise ValueError(f"--quant-blocks {self.quant_blocks}: START must be less than END, both at least 0")
        return range(start, end)

    def verify_policy(self):
        from swarm.p2p.verify import VerifyPolicy

        return VerifyPolicy(self.verify, float(self.verify_rate))

    def client_config(self):
        """The swarm client's own config (:class:`~swarm.p2p.client.ClientConfig`)."""
        from swarm.engine.default_model import swarm_home
        from swarm.p2p.client import ClientConfig

        return ClientConfig(
            initial_peers=list(self.initial_peers), step_timeout=self.step_timeout, wait_timeout=self.timeout,
            push=self.push, full_precision=self.no_quant_servers, wire_dtype=self.wire_dtype,
            membership=self.membership(), verify=self.verify_policy(), ledger=swarm_home() / "verify.json",
        )

    def with_env_peers(self) -> ClientOptions:
        """These options, with ``SWARM_INITIAL_PEERS``'s peers when none are given."""
        if self.initial_peers or self.local:
            return self
        return replace(self, initial_peers=tuple(env_peers()))


def sampling(
    max_new_tokens: int = 32,
    sample: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    repetition_penalty: float = 1.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    eos_token_ids: tuple[int, ...] = (),
    draft: str = "auto",
    draft_tokens: int = 0,
):
    """How to pick tokens, as `swarm generate`'s flags say it: greedy unless ``sample`` or any of
    ``temperature``, ``top_k``, ``top_p`` is given (they imply sampling), beam search with
    ``num_beams > 1``; ``draft``: speculative decoding (``auto``: n-gram drafts wherever they pay;
    beam search never drafts). Returns a :class:`~swarm.engine.generation.GenerationConfig`;
    ``ValueError`` naming the flag of a value out of range."""
    from swarm.engine.generation import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample or any(v is not None for v in (temperature, top_k, top_p)),
        temperature=temperature if temperature is not None else 1.0,
        top_k=top_k or 0,
        top_p=top_p if top_p is not None else 1.0,
        repetition_penalty=repetition_penalty,
        num_beams=num_beams,
        length_penalty=length_penalty,
        seed=seed,
        eos_token_ids=tuple(eos_token_ids),
        draft="none" if draft == "auto" and num_beams > 1 else draft,
        draft_tokens=draft_tokens,
    )
