"""The wire format: length-prefixed frames of a msgpack header followed by raw tensor bytes.

    frame  = u32 body_length (big-endian) · body
    body   = u16 header_length · header (msgpack map) · tensor bytes
    header = {"v": PROTOCOL_VERSION, "kind": str, ...fields, "tensors": [entry, ...]}
    entry  = [dtype, shape]                  raw tensor bytes (dtype in WIRE_DTYPES)
           | ["int8b", shape, block_size]    blockwise int8: float32 scales, then int8 values

Tensor bytes follow the header back to back, in the order listed, and are written straight from
the tensor's memory (no copy into a msgpack object). ``int8b`` entries (see
:mod:`swarm.p2p.compression`) are decoded to float32 on arrival. A frame whose length exceeds
the reader's maximum, whose tensors would decode to more than that maximum, whose header is not
a valid msgpack map of a known kind and version, or whose tensor table does not add up to the
body is refused with :class:`WireError`; the caller answers with an ``error`` frame and ends
that stream, other streams are untouched. Old peers refuse ``int8b`` entries (an unknown dtype)
rather than misread them, so the protocol version is unchanged.
"""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NewType

import msgpack
import torch
import trio

from swarm.p2p.compression import MAX_BLOCK, Int8Blocks, block_size_for, int8_from_bytes, int8_nbytes
from swarm.p2p.host import MessageTooLargeError, P2PError, P2PTimeoutError
from swarm.p2p.limits import FrameBudget, FrameBudgetError, Grant

PROTOCOL_VERSION = 4  # 2: pushed steps carry a trail; a server that pushed does not reply. 3: adapters. 4: speculative steps (per_position, steps that cut the cache back)
DEFAULT_MAX_FRAME = 256 * 2**20  # 256 MiB: a 2048-token prefill of an 8192-wide model in float32 is 64 MiB

PeerId = NewType("PeerId", str)
SessionId = NewType("SessionId", str)

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int64": torch.int64}
_DTYPE_NAMES = {v: k for k, v in WIRE_DTYPES.items()}

DECODE_IN_THREAD = 1 << 20  # frame bodies larger than this are decoded off the event loop
MAX_VERIFY = 64  # positions of one speculative verification step (a step with per_position)
MAX_TRAIL = 64  # earlier servers' outputs a pushed step (and the reply ending its push run) may carry
MAX_ADAPTER_TENSORS = 1024  # named adapter tensors (or their gradients) one frame may carry

# kind -> fields it must carry (beyond v, kind, tensors) and how many tensors
KINDS: dict[str, tuple[tuple[str, ...], Sequence[int]]] = {
    "info": ((), (0,)),
    "info_reply": (("info",), (0,)),
    "announce": (("info",), (0,)),  # a server's announcement sent directly (joining the swarm, leaving it)
    "open": (("start", "end", "batch", "max_length"), range(0, 1 + MAX_ADAPTER_TENSORS)),  # [adapter...]
    "opened": (("session_id",), (0,)),
    "step": (("step_id", "position"), range(1, 3 + MAX_TRAIL)),  # hidden [, hypo_ids] [, trail...]
    "output": (("step_id",), range(1, 2 + MAX_TRAIL)),  # output [, trail...]
    "close": ((), (0,)),
    "closed": ((), (0,)),
    "forward": (("start", "end"), range(1, 2 + MAX_ADAPTER_TENSORS)),  # hidden [, adapter...]
    "backward": (("start", "end"), range(2, 3 + MAX_ADAPTER_TENSORS)),  # hidden, grad_output [, adapter...]
    "result": ((), range(1, 2 + MAX_ADAPTER_TENSORS)),  # output or grad_input [, adapter gradients...]
    "error": (("message",), (0,)),
    "probe": ((), (1,)),  # bytes to echo back (a bandwidth measurement)
    "dialback": (("addr",), (0,)),  # dial me back at this address (a reachability check, p2p/nat.py)
    "dialback_reply": (("ok",), (0,)),
}


