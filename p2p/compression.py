"""Hidden states on the wire in fewer bytes: a session's *wire dtype*, chosen by its client.

The client picks one (``--wire-dtype``) for everything of a session that carries hidden states
or gradients: its steps, the server's outputs and pushes, the forward and backward passes of
fine-tuning. ``int64`` tensors (hypo ids) and adapter tensors always travel as they are.

- ``float32``: tensors travel in their own dtype (float32, or a bfloat16 server's bfloat16 output):
  exact, as before wire dtypes existed.
- ``bfloat16`` (and ``float16``, which ``auto`` picks for a float16 server): cast before sending.
- ``int8``: blockwise absmax quantization (LLM.int8's scheme, :class:`Int8Blocks`): the flattened
  tensor is cut into blocks of ``block_size`` values (the last may be shorter); each block sends
  its absmax as one float32 scale and its values as ``round(x / absmax * 127)`` int8. A value is
  off by at most ``absmax / 254`` of its block.
- ``auto`` (the default): per span, the server's compute dtype as it announces it (bfloat16 for a
  bfloat16 server, as they are for a float32 one). The server casts its input to that dtype
  anyway and its output is in that dtype, so this changes no result and halves the bytes a
  bfloat16 server receives.

Two properties keep failover exact under a lossy wire dtype. Blocks never straddle a row of the
last dimension (:func:`block_size_for`: blocks of 64 values, or another divisor of the row),
so quantizing a slice of positions or of batch rows gives the slice of the quantized whole; and
quantizing is idempotent (``unpack(pack(unpack(p))) == unpack(p)`` bit for bit: the decoder
computes ``(v / 127) * absmax``, so a block's largest value comes back as exactly its absmax).
A client can therefore keep the decoded tensor a server received, replay it to a replacement
later in any grouping, and forward what it got from one server to the next without any value
changing on the way.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import torch
import trio

WIRE_CHOICES = ("auto", "float32", "bfloat16", "int8")  # what a client may ask for
SESSION_WIRES = ("float32", "bfloat16", "float16", "int8")  # what an open or a pass may name (auto resolved)
BLOCK = 64  # values per int8 block (at most; see block_size_for)
MAX_BLOCK = 1 << 20  # the largest block size a decoder accepts
_CASTS = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_SMALLEST_NORMAL = torch.finfo(torch.float32).tiny  # scales below this are flushed to zero (idempotence)
OFF_LOOP_BYTES = 1 << 20  # tensors larger than this are packed on a worker thread (pack_off_loop)


@dataclass(frozen=True)
class Int8Blocks:
    """A float tensor of ``shape`` in blockwise int8: ``scales`` (float32, one absmax per block of
    ``block_size`` values of the flattened tensor) and ``values`` (int8, ``numel`` of them). On
    the wire: ``["int8b", shape, block_size]`` in the tensor table, then the scales' bytes, then
    the values' bytes."""

    shape: tuple[int, ...]
    block_size: int
    scales: torch.Tensor  # float32 [blocks]
    values: torch.Tensor  # int8 [numel]

    @property
    def nbytes(self) -> int:
        return 4 * self.scales.numel() + self.values.numel()

    def dequantize(self) -> torch.Tensor:
        """The float32 tensor the receiver decodes: ``(v / 127) * absmax`` per value."""
        n, b = self.values.numel(), self.block_size
        blocks = self.scales.numel()
        v = torch.zeros(blocks * b, dtype=torch.float32)
        v[:n] = self.values.float()
        out = v.view(blocks, b).div_(127).mul_(self.scales[:, None])
        return out.reshape(-1)[:n].reshape(self.shape)


