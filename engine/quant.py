"""8-bit and 4-bit weights for a block's linears (bitsandbytes), applied from outside the families.

Blocks are built plainly in their float dtype, one at a time; :func:`quantize_linears` then swaps
each ``nn.Linear`` (or packed linear) for a frozen quantized one, so the float weights of a whole
range never sit in memory together. Norms, embeddings and the client's head stay in the dtype.

- ``int8`` — LLM.int8: weights int8 per output row (absmax scale), activations int8 per row, with
  each row's outlier values (|x| ≥ 6) multiplied in float instead, so rows stay independent;
  products by ``torch._int_mm`` (what bitsandbytes' CPU backend calls). 8 bits per weight and a
  float32 scale per row.
- ``nf4`` — bitsandbytes' 4-bit NormalFloat code in blocks of 64 with a bfloat16 absmax per block,
  stored in its CPU layout for its native kernel (any batch; called through its native library,
  see :func:`nf4_kernel`). 4.25 bits per weight. The kernel multiplies in bfloat16.

One function per precision, whatever the caller does with it: a pass with gradients computes its
output with the same kernels as an inference pass, and its backward multiplies by the dequantized
weight (the input's gradient through a frozen layer; bitsandbytes' own rule). So a backward after
inference gives a gradient (bitsandbytes' ``Linear4bit`` silently gives none once it has repacked
itself for inference), and forward results are the same with or without gradients.

Where a kernel is missing (no AVX-512 BF16 for nf4's, another accelerator), the same weights are
dequantized and multiplied in float: slower, the same function up to rounding.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import io
import logging
import os
import threading
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from swarm.engine.fast import FrozenLinear

QUANTS = ("none", "int8", "nf4")
OUTLIER_THRESHOLD = 6.0  # LLM.int8: input features with a value this large are multiplied in float
NF4_BLOCK = 64
PACK_ROWS = 32  # bitsandbytes' CPU layout interleaves 32 output rows


class QuantUnavailableError(RuntimeError):
    """bitsandbytes cannot be imported: ``--quant`` needs it."""


def parse_quant(name: str) -> str:
    if name not in QUANTS:
        raise ValueError(f"unsupported --quant {name!r}; choose one of {', '.join(QUANTS)}")
    return name


@cache
def bnb():
    """bitsandbytes, imported quietly: at import it looks for an optional kernel package and logs an
    error when it is missing (the built-in kernels are used then), which would land on the user's
    terminal."""
    os.environ.setdefault("BITSANDBYTES_NOWELCOME", "1")
    quiet = logging.getLogger("bitsandbytes")
    level, quiet.level = quiet.level, logging.CRITICAL
    _import_lock.acquire()  # torch.compile is swapped for the import: one importer at a time
    compile_ = torch.compile
    torch.compile = _no_compile  # see _no_compile
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import bitsandbytes
            import bitsandbytes.functional  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        raise QuantUnavailableError(
            f"--quant needs bitsandbytes, which cannot be loaded ({type(exc).__name__}: {exc}); "
            "install it with: pip install 'bitsandbytes>=0.45'"
        ) from None
    finally:
        torch.compile = compile_
        # and after: its CUDA int8 product warns on every call whose input is not float16 ("will
        # be cast"), which is how a float32 or bfloat16 server calls it; its errors still show
        quiet.level = max(level, logging.ERROR)
        _import_lock.release()
    return bitsandbytes


def _no_compile(fn=None, **kwargs):
    """``torch.compile`` while bitsandbytes imports: it wraps some pure-PyTorch fallbacks (blockwise
    dequantization, optimizers; none of which run here) in ``torch.compile`` at import, which loads
    PyTorch's whole compiler stack: +120 MB resident and 1.5 s in every server. They stay plain."""
    return fn if fn is not None else (lambda f: f)


_import_lock = threading.Lock()