# Error codes of ``error`` frames. The first kind says "your request is wrong": the client must
# not send it again, to this server or another. The second says "I cannot or did not serve it":
# the client avoids this server for a while and goes to another (failing over with replay).
BAD_FRAME = "bad_frame"  # malformed, oversized, unknown kind or version
BAD_REQUEST = "bad_request"  # well formed but invalid: blocks not served here, wrong shapes, too long
REFUSED = frozenset({BAD_FRAME, BAD_REQUEST})
CACHE_FULL = "cache_full"  # no KV room (in total, or in the share one peer may hold)
BUSY = "busy"  # a per-peer or total limit on streams, sessions or frame bytes in flight
SERVER_ERROR = "server_error"  # the server failed (out of memory, a kernel error)
SESSION_EXPIRED = "session_expired"  # idle too long, or past the session lifetime
UNKNOWN_ADAPTER = "unknown_adapter"  # the adapter digest is not (or no longer) kept here: send its tensors


class WireError(ValueError):
    """A frame that cannot be accepted (malformed, oversized, wrong version, unknown kind);
    ``code`` is the error code to answer it with."""

    def __init__(self, message: str, code: str = BAD_FRAME):
        super().__init__(message)
        self.code = code


class RemoteError(RuntimeError):
    """The peer answered with an ``error`` frame; ``code`` says what kind (see the codes above;
    ``refused`` tells whether the request itself was wrong)."""

    @property
    def refused(self) -> bool:
        return self.code in REFUSED

    def __init__(self, message: str, code: str = "error"):
        super().__init__(message)
        self.code = code


@dataclass
class Frame:
    kind: str
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: list[torch.Tensor] = field(default_factory=list)
    grant: Grant | None = field(default=None, repr=False, compare=False)  # its bytes in the reader's FrameBudget
    forms: list[str] = field(default_factory=list, repr=False, compare=False)  # each tensor's table form, as received
    wire_size: int = field(default=0, repr=False, compare=False)  # bytes it took on the wire, as received

    def release(self) -> None:
        """Give the frame's bytes back to the budget it was read under (idempotent)."""
        if self.grant is not None:
            self.grant.release()

    def __getitem__(self, name: str) -> Any:
        try:
            return self.fields[name]
        except KeyError:
            raise WireError(f"a {self.kind} frame needs the field {name!r}") from None


