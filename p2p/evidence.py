"""Evidence of a lie that other peers can check: signed replies, accusations gossiped, and the
recomputation that decides whether an accusation stands.

**Signatures.** A server signs every forward and backward reply with its libp2p key (Ed25519, the
key its peer id is made of) over :func:`pass_digest`: the model, the kind of pass, the blocks, the
wire dtype, the adapter named (digest and spec) and the bytes of every tensor in the request and
the reply, as the server decoded and encoded them. About 20 µs and a hash of the tensors; anyone
holding the reply and the peer id can check it (:func:`signed_by`), and nobody else can make one.

**Accusations.** A client that catches a server lying (:mod:`swarm.p2p.checking`,
:mod:`swarm.p2p.pass_checks`) asks it a stateless forward of the inputs it lied on (the first
positions up to the first wrong one, one row, float32: at most :data:`MAX_EVIDENCE_BYTES`),
compares the signed reply with other servers' (or its own copy of the blocks) and, if it is a lie
again, publishes it on the model's evidence topic (:class:`Evidence`): the inputs, the signed
output, the signature. A liar that answers that forward honestly leaves no evidence (it stays
banned by that client only).

**Acceptance.** A server that receives an accusation checks the signature (a forged one: ignored)
and, where it holds the blocks, recomputes the forward itself (one at a time, at most one per
:data:`RECOMPUTE_INTERVAL` seconds, as training work: inference first) and compares within the
tolerance of the accused's announced precision and its own. Only a signed output its own
computation contradicts bans the accused, in this machine's ledger (so its clients too route
around it). Evidence whose recomputation agrees with the signed output bans nobody, so peers that
make up accusations (Sybils) can get no honest server banned; a server that does not hold the
blocks takes no side.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from dataclasses import dataclass

import msgpack
import torch

log = logging.getLogger("swarm.evidence")

EVIDENCE_WIRE = "float32"  # the dtype an accusation's forward travels in (bfloat16's rounding would hide small lies)
MAX_EVIDENCE_BYTES = 900_000  # an accusation's size (gossipsub drops messages over 1 MiB)
RECOMPUTE_INTERVAL = 10.0  # s: a server recomputes at most one accusation this often
SEEN = 1024  # accusations remembered (by digest) so each is judged once
EVIDENCE_QUEUE = 8  # accusations a server holds unread (about 7 MB at most); a flood beyond is dropped


def evidence_topic(model: str) -> str:
    return f"/swarm/{model}/evidence"


def _update(h, t: torch.Tensor) -> None:
    t = t.detach().contiguous()
    h.update(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def pass_digest(model: str, kind: str, start: int, end: int, wire: str, adapter: dict | None,
                inputs: list[torch.Tensor], outputs: list[torch.Tensor], precision: tuple[str, str]) -> bytes:
    """What a server signs for a forward or backward reply (see the module's docstring); its
    ``precision`` (dtype, quant) included, so a reply is judged by the precision it was made with."""
    h = hashlib.blake2b(digest_size=32, person=b"swarm-pass-v1")
    meta = {"digest": adapter.get("digest"), "spec": adapter.get("spec")} if isinstance(adapter, dict) else None
    h.update(msgpack.packb([model, kind, int(start), int(end), wire, meta, list(precision)]))
    for t in inputs:
        _update(h, t)
    h.update(b"->")
    for t in outputs:
        _update(h, t)
    return h.digest()


def signed_by(peer_id: str, digest: bytes, signature) -> bool:
    """Whether ``signature`` is ``peer_id``'s over ``digest`` (False for anything malformed)."""
    from libp2p.peer.id import ID

    if not isinstance(signature, bytes) or not isinstance(peer_id, str):
        return False
    try:
        return bool(ID.from_base58(peer_id).extract_public_key().verify(digest, signature))
    except Exception:  # not a peer id with an inlined key, a bad point, a bad length...
        return False


@dataclass
class Evidence:
    """A signed forward reply said to be a lie: ``accused`` returned ``output`` (signed:
    ``signature``) for ``inputs`` ``[1, n, hidden]`` through blocks ``[start, end)`` of ``model``,
    both float32 (:data:`EVIDENCE_WIRE`); ``reason`` is the accuser's account."""

    model: str
    accused: str
    start: int
    end: int
    inputs: torch.Tensor
    output: torch.Tensor
    signature: bytes
    precision: tuple[str, str] = ("float32", "none")  # the accused's (dtype, quant), as it signed
    reason: str = ""

    def digest(self) -> bytes:
        return pass_digest(self.model, "forward", self.start, self.end, EVIDENCE_WIRE, None, [self.inputs], [self.output],
                           self.precision)

    def to_bytes(self) -> bytes:
        return msgpack.packb({
            "model": self.model, "accused": self.accused, "start": self.start, "end": self.end,
            "shape": list(self.inputs.shape), "inputs": _raw(self.inputs), "output": _raw(self.output),
            "signature": self.signature, "precision": list(self.precision), "reason": self.reason[:500],
        })

    @classmethod
    def from_bytes(cls, data: bytes, hidden_size: int) -> Evidence:
        """Parse an accusation; ``ValueError`` for anything malformed or too large."""
        if len(data) > MAX_EVIDENCE_BYTES + 4096:
            raise ValueError(f"an accusation of {len(data)} bytes")
        try:
            d = msgpack.unpackb(data, raw=False)
            shape = [int(n) for n in d["shape"]]
            fields = (d["model"], d["accused"], int(d["start"]), int(d["end"]), d["inputs"], d["output"], d["signature"])
            reason = str(d.get("reason", ""))[:500]
            dtype, quant = (str(v)[:16] for v in d["precision"])
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
            raise ValueError(f"not an accusation: {exc}") from None
        model, accused, start, end, raw_in, raw_out, signature = fields
        if not (isinstance(model, str) and isinstance(accused, str) and isinstance(signature, bytes)
                and isinstance(raw_in, bytes) and isinstance(raw_out, bytes)):
            raise ValueError("an accusation's fields have the wrong types")
        if len(shape) != 3 or shape[0] != 1 or not 1 <= shape[1] <= 1 << 16 or shape[2] != hidden_size or not 0 <= start < end:
            raise ValueError(f"an accusation of shape {shape} for blocks {start}:{end}")
        size = 4 * shape[1] * shape[2]
        if len(raw_in) != size or len(raw_out) != size:
            raise ValueError("an accusation's tensors do not match its shape")
        inputs = _tensor(raw_in, shape)
        if not torch.isfinite(inputs).all():  # an honest server's answer to NaN is NaN: no evidence of anything
            raise ValueError("an accusation with inputs that are not finite")
        return cls(model, accused, start, end, inputs, _tensor(raw_out, shape), signature, (dtype, quant), reason)


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().float().contiguous().numpy().tobytes()


def _tensor(raw: bytes, shape: list[int]) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(shape)


def evidence_positions(hidden_size: int) -> int:
    """The most positions an accusation carries (inputs and output, float32, in MAX_EVIDENCE_BYTES)."""
    return max(1, MAX_EVIDENCE_BYTES // (8 * hidden_size))


class Recomputations:
    """A server's judge of accusations: which were judged, when it may recompute again, and
    whom it logged about lately (a flood of accusations must not flood its log)."""

    def __init__(self, interval: float = RECOMPUTE_INTERVAL):
        self.interval = interval
        self.seen: dict[bytes, None] = {}
        self.next_at = 0.0
        self.logged: dict[str, float] = {}  # sender -> when its last accusation was logged loudly

    def judged(self, digest: bytes) -> bool:
        """Whether an accusation of ``digest`` was judged already (else it is, from now on)."""
        if digest in self.seen:
            return True
        self.seen[digest] = None
        while len(self.seen) > SEEN:
            self.seen.pop(next(iter(self.seen)))
        return False

    def wait(self, now: float | None = None) -> float:
        """Seconds to wait before the next recomputation (and takes its slot)."""
        now = time.monotonic() if now is None else now
        left = max(0.0, self.next_at - now)
        self.next_at = now + left + self.interval
        return left

    def loud(self, sender: str, now: float | None = None) -> bool:
        """Whether to log ``sender``'s accusation as a warning (one a minute per sender)."""
        now = time.monotonic() if now is None else now
        if now - self.logged.get(sender, -math.inf) < 60:
            return False
        self.logged[sender] = now
        while len(self.logged) > SEEN:
            self.logged.pop(next(iter(self.logged)))
        return True


async def judge(server, sender: str, data: bytes, judged: Recomputations) -> str:
    """Decide an accusation ``server`` received from ``sender``; returns what it did, for the log:
    banned, does not hold up (recomputation agrees with the signed output), or why it took no side.

    Only accusations against a server the table lists for those blocks are recomputed (a peer
    that signs its own "lies" under fresh keys gets nothing judged), each once, one at a time
    and at most one per :data:`RECOMPUTE_INTERVAL` (the next waits: the subscription's small
    queue drops what a flood adds meanwhile)."""
    from swarm.engine.adapters import run_forward
    from swarm.engine.default_model import swarm_home
    from swarm.engine.quant import quantization
    from swarm.p2p.ledger import Ledger
    from swarm.p2p.verify import Precision, disagreement, tolerance

    try:
        ev = Evidence.from_bytes(data, server.checkpoint.config.hidden_size)
    except ValueError as exc:
        return f"malformed ({exc})"
    if ev.model != server.model or ev.accused == server.peer_id:
        return "not for this server"
    if not server.start_block <= ev.start < ev.end <= server.end_block or server.blocks is None:
        return "blocks not held here"
    accused = server.table.snapshot().get(ev.accused)
    if accused is None or not accused.start <= ev.start < ev.end <= accused.end:
        return f"against {ev.accused[-8:]}, which does not serve blocks {ev.start}:{ev.end}: ignored"
    digest = await asyncio.to_thread(ev.digest)
    if not signed_by(ev.accused, digest, ev.signature):
        return f"against {ev.accused[-8:]}: has a bad signature: ignored"
    if judged.judged(digest):
        return "judged already"
    if not torch.isfinite(ev.output).all():
        return f"against {ev.accused[-8:]}: its output is not finite (no evidence an honest computation differs): ignored"
    await asyncio.sleep(judged.wait())
    blocks = server.check_range(ev.start, ev.end)
    # as the accused got it: a forward request of these inputs
    mine = await server.compute(run_forward, blocks, ev.inputs, None, None, None, peer=sender, kind="pass")
    if not torch.isfinite(mine).all():
        return f"against {ev.accused[-8:]}: not finite here either: ignored"
    theirs = Precision(*ev.precision, EVIDENCE_WIRE)
    ours = Precision(server.cfg.dtype, quantization(server.blocks), "float32")
    error = float(disagreement(ev.inputs, ev.output, mine).max())
    limit = tolerance(theirs, ours)
    if error <= limit:
        return f"against {ev.accused[-8:]}: does not hold up (recomputed here: error {error:.3g} ≤ {limit:.3g}): ignored"
    reason = (f"signed a wrong forward result for blocks {ev.start}:{ev.end} (error {error:.3g}, recomputed by "
              f"this server from evidence {sender[-6:]} published)")
    Ledger(swarm_home() / "verify.json").ban(ev.accused, reason)
    return f"against {ev.accused[-8:]}: banned: it {reason}"


async def ask_forward(client, peer: str, start: int, end: int, x: torch.Tensor, wire: str = EVIDENCE_WIRE,
                      timeout: float = 30.0):
    """``peer``'s signed forward of ``x`` through blocks ``[start, end)``: (the input as sent, its
    output, its signature or None, the precision it signed with)."""
    from swarm.p2p import protocols
    from swarm.p2p.compression import pack
    from swarm.p2p.wire import Frame, expect, read_frame, write_frame

    sent = pack(x, wire)
    stream = await client.host.open_stream(peer, protocols.FORWARD, timeout=timeout)
    try:
        await write_frame(stream, Frame("forward", {"start": start, "end": end, "wire": wire}, [sent]), timeout=timeout)
        reply = expect(await read_frame(stream, timeout=timeout), "result")
    finally:
        await stream.close()
    out = reply.tensors[0]
    if out.shape != x.shape:
        raise ValueError(f"a forward result of shape {list(out.shape)} for {list(x.shape)}")
    precision = reply.fields.get("prec")
    if not (isinstance(precision, list) and len(precision) == 2 and all(isinstance(p, str) for p in precision)):
        precision = ["float32", "none"]
    return sent, out, reply.fields.get("sig"), (precision[0], precision[1])


def stand_in(inputs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Random hidden states with the norms of ``inputs``' positions: what an accusation carries
    instead of the user's own (from which the text could be recovered)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(inputs.shape, generator=g)
    return noise * (inputs.float().norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12))


async def accuse(client, peer: str, start: int, end: int, inputs: torch.Tensor, reason: str) -> str:
    """Gather evidence that ``peer`` lies on blocks ``[start, end)`` (``inputs`` ``[1, n, hidden]``:
    what it was caught on) and publish it if its signed answer is a lie again; returns what was
    done. The forward asked carries random stand-ins of the inputs' length and norms (see
    :func:`stand_in`), never the user's own. Other servers of the blocks (or this machine's copy,
    ``client.arbiter``) are the reference."""
    from swarm.p2p.verify import Precision, disagreement, tolerance, worst

    x = stand_in(inputs[:1, : evidence_positions(inputs.shape[-1])])
    sent, claimed, signature, signed = await ask_forward(client, peer, start, end, x)
    digest = pass_digest(client.model, "forward", start, end, EVIDENCE_WIRE, None, [sent], [claimed], signed)
    if not signed_by(peer, digest, signature):
        return "no valid signature (a server from before signatures, or a liar that does not sign)"
    reference, precision = None, None
    try:
        spans = await client.route(start, end, wait=False, exclude={peer} | client.ledger.banned() | client.banned())
        y, precs = sent.float(), []
        for span in spans:
            _, y, _, (dtype, quant) = await ask_forward(client, span.peer_id, span.start, span.end, y)
            precs.append(Precision(dtype, quant))
        reference, precision = y, worst(precs)
    except Exception as exc:
        if client.arbiter is None:
            return f"no reference to compare with ({exc})"
    if reference is None:
        reference = await asyncio.to_thread(client.arbiter, start, end, sent.float(), None)
        precision = Precision()
    error = float(disagreement(sent.float(), claimed, reference).max())
    if error <= tolerance(Precision(*signed, EVIDENCE_WIRE), precision):
        return "it answered the evidence forward honestly: nothing to publish"
    ev = Evidence(client.model, peer, start, end, sent, claimed, signature, signed, reason)
    await client.host.publish(evidence_topic(client.model), ev.to_bytes())
    log.warning("published evidence that %s lies on blocks %d:%d", peer[-8:], start, end)
    return "published"