@cache
def int8_kernel() -> bool:
    """Whether int8 × int8 products run natively: ``torch._int_mm``, as bitsandbytes' CPU backend
    uses it, only with AVX-512 (elsewhere it is a scalar loop, slower than floats)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and hasattr(torch, "_int_mm")


@cache
def nf4_kernel():
    """bitsandbytes' native nf4 × bfloat16 kernel (AVX-512 BF16 CPUs), or None. Called through its
    native library as its CPU backend does: the ``torch.ops.bitsandbytes`` route imports PyTorch's
    symbolic-shape stack on first use (+80 MB resident in every server). These are internals: the
    kernel is used only after it agreed with the float path on a probe layer (another
    bitsandbytes release could change its layout or arguments)."""
    bnb()
    try:
        from bitsandbytes.cextension import lib
        from bitsandbytes.functional import has_avx512bf16

        kernel = lib.gemv_4bit_inference_cpu_nf4_bf16
        if not has_avx512bf16():
            return None
    except (ImportError, AttributeError, RuntimeError):
        return None
    g = torch.Generator().manual_seed(0)
    probe = NF4Linear(torch.randn(64, 128, generator=g), None)
    x = torch.randn(3, 128, generator=g).to(torch.bfloat16)
    want = x.float() @ probe.dequantize_lookup(torch.float32).T
    got = _gemv(kernel, x, probe).float()
    return kernel if torch.allclose(got, want, rtol=0.02, atol=0.02 * want.abs().max().item()) else None


@cache
def nf4_dequantize_kernel(dtype: torch.dtype):
    """bitsandbytes' native nf4 → ``dtype`` (float32, bfloat16) dequantization, or None (also when
    it disagrees with the lookup on a probe layer)."""
    names = {torch.float32: "cdequantize_blockwise_cpu_nf4_fp32", torch.bfloat16: "cdequantize_blockwise_cpu_nf4_bf16"}
    if dtype not in names or nf4_kernel() is None:
        return None
    from bitsandbytes.cextension import lib

    kernel = getattr(lib, names[dtype], None)
    probe = NF4Linear(torch.randn(64, 128, generator=torch.Generator().manual_seed(1)), None)
    if kernel is None or not torch.equal(_dequantize_native(kernel, probe, dtype), probe.dequantize_lookup(dtype)):
        return None
    return kernel


def _gemv(kernel, a: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
    """``a`` (bfloat16 ``[rows ≥ 1, in]``, contiguous) times the layer's weight, by ``kernel``."""
    out = torch.empty(a.shape[0], layer.out_features, dtype=torch.bfloat16)
    kernel(
        ct.c_int64(a.shape[0]), ct.c_int64(layer.out_features), ct.c_int64(layer.in_features),
        ct.c_void_p(a.data_ptr()), ct.c_void_p(layer.packed.data_ptr()), ct.c_void_p(layer.absmax.data_ptr()),
        ct.c_void_p(out.data_ptr()), ct.c_int64(NF4_BLOCK), ct.c_int64(a.stride(0)), ct.c_int64(out.stride(0)),
    )
    return out


def _dequantize_native(kernel, layer: NF4Linear, dtype: torch.dtype) -> torch.Tensor:
    n, k = layer.out_features, layer.in_features
    codes = _unpack_for_cpu(layer.packed, n, k)
    pairs = ((codes[:, 0::2] << 4) | codes[:, 1::2]).contiguous()  # its row-major layout: high nibble first
    absmax = layer.absmax.T.float().contiguous()
    out = torch.empty(n, k, dtype=dtype)
    kernel(ct.c_void_p(pairs.data_ptr()), ct.c_void_p(absmax.data_ptr()), ct.c_void_p(out.data_ptr()),
           ct.c_longlong(NF4_BLOCK), ct.c_longlong(n), ct.c_longlong(k))
    return out


def nf4_code() -> torch.Tensor:
    """The 16 NF4 values (bitsandbytes' table), ascending from -1 to 1."""
    return bnb().functional.get_4bit_type("nf4", device="cpu").float().clone()