def _bytes_of(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    return memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


def encode(frame: Frame) -> list[bytes | memoryview]:
    """The frame as a list of buffers to write in order (tensor buffers are views, not copies).
    A tensor may be an :class:`~swarm.p2p.compression.Int8Blocks` (sent as an ``int8b`` entry)."""
    if frame.kind not in KINDS:
        raise WireError(f"unknown frame kind {frame.kind!r}")
    buffers: list[memoryview] = []
    table = []
    for t in frame.tensors:
        if isinstance(t, Int8Blocks):
            table.append(["int8b", list(t.shape), t.block_size])
            buffers += [_bytes_of(t.scales), _bytes_of(t.values)]
            continue
        if t.dtype not in _DTYPE_NAMES:
            raise WireError(f"tensor dtype {t.dtype} cannot be sent; use one of {', '.join(WIRE_DTYPES)}")
        table.append([_DTYPE_NAMES[t.dtype], list(t.shape)])
        buffers.append(_bytes_of(t))
    header = msgpack.packb({**frame.fields, "v": PROTOCOL_VERSION, "kind": frame.kind, "tensors": table})
    if len(header) > 0xFFFF:
        raise WireError("frame header too large")
    body_length = 2 + len(header) + sum(b.nbytes for b in buffers)
    return [struct.pack(">IH", body_length, len(header)) + header, *buffers]


def decode_body(body: bytes | bytearray, max_decoded: int | None = None, reserve=None) -> Frame:
    """Parse a frame body (everything after the u32 length). Raises :class:`WireError`.

    ``max_decoded`` bounds the bytes its tensors decode to (an ``int8b`` value becomes four);
    ``reserve(n)`` is called with the bytes they take beyond the body's before any is allocated
    (to count them in a :class:`~swarm.p2p.limits.FrameBudget`; it raises FrameBudgetError)."""
    if len(body) < 2:
        raise WireError("frame body shorter than its header length field")
    (header_length,) = struct.unpack_from(">H", body)
    if 2 + header_length > len(body):
        raise WireError("frame header length exceeds the frame")
    try:
        header = msgpack.unpackb(bytes(body[2 : 2 + header_length]), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise WireError(f"frame header is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise WireError("frame header is not a msgpack map")
    version, kind = header.pop("v", None), header.pop("kind", None)
    if version != PROTOCOL_VERSION:
        raise WireError(f"unsupported protocol version {version!r}; this peer speaks version {PROTOCOL_VERSION}")
    if not isinstance(kind, str) or kind not in KINDS:
        raise WireError(f"unknown frame kind {kind!r}")
    required, tensor_counts = KINDS[kind]
    missing = [name for name in required if name not in header]
    if missing:
        raise WireError(f"{kind} frame is missing field(s) {', '.join(missing)}")
    table = header.pop("tensors", [])
    if not isinstance(table, list) or len(table) not in tensor_counts:
        counts = f"{tensor_counts[0]} to {tensor_counts[-1]}" if len(tensor_counts) > 2 else " or ".join(map(str, tensor_counts))
        raise WireError(f"{kind} frame must carry {counts} tensor(s)")
    entries, offset, decoded = [], 2 + header_length, 0
    for entry in table:  # sizes first: nothing is allocated for a frame that does not add up
        form, shape, nbytes, size = _table_entry(entry)
        if offset + nbytes > len(body):
            raise WireError(f"tensor of shape {shape} ({form}) runs past the end of the frame")
        entries.append((entry, offset, nbytes))
        offset, decoded = offset + nbytes, decoded + size
    if offset != len(body):
        raise WireError(f"{len(body) - offset} unexpected trailing bytes after the frame's tensors")
    if max_decoded is not None and decoded > max_decoded:
        raise WireError(f"a frame whose tensors decode to {decoded} bytes exceeds the maximum of {max_decoded} bytes")
    if reserve is not None and decoded > len(body):
        try:
            reserve(decoded - len(body))
        except P2PError as exc:  # FrameBudgetError
            raise WireError(str(exc), code=BUSY) from None
    tensors = [_tensor(entry, body[start : start + nbytes]) for entry, start, nbytes in entries]
    return Frame(kind, header, tensors, forms=[entry[0] for entry, _, _ in entries], wire_size=4 + len(body))


def _table_entry(entry) -> tuple[str, list[int], int, int]:
    """A tensor table entry's form, shape, bytes in the frame and bytes decoded; or WireError."""
    if not (isinstance(entry, list) and len(entry) in (2, 3) and isinstance(entry[0], str)
            and (entry[0] in WIRE_DTYPES and len(entry) == 2 or entry[0] == "int8b" and len(entry) == 3)
            and isinstance(entry[1], list)):
        raise WireError(
            f"bad tensor entry {entry!r}: expected [dtype, shape] with dtype in {', '.join(WIRE_DTYPES)}, "
            "or [\"int8b\", shape, block_size]"
        )
    shape = entry[1]
    if not all(isinstance(d, int) and 0 <= d < 2**31 for d in shape) or len(shape) > 8:
        raise WireError(f"bad tensor shape {shape!r}")
    numel = math.prod(shape)  # exact: no overflow for absurd shapes
    if entry[0] != "int8b":
        nbytes = numel * WIRE_DTYPES[entry[0]].itemsize
        return entry[0], shape, nbytes, nbytes
    block_size = entry[2]
    if not (isinstance(block_size, int) and 1 <= block_size <= MAX_BLOCK):
        raise WireError(f"bad int8 block size {block_size!r}: expected 1 to {MAX_BLOCK}")
    if block_size != block_size_for(shape):  # the one senders use; any other could decode to padding
        raise WireError(f"bad int8 block size {block_size} for shape {shape}: expected {block_size_for(shape)}")
    return "int8b", shape, int8_nbytes(numel, block_size), 4 * numel


def _tensor(entry: list, data) -> torch.Tensor:
    """Decode one tensor's bytes (their size checked by :func:`_table_entry`)."""
    shape = entry[1]
    try:
        if entry[0] == "int8b":
            return int8_from_bytes(shape, entry[2], data)
        dtype = WIRE_DTYPES[entry[0]]
        if not len(data):
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
    except ValueError as exc:  # a NaN scale
        raise WireError(f"bad int8 tensor: {exc}") from None
    except RuntimeError as exc:  # shapes torch cannot lay out (strides past 2^63)
        raise WireError(f"bad tensor shape {shape!r}: {exc}") from None


def _write_plan(frame: Frame) -> tuple[list[bytes | memoryview], int]:
    """The buffers to write for ``frame`` (small frames joined into one write; large tensors
    written from their own memory) and their bytes in all."""
    buffers = encode(frame)
    total = sum(len(b) for b in buffers)
    if total <= 1 << 16:
        return [b"".join(bytes(b) for b in buffers)], total
    return [b for b in buffers if len(b)], total


async def write_frame(stream, frame: Frame, timeout: float | None = None) -> int:
    """Write ``frame`` to a :class:`~swarm.p2p.host.Stream`; returns the bytes written."""
    writes, total = _write_plan(frame)
    for b in writes:
        await stream.write(b, timeout=timeout)
    return total


async def read_frame(
    stream,
    timeout: float | None = None,
    max_frame: int = DEFAULT_MAX_FRAME,
    frame_timeout: float | None = None,
    budget: FrameBudget | None = None,
) -> Frame:
    """Read one frame. Raises :class:`WireError` for a bad frame (or one its sender has no room
    for in ``budget``), the host's StreamClosedError at EOF, P2PTimeoutError when nothing
    complete arrives within ``timeout`` (FrameStalledError when a frame that started takes longer
    than ``frame_timeout``: see :meth:`~swarm.p2p.host.Stream.read_message`).

    With a ``budget`` the frame's ``grant`` holds its size there: :meth:`Frame.release` it once
    the frame is dealt with; it also holds the bytes ``int8b`` tensors take beyond the body when
    decoded (the decoded tensors count against ``max_frame`` too). Bodies over
    :data:`DECODE_IN_THREAD` bytes are decoded on a worker thread, so a large frame does not stall
    the event loop."""
    with _read_errors(max_frame):
        body = await stream.read_message(max_frame, timeout=timeout, frame_timeout=frame_timeout, budget=budget)
    return await _decoded(body, max_frame, asyncio.to_thread)


@contextmanager
def _read_errors(max_frame: int):
    try:
        yield
    except MessageTooLargeError as exc:
        raise WireError(f"frame of {exc.length} bytes exceeds the maximum of {max_frame} bytes") from None
    except FrameBudgetError as exc:
        raise WireError(str(exc), code=BUSY) from None


async def _decoded(body, max_frame: int, to_thread) -> Frame:
    """The frame of a message ``body`` (see :func:`read_frame`); ``to_thread``: the running
    loop's way to run a large decode on a worker thread."""
    try:
        reserve = body.grant.grow if body.grant is not None else None
        if len(body) <= DECODE_IN_THREAD:
            frame = decode_body(body, max_frame, reserve)
        else:
            frame = await to_thread(decode_body, body, max_frame, reserve)
    except BaseException:
        body.release()
        raise
    finally:
        body.clear()  # the tensors hold copies
    frame.grant = body.grant
    return frame


# ---- the same on the libp2p thread (trio), for the hot path of inference sessions -----------------


@contextmanager
def _deadline(timeout: float | None, what: str):
    if timeout is None:
        yield
        return
    try:
        with trio.fail_after(timeout):
            yield
    except trio.TooSlowError:
        raise P2PTimeoutError(f"{what}: timed out after {timeout:g} s") from None


async def read_frame_here(
    stream,
    timeout: float | None = None,
    max_frame: int = DEFAULT_MAX_FRAME,
    frame_timeout: float | None = None,
    budget: FrameBudget | None = None,
) -> Frame:
    """:func:`read_frame` called on the host's trio thread itself (no hand-off to the event loop)."""
    with _read_errors(max_frame), _deadline(timeout, f"read from {stream.protocol}"):
        body = await stream.read_message_here(max_frame, frame_timeout, budget)
    return await _decoded(body, max_frame, trio.to_thread.run_sync)


async def write_frame_here(stream, frame: Frame, timeout: float | None = None) -> int:
    """:func:`write_frame` called on the host's trio thread itself."""
    writes, total = _write_plan(frame)
    for b in writes:  # each buffer within ``timeout``, as write_frame does
        with _deadline(timeout, f"write to {stream.protocol}"):
            await stream.write_here(b)
    return total


async def pump_frames(
    stream, put, max_frame: int = DEFAULT_MAX_FRAME, frame_timeout: float | None = None, budget: FrameBudget | None = None
) -> None:
    """Read frames from ``stream`` for as long as it lasts, handing each to ``await put(frame)``;
    the error that ends the reading (a bad frame, the stream closing, a stalled frame) is handed
    over last. Run it as a task and cancel it when done: waits on what it fills can then time out
    without cutting a frame in half. With a ``budget``, ``put`` owns each frame's grant."""
    while True:
        try:
            frame = await read_frame(stream, timeout=None, max_frame=max_frame, frame_timeout=frame_timeout, budget=budget)
        except Exception as exc:  # WireError, P2PError, or anything else: the reader waits for it
            await put(exc if isinstance(exc, (WireError, P2PError)) else WireError(f"unreadable frame: {exc!r}"))
            return
        try:
            await put(frame)
        except BaseException:
            frame.release()
            raise


def adapter_fields(
    digest: str, spec: dict, names: Sequence[str] | None
) -> dict:
    """The ``adapter`` field of an open/forward/backward frame: the adapter's content ``digest``,
    its spec (see :class:`~swarm.engine.adapters.AdapterSpec`) and, when the frame carries the
    tensors (after its own), their ``names`` in order. Without names the receiver must know the
    digest already (else it answers :data:`UNKNOWN_ADAPTER` and the sender sends them)."""
    out = {"digest": digest, "spec": spec}
    if names is not None:
        out["names"] = list(names)
    return {"adapter": out}


def named_tensors(names, tensors: Sequence[torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """``tensors`` by ``names`` (from a frame of ``kind``: a list of distinct strings, one per
    tensor). Raises :class:`WireError` when they do not match."""
    if names is None and not tensors:
        return {}
    if (
        not isinstance(names, list)
        or len(names) != len(tensors)
        or not all(isinstance(n, str) and len(n) <= 256 for n in names)
        or len(set(names)) != len(names)
    ):
        raise WireError(f"a {kind} frame's {len(tensors)} extra tensor(s) need as many distinct names")
    return dict(zip(names, tensors))


def error_frame(message: str, code: str = SERVER_ERROR) -> Frame:
    return Frame("error", {"message": message, "code": code})


def expect(frame: Frame, kind: str) -> Frame:
    """``frame`` if it is of ``kind``; the peer's error as :class:`RemoteError`; else :class:`WireError`."""
    if frame.kind == "error":
        raise RemoteError(str(frame.fields.get("message")), str(frame.fields.get("code", "error")))
    if frame.kind != kind:
        raise WireError(f"expected a {kind} frame, got {frame.kind}")
    return frame