def block_size_for(shape) -> int:
    """Values per block for a tensor of ``shape``: a divisor of its last dimension (blocks never
    straddle rows; see the module's docstring), as large as possible up to :data:`BLOCK`. A row
    with no divisor between ``BLOCK / 4`` and ``BLOCK`` is one block (up to MAX_BLOCK).

    Small blocks because a linear code is used: residual streams have a few outlier features
    (SmolLM2's reach 350 where the median is 1.6), and one in a block of a whole row (576 values)
    leaves the rest of the row a few levels: +2.8 % perplexity over four span boundaries, against
    +0.6 % in blocks of 64 (and +0.6 % for the paper's dynamic code in blocks of 4096), at 4 bytes
    of scale per 64 values (27 % of float32's bytes instead of 25 %)."""
    row = int(shape[-1]) if len(shape) else 1
    if row <= BLOCK:
        return max(row, 1)
    for size in range(BLOCK, BLOCK // 4 - 1, -1):
        if row % size == 0:
            return size
    return min(row, MAX_BLOCK)


def quantize(x: torch.Tensor, block_size: int | None = None) -> Int8Blocks:
    """``x`` (any float dtype) in blockwise int8. Raises ``ValueError`` for inf or NaN values."""
    shape = tuple(x.shape)
    b = block_size or block_size_for(shape)
    flat = x.detach().reshape(-1).float().cpu()
    n = flat.numel()
    blocks = -(-n // b)
    padded = torch.zeros(blocks * b, dtype=torch.float32)
    padded[:n] = flat
    padded = padded.view(blocks, b)
    absmax = padded.abs().amax(dim=1) if blocks else torch.zeros(0)
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("hidden states with inf or NaN values cannot be sent as int8; use --wire-dtype float32")
    absmax = torch.where(absmax < _SMALLEST_NORMAL, torch.zeros_like(absmax), absmax)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    values = torch.round(padded / safe[:, None] * 127).clamp_(-127, 127).to(torch.int8).reshape(-1)[:n]
    return Int8Blocks(shape, b, absmax.contiguous(), values.contiguous())


def int8_nbytes(numel: int, block_size: int) -> int:
    """Bytes on the wire of ``numel`` values in blocks of ``block_size``: scales, then values."""
    return 4 * -(-numel // block_size) + numel


def int8_from_bytes(shape: list[int], block_size: int, data: bytes | bytearray) -> torch.Tensor:
    """Decode an ``int8b`` entry's bytes (exactly :func:`int8_nbytes` of them) to float32.
    Raises ``ValueError`` for a scale that is not a finite number ≥ 0."""
    n = math.prod(shape)
    blocks = -(-n // block_size)
    scales = torch.frombuffer(bytearray(data[: 4 * blocks]), dtype=torch.float32) if blocks else torch.zeros(0)
    if not bool((torch.isfinite(scales) & (scales >= 0)).all()):
        raise ValueError("int8 block scales must be finite and >= 0")
    values = torch.frombuffer(bytearray(data[4 * blocks :]), dtype=torch.int8) if n else torch.zeros(0, dtype=torch.int8)
    if n and bool((values == -128).any()):  # outside the code: it would decode past its block's absmax
        raise ValueError("int8 values must be in -127..127")
    return Int8Blocks(tuple(shape), block_size, scales, values).dequantize()


def pack(x: torch.Tensor, wire: str) -> torch.Tensor | Int8Blocks:
    """What to put in a frame to send the float tensor ``x`` with wire dtype ``wire`` (one of
    :data:`SESSION_WIRES`); the receiver decodes :func:`unpack` of it."""
    if wire == "int8":
        return quantize(x)
    if wire in _CASTS:
        return x.to(_CASTS[wire])
    return x


async def pack_off_loop(x: torch.Tensor, wire: str) -> torch.Tensor | Int8Blocks:
    """:func:`pack` on a worker thread for a tensor over :data:`OFF_LOOP_BYTES` (quantizing a
    64 MiB prefill takes about 0.2 s: an event loop serving other sessions must not wait for it)."""
    if wire == "float32" or x.numel() * x.element_size() <= OFF_LOOP_BYTES:
        return pack(x, wire)
    return await asyncio.to_thread(pack, x, wire)


async def pack_here(x: torch.Tensor, wire: str) -> torch.Tensor | Int8Blocks:
    """:func:`pack_off_loop` for a caller on the libp2p thread (trio)."""
    if wire == "float32" or x.numel() * x.element_size() <= OFF_LOOP_BYTES:
        return pack(x, wire)
    return await trio.to_thread.run_sync(pack, x, wire)


def unpack(packed: torch.Tensor | Int8Blocks) -> torch.Tensor:
    """The tensor a receiver of ``packed`` decodes."""
    return packed.dequantize() if isinstance(packed, Int8Blocks) else packed


def received(x: torch.Tensor, wire: str) -> tuple[torch.Tensor | Int8Blocks, torch.Tensor]:
    """``(pack(x, wire), unpack(...))``: what to send, and exactly what the other side gets."""
    packed = pack(x, wire)
    return packed, unpack(packed)


def wire_of_form(form: str) -> str:
    """The wire dtype that re-sends a tensor decoded from a table entry of ``form`` unchanged
    (``int8b`` quantizes idempotently; every other form is sent as the dtype it decoded to)."""
    return "int8" if form == "int8b" else "float32"


def resolve(choice: str, server_dtype: str) -> str:
    """The wire dtype of a span: ``choice``, or for ``auto`` the server's compute dtype."""
    if choice != "auto":
        return choice
    return server_dtype if server_dtype in _CASTS else "float32"


def check_choice(choice: str, flag: str = "--wire-dtype") -> str:
    """``choice`` if it is one of :data:`WIRE_CHOICES`, else ``ValueError`` naming ``flag``."""
    if choice not in WIRE_CHOICES:
        raise ValueError(f"{flag} must be one of {', '.join(WIRE_CHOICES)}, got {choice!r}")
    return choice


def encoded_nbytes(shape, wire: str, dtype: torch.dtype = torch.float32) -> int:
    """Bytes a tensor of ``shape`` and ``dtype`` takes on the wire with ``wire`` (its table entry
    and the frame header aside): for a hidden state ``[1, 1, hidden]``, the bytes per token per hop.
    ``auto`` counts as ``float32`` (the span's server decides)."""
    n = math.prod(shape)
    if wire == "int8":
        return int8_nbytes(n, block_size_for(tuple(shape)))
    if wire in _CASTS:
        return 2 * n
    return n * dtype.itemsize


def packed_nbytes(packed: torch.Tensor | Int8Blocks) -> int:
    """Bytes of tensor data ``packed`` takes in a frame."""
    return packed.nbytes if isinstance(packed, Int8Blocks) else packed.numel() * packed.element_size()


def session_wire(value) -> str:
    """The wire dtype an open frame or a pass names (absent: ``float32``, tensors as they are);
    ``ValueError`` for anything else (the client's request is wrong)."""
    if value is None:
        return "float32"
    if value not in SESSION_WIRES:
        raise ValueError(f"wire must be one of {', '.join(SESSION_WIRES)}, got {str(value)[:32]!r}")
    return value