class _QuantMatmul(torch.autograd.Function):
    """``module.compute(x)`` forward; backward to the input through the dequantized weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantLinear) -> torch.Tensor:
        ctx.module = module
        return module.compute(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.module.dequantize(grad.dtype)
        return grad @ weight, None


class QuantLinear(FrozenLinear):
    """A frozen quantized linear; subclasses give ``compute`` (no autograd) and ``dequantize``."""

    quant = "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            out = _QuantMatmul.apply(x, self)
        else:
            out = self.compute(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight ``[out, in]`` as floats (what the layer multiplies by, up to rounding)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant={self.quant}"


class Int8Linear(QuantLinear):
    quant = "int8"

    @property
    def rows_interact(self) -> bool:
        """With outliers taken in float, which columns go that way is the union over the call's
        rows: a row's float matmul then depends on the others' values (see engine.fast)."""
        return bool(OUTLIER_THRESHOLD)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        w = weight.detach().float()
        scale = w.abs().amax(dim=1)  # per output row; a zero row stays zero
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        self.register_buffer("qweight", torch.round(w * (127.0 / safe)[:, None]).to(torch.int8), persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        a = x.reshape(-1, self.in_features).float()
        outliers = None
        if OUTLIER_THRESHOLD:
            big = a.abs() >= OUTLIER_THRESHOLD
            cols = big.any(dim=0).nonzero().flatten()
            if cols.numel():  # each row's own outlier values go in float (rows stay independent)
                part = a[:, cols] * big[:, cols]
                outliers = part @ (self.qweight[:, cols].float() * (self.scale / 127.0)[:, None]).T
                a = a.masked_fill(big, 0.0)
        row = a.abs().amax(dim=1)
        safe = torch.where(row > 0, row, torch.ones_like(row))
        qa = torch.round(a * (127.0 / safe)[:, None]).to(torch.int8)
        if int8_kernel():
            acc = torch._int_mm(qa, self.qweight.T)
        else:
            acc = qa.float() @ self.qweight.float().T
        out = acc.float() * (row[:, None] * self.scale[None, :] / (127.0 * 127.0))
        if outliers is not None:
            out = out + outliers
        return out.to(dtype).reshape(*shape[:-1], self.out_features)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        # the values (at most 127) are exact in any float dtype; converting int8 straight to
        # bfloat16 is 15× faster than through float32 here
        return self.qweight.to(dtype).mul_((self.scale / 127.0).to(dtype)[:, None])


class NF4Linear(QuantLinear):
    quant = "nf4"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias)
        if out_features % PACK_ROWS or in_features % NF4_BLOCK:
            raise ValueError(f"nf4 needs a linear's sizes to be multiples of {PACK_ROWS} and {NF4_BLOCK}, got {list(weight.shape)}")
        w = weight.detach().float().reshape(out_features, in_features // NF4_BLOCK, NF4_BLOCK)
        absmax = w.abs().amax(dim=2).to(torch.bfloat16)  # the kernel scales by the bfloat16 value
        scale = absmax.float()
        scaled = w / torch.where(scale > 0, scale, torch.ones_like(scale))[:, :, None]
        code = nf4_code()
        codes = torch.bucketize(scaled, (code[1:] + code[:-1]) / 2).to(torch.uint8)  # the nearest value
        self.register_buffer("packed", _pack_for_cpu(codes.reshape(out_features, in_features)), persistent=False)
        self.register_buffer("absmax", absmax.T.contiguous(), persistent=False)  # [in / 64, out]
        self.register_buffer("code", code, persistent=False)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        kernel = nf4_kernel() if x.device.type == "cpu" else None
        if kernel is None:
            return F.linear(x, self.dequantize(x.dtype))
        a = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        if not a.shape[0]:  # the kernel divides by the row count
            return x.new_zeros(*x.shape[:-1], self.out_features)
        return _gemv(kernel, a, self).to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        kernel = nf4_dequantize_kernel(dtype)
        if kernel is not None:  # bitsandbytes' native dequantization (4x faster than the lookup)
            return _dequantize_native(kernel, self, dtype)
        return self.dequantize_lookup(dtype)

    def dequantize_lookup(self, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`dequantize` in plain PyTorch (no bitsandbytes kernel)."""
        codes = _unpack_for_cpu(self.packed, self.out_features, self.in_features)
        values = self.code[codes.long()].reshape(self.out_features, self.in_features // NF4_BLOCK, NF4_BLOCK)
        return (values * self.absmax.T.float()[:, :, None]).reshape(self.out_features, self.in_features).to(dtype)


def _pack_for_cpu(codes: torch.Tensor) -> torch.Tensor:
    """4-bit ``codes`` ``[N, K]`` (uint8 0–15) in bitsandbytes' CPU kernel layout ``[N, K/2]``:
    for each 32 rows × 2 columns, low nibbles hold the first 32 values, high nibbles the next 32."""
    n, k = codes.shape
    tiles = codes.reshape(n // PACK_ROWS, PACK_ROWS, k // 2, 2).transpose(1, 2).reshape(-1, 2 * PACK_ROWS)
    return ((tiles[:, PACK_ROWS:] << 4) | tiles[:, :PACK_ROWS]).to(torch.uint8).reshape(n, k // 2)


def _unpack_for_cpu(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    tiles = packed.reshape(-1, PACK_ROWS)
    both = torch.cat((tiles & 0xF, tiles >> 4), dim=1)
    return both.reshape(n // PACK_ROWS, k // 2, PACK_ROWS, 2).transpose(1, 2).reshape(n, k)


QUANT_CLASSES = {"int8": Int8Linear, "nf4": NF4Linear}


def fits(quant: str, out_features: int, in_features: int) -> bool:
    """Whether a linear of these sizes can be held in ``quant``: nf4's CPU layout needs the output
    size a multiple of 32 and the input size of 64 (a linear that does not fit stays as it is)."""
    return quant != "nf4" or (out_features % PACK_ROWS == 0 and in_features % NF4_BLOCK == 0)


def quantize_linears(module: nn.Module, quant: str, device: torch.device = torch.device("cpu")) -> int:
    """Swap every ``nn.Linear`` of ``module`` (before any is packed) for a ``quant`` one, except
    those whose sizes do not :func:`fit <fits>`; returns how many were swapped. On a GPU
    ``device`` the swapped ones are bitsandbytes' own CUDA layers (:func:`gpu_linear`), put there."""
    if quant == "none":
        return 0
    cls = QUANT_CLASSES[parse_quant(quant)]
    bnb()
    swapped = 0
    for name, child in list(module.named_children()):
        weight = _linear_weight(child)
        if weight is not None:
            if fits(quant, *weight.shape):
                bias = None if child.bias is None else child.bias.detach()
                layer = cls(weight, bias) if device.type == "cpu" else gpu_linear(quant, weight, bias, device)
                setattr(module, name, layer)
                swapped += 1
        else:
            swapped += quantize_linears(child, quant, device)
    return swapped


def gpu_linear(quant: str, weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device) -> nn.Module:
    """bitsandbytes' CUDA layer for ``quant`` holding ``weight`` on ``device`` (quantized as it
    moves there): ``Linear8bitLt`` (LLM.int8 with its outlier threshold; the outlier columns are
    chosen over every row of a call, so its rows are never pooled with other sessions': see
    :func:`~swarm.engine.fast.invariant_rows`) or ``Linear4bit`` (nf4, multiplying in the
    weight's dtype). Both give gradients to their input."""
    lib = bnb()
    out_features, in_features = weight.shape
    if quant == "int8":
        layer = lib.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                    threshold=OUTLIER_THRESHOLD, device="meta")
        layer.weight = lib.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        layer.rows_interact = True
    else:
        layer = lib.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=weight.dtype,
                                  quant_type="nf4", device="meta")
        layer.weight = lib.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=False)
    layer.quant = quant
    return layer.to(device).eval()  # inference mode: LLM.int8's product (training mode dequantizes instead)


def quantization(module: nn.Module) -> str:
    """What ``module``'s linears are held in: ``int8``, ``nf4`` or ``none`` (none quantized)."""
    return next((m.quant for m in module.modules() if getattr(m, "quant", "none") in ("int8", "nf4")), "none")


def _linear_weight(module: nn.Module) -> torch.Tensor | None:
    return module.weight if isinstance(module, nn.Linear) else None


def matrix_bytes(out_features: int, in_features: int, quant: str, itemsize: int) -> int:
    """Bytes a ``quant`` linear's ``[out, in]`` weight takes: int8 values and a float32 scale per
    row, or nf4 values (two per byte), a bfloat16 scale per 64 and the 16 float32 code values (one
    that does not fit nf4 stays in the dtype of ``itemsize`` bytes)."""
    if not fits(quant, out_features, in_features):
        return out_features * in_features * itemsize
    if quant == "int8":
        return out_features * in_features + 4 * out_features
    return out_features * in_features // 2 + 2 * out_features * (in_features // NF4_BLOCK) + 64


def weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers (what its weights take in memory), with the
    scales bitsandbytes' layers keep beside their weights."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers(), *_bnb_scales(module)]:
        if t.device.type == "meta":
            continue
        if not t.is_mkldnn:  # oneDNN's packed weights have no data pointer (and are not shared)
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _bnb_scales(module: nn.Module) -> list[torch.Tensor]:
    """The tensors bitsandbytes' quantized weights carry as attributes: an int8 weight's row
    scales (``SCB``), a 4-bit weight's block scales (``quant_state``, nested ones included)."""
    found = []
    for weight in module.parameters():
        if isinstance(getattr(weight, "SCB", None), torch.Tensor):
            found.append(weight.SCB)
        state = getattr(weight, "quant_state", None)
        while state is not None:
            found += [t for t in (getattr(state, "absmax", None), getattr(state, "code", None)) if isinstance(t, torch.Tensor)]
            state = getattr(state, "state2", None)
    return found
