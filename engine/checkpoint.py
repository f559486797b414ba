"""Reading a Hugging Face checkpoint directory, lazily: only the tensors a process needs.

A server reads the tensors of its block range ``[start, end)``; a client reads the embeddings, the
final norm and the LM head. Single-file (``model.safetensors``) and sharded
(``model.safetensors.index.json``) checkpoints are supported; tensors are read one by one from the
memory-mapped files, so a process never holds weights it does not run.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Container, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from swarm.cache.kv import KVCacheBudget, LayerKVShape, SessionKV
from swarm.engine.default_model import MARKER
from swarm.engine.devices import block_devices
from swarm.engine.families import CheckpointError, Family, get_family
from swarm.engine.fast import SEGMENTS, is_frozen_linear, pack_linears
from swarm.engine.layers import StepContext, check_rope_values
from swarm.engine.quant import quantize_linears

CPU = torch.device("cpu")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# sizes every family's parsed config has, and what config.json calls them in words
SIZES = {"num_layers": "number of layers", "hidden_size": "hidden size", "num_heads": "number of attention heads",
         "vocab_size": "vocabulary size"}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported --dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def fix_hint(directory: Path) -> str:
    """What to do about a damaged file in the checkpoint ``directory``."""
    if (directory / MARKER).is_file():  # the default model, converted here
        return f"delete {directory} and run the command again to convert the default model anew"
    return "re-download or re-convert the checkpoint"


def read_json(file: Path) -> dict:
    """A JSON object from ``file``; raises :class:`CheckpointError` naming the file when it is not one."""
    try:
        value = json.loads(file.read_text())
    except (ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{file} is not valid JSON ({exc}): {fix_hint(file.parent)}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} holds a JSON {type(value).__name__}, not an object: {fix_hint(file.parent)}")
    return value


class Checkpoint:
    """A checkpoint directory: ``config.json``, safetensors weights, tokenizer files.

    ``keys_read`` records every tensor name read so far (tests assert a range reads only its own).
    Raises :class:`CheckpointError` naming the file when the directory is not a usable checkpoint
    (no or malformed ``config.json``, a key its family needs missing, weight files missing,
    truncated or not safetensors), and ``UnsupportedModelError`` for a ``model_type`` no family
    handles. Weight files are checked here, header by header, so a server fails before it joins.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{self.path} is not a checkpoint directory: it has no config.json")
        self.raw_config: dict = read_json(config_file)
        if "model_type" not in self.raw_config:
            raise CheckpointError(f"{config_file} has no model_type")
        self.family: Family = get_family(self.raw_config["model_type"])
        self._files = self._index_tensors()
        self._shapes: dict[str, list[int]] = {}  # tensor_shape's, filled a file at a time
        self.config = self.family.fit_to_keys(self._parse_config(config_file), set(self._files))
        self.keys_read: list[str] = []

    def _parse_config(self, config_file: Path):
        try:
            config = self.family.parse_config(self.raw_config)
            if hasattr(config, "rope_scaling"):  # at load, not at a server's first request
                check_rope_values(config.head_dim, config.rope_theta, config.rope_scaling)
            if getattr(config, "local_rope", None) is not None:
                check_rope_values(config.head_dim, *config.local_rope)
        except KeyError as exc:
            raise CheckpointError(
                f"{config_file} has no {exc.args[0]!r}, which a {self.family.name} config needs: {fix_hint(self.path)}"
            ) from None
        except (TypeError, ValueError, ZeroDivisionError) as exc:  # a value of the wrong type or out of range
            raise CheckpointError(f"{config_file}: {exc}") from None
        for field, label in SIZES.items():
            value = getattr(config, field)
            if not isinstance(value, int) or value < 1:
                raise CheckpointError(f"{config_file}: the {label} must be a positive integer, got {value!r}")
        return config

    @property
    def num_blocks(self) -> int:
        return self.config.num_layers

    def _index_tensors(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no weight_map: {fix_hint(self.path)}")
            files = {key: self.path / name for key, name in weight_map.items()}
            for file in set(files.values()):
                self._check_weights(file)
            return files
        single = self.path / "model.safetensors"
        if single.is_file():
            return {key: single for key in self._check_weights(single)}
        raise CheckpointError(
            f"{self.path} has no model.safetensors or model.safetensors.index.json; only safetensors "
            f"checkpoints are supported (re-save the model with save_pretrained(..., safe_serialization=True))"
        )

    def _check_weights(self, file: Path) -> list[str]:
        """The tensor names in ``file``, once its header says the file is whole."""
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (named by the checkpoint's index): {fix_hint(self.path)}")
        try:
            with safe_open(file, framework="pt") as f:
                return list(f.keys())
        except SafetensorError as exc:
            raise CheckpointError(
                f"{file} is truncated, damaged or not a safetensors file ({exc}): "
                f"{fix_hint(self.path)}"
            ) from None

    def files_of(self, keys: list[str]) -> dict[Path, list[str]]:
        """``keys`` by the file holding them (CheckpointError naming any this checkpoint lacks)."""
        missing = [k for k in keys if k not in self._files]
        if missing:
            raise CheckpointError(f"{self.path}: missing tensor(s) {', '.join(missing[:5])}")
        by_file: dict[Path, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self._files[key]].append(key)
        return dict(by_file)

    def read(self, keys: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Read exactly ``keys`` (converted to ``dtype``), opening each file once."""
        tensors = {}
        for file, file_keys in self.files_of(keys).items():
            with safe_open(file, framework="pt") as f:
                for key in file_keys:
                    # a copy: a tensor left on the file's memory map would keep the whole map
                    # (every page read) resident for as long as any block lives
                    tensors[key] = f.get_tensor(key).to(dtype, copy=True)
                    self.keys_read.append(key)
        return tensors

    def tensor_names(self) -> list[str]:
        return list(self._files)

    def tensor_shape(self, key: str) -> list[int]:
        """The shape of tensor ``key`` from its file's header (no data is read; each file's
        header read once, for all its tensors: a mixture of experts has thousands)."""
        if key not in self._shapes:
            file = self._files[key]
            with safe_open(file, framework="pt") as f:
                self._shapes.update({k: list(f.get_slice(k).get_shape()) for k in f.keys()})
        return list(self._shapes[key])

    SAMPLE_ROWS = 9  # rows of each matrix a fingerprint reads: the first, the last and 7 between
    SAMPLE_ELEMENTS = 64  # values a fingerprint takes from each end of each sampled row

    def fingerprint(self) -> str:
        """A hex digest that tells these weights from others without reading them all: over
        every tensor's name and shape, and a sample of its values (a 1-D tensor whole; of a
        matrix, the first and last ``SAMPLE_ELEMENTS`` values of ``SAMPLE_ROWS`` rows spread over
        it, first and last row included) as bfloat16, so a float32 copy and a bfloat16 copy of
        the same weights agree (a float16 copy may not: it rounds twice). Sharded or not and
        file names do not matter. A sample cannot see a change outside it: this tells apart
        checkpoints (another fine-tune, another seed), it does not authenticate them."""
        samples = {}
        for file, keys in self.files_of(self.tensor_names()).items():
            with safe_open(file, framework="pt") as f:
                for key in keys:
                    samples[key] = self._sample(f.get_slice(key))
        digest = hashlib.sha256()
        for key in sorted(samples):
            shape, values = samples[key]
            digest.update(json.dumps([key, shape]).encode())
            digest.update(values.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
        return digest.hexdigest()

    @classmethod
    def _sample(cls, tensor_slice) -> tuple[list[int], torch.Tensor]:
        """A tensor's shape and the values :meth:`fingerprint` hashes, read through a safetensors
        slice (only those bytes come off the disk)."""
        shape = list(tensor_slice.get_shape())
        if len(shape) <= 1:  # scalars, norms, biases: small
            return shape, tensor_slice[...].flatten()
        rows, n = shape[0], cls.SAMPLE_ELEMENTS
        picks = sorted({i * (rows - 1) // (cls.SAMPLE_ROWS - 1) for i in range(cls.SAMPLE_ROWS)}) if rows else []
        parts = []
        for r in picks:
            row = tensor_slice[r : r + 1].flatten()
            parts += [row[:n], row[-n:]] if row.numel() > 2 * n else [row]
        return shape, torch.cat(parts) if parts else torch.zeros(0)

    def load_blocks(
        self,
        start: int,
        end: int,
        dtype: torch.dtype = torch.float32,
        fast: bool = True,
        quant: str = "none",
        quantized: Container[int] | None = None,
        devices: Sequence[torch.device] = (CPU,),
        capacities: list[int] | None = None,
    ) -> BlockRange:
        """The blocks ``[start, end)`` with frozen weights, reading only their tensors.

        With ``fast`` (the default), bfloat16 linears on the CPU use pre-packed kernels (same
        results, see :mod:`swarm.engine.fast`). With ``quant`` (``int8``, ``nf4``) the linears of
        the blocks in ``quantized`` (all when None) are quantized as each block is loaded (see
        :mod:`swarm.engine.quant`), so only one block's float weights are held at a time.
        ``devices``: where the blocks compute, consecutive parts of the range each (in proportion
        to ``capacities``, blocks each device can hold; equal parts when None): each block goes
        there as it is loaded."""
        n = self.num_blocks
        if not 0 <= start < end <= n:
            raise ValueError(f"block range {start}:{end} is not within this model's {n} blocks (0:{n})")
        placed = block_devices(end - start, tuple(devices), capacities)
        blocks = []
        for index in range(start, end):
            device = placed[index - start]
            prefix = self.family.block_prefix(self.config, index)
            keys = [k for k in self._files if k.startswith(prefix)]
            if not keys:
                raise CheckpointError(
                    f"{self.path}: no tensors for block {index} (prefix {prefix!r}), though config.json gives the "
                    f"model {n} blocks: {fix_hint(self.path)}"
                )
            tensors = self.read(keys, dtype)
            with torch.device("meta"):
                block = self.family.block(self.config, index)
            state = {k[len(prefix) :]: v for k, v in tensors.items()}
            try:
                block.load_state_dict(state, strict=True, assign=True)
            except RuntimeError as exc:  # names or shapes that config.json does not describe
                detail = " ".join(str(exc).split())
                raise CheckpointError(
                    f"{self.path}: block {index}'s tensors do not fit config.json ({detail}): {fix_hint(self.path)}"
                ) from None
            block.requires_grad_(False).eval()
            if quant != "none" and (quantized is None or index in quantized):
                quantize_linears(block, quant, device)
                del state, tensors
            block.to(device)
            if fast:
                pack_linears(block)  # bfloat16 linears on the CPU not quantized (all, or those a quantization cannot hold)
            blocks.append(block)
        return_freed_memory()
        return BlockRange(self.family, self.config, start, end, blocks, dtype, placed)

    def load_head(self, dtype: torch.dtype = torch.float32, fast: bool = True, device: torch.device = CPU) -> torch.nn.Module:
        """The client's part (embeddings, final norm, LM head), reading only those tensors, on
        ``device`` (see :class:`DeviceHead`)."""
        keys = self.family.head_keys(self.config, set(self._files))
        head = self.family.head(self.config, self.read(keys, dtype)).eval()
        if device.type != "cpu":
            return DeviceHead(head.to(device), device)
        if fast:
            pack_linears(head)
        return head


class DeviceHead(torch.nn.Module):
    """A family's head computing on a GPU for a client whose hidden states, token ids and logits
    stay on the CPU (where the wire, sampling and the adapters' optimizer are): what goes in is
    copied to the device, what comes out back (differentiably)."""

    def __init__(self, head: torch.nn.Module, device: torch.device):
        super().__init__()
        self.head, self.device = head, device
        self.max_positions = head.max_positions

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head.token_embeddings(input_ids.to(self.device)).to(CPU)

    def embed(self, input_ids: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        prefix = None if prefix is None else prefix.to(self.device)
        return self.head.embed(input_ids.to(self.device), prefix).to(CPU)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head.logits(hidden.to(self.device)).to(CPU)


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc keeps the float weights freed while
    loading, ~15 % of a quantized server's memory; elsewhere this does nothing)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


PREFILL_CHUNK = 512  # positions: longer steps on a session run in chunks of this many


class StepCancelled(RuntimeError):
    """A pass stopped early because its ``should_stop`` said so."""


def _stop_hook(should_stop: Callable[[], bool]) -> Callable:
    """A gradient hook on a block's output: the backward pass checks ``should_stop`` before that
    block's backward as the forward does before its forward."""

    def hook(grad: torch.Tensor) -> None:
        if should_stop():
            raise StepCancelled("the backward pass was cancelled: nobody waits for its result any more")

    return hook


FLOAT16_LIMIT = torch.finfo(torch.float16).max  # an infinite float16 hidden state becomes ±this


def _guard(hidden: torch.Tensor) -> torch.Tensor:
    """A block's output, in float16 with infinities made the largest finite values (as
    transformers clamps models whose activations outgrow float16, Gemma's among them): an overflow
    would otherwise turn the rest of the chain into inf and NaN. Finite values, and other dtypes,
    stay as they are."""
    if hidden.dtype != torch.float16:
        return hidden
    return hidden.nan_to_num(nan=float("nan"), posinf=FLOAT16_LIMIT, neginf=-FLOAT16_LIMIT)


class BlockRange(torch.nn.Module):
    """Blocks ``[start, end)`` of a model run as one unit, sharing one step context.

    ``forward(hidden [batch, seq, hidden], session=None, hypo_ids=None) -> hidden``. With a
    ``session`` (see :meth:`open_session`) the step continues after the positions already cached
    there; ``hypo_ids`` reorders the cached rows first (beam search). Without one, the call is a
    stateless forward over a full sequence (used for batches and backward passes).

    Hidden states come in and go out on the CPU (where the wire and the client are), in any float
    dtype; each block computes on its device (:attr:`block_devices`, set by
    :meth:`Checkpoint.load_blocks`), where its weights and its part of every KV cache live.
    """

    def __init__(self, family: Family, config, start: int, end: int, blocks: list, dtype: torch.dtype,
                 devices: Sequence[torch.device] | None = None):
        super().__init__()
        self.family, self.config, self.start, self.end, self.dtype = family, config, start, end, dtype
        self.blocks = torch.nn.ModuleList(blocks)
        # where each block's weights and caches live (consecutive blocks per device: see engine.devices)
        self.block_devices = list(devices) if devices is not None else [CPU] * len(blocks)
        self.io_device = CPU  # where outputs go (a throughput measurement keeps them on the device)
        # the range this one is part of (see sub): ranges may share blocks, not roots. Set past
        # nn.Module's __setattr__, which would make it a submodule (a cycle)
        object.__setattr__(self, "root", self)
        self._exact = False  # batch_exact, once found true
        num_kv_heads, head_dim = family.kv_heads(config)
        self.kv_shapes = [LayerKVShape(num_kv_heads, head_dim)] * len(blocks)

    def sub(self, start: int, end: int) -> BlockRange:
        """Blocks ``[start, end)`` of this range (global indices), sharing the same modules."""
        if not self.start <= start < end <= self.end:
            raise ValueError(f"blocks {start}:{end} are not within the blocks {self.start}:{self.end} held here")
        if (start, end) == (self.start, self.end):
            return self
        blocks = list(self.blocks)[start - self.start : end - self.start]
        devices = self.block_devices[start - self.start : end - self.start]
        part = BlockRange(self.family, self.config, start, end, blocks, self.dtype, devices)
        object.__setattr__(part, "root", self.root)
        return part

    @property
    def devices(self) -> list[torch.device]:
        """The devices this range computes on, in order."""
        return list(dict.fromkeys(self.block_devices))

    def open_session(
        self,
        batch: int,
        max_length: int,
        budget: KVCacheBudget | None = None,
        owner: str | None = None,
        owner_limit: int | None = None,
    ) -> SessionKV:
        """A KV cache for ``batch × max_length`` tokens; taken from ``budget`` when one is given
        (raising ``CacheFullError`` if it, or ``owner``'s share ``owner_limit``, does not fit)."""
        if budget is None:
            return SessionKV(None, batch=batch, max_length=max_length, layers=self.kv_shapes, dtype=self.dtype,
                             device=self.block_devices)
        return budget.allocate(
            batch=batch, max_length=max_length, layers=self.kv_shapes, dtype=self.dtype, device=self.block_devices,
            owner=owner, owner_limit=owner_limit,
        )

    def forward(
        self,
        hidden: torch.Tensor,
        session: SessionKV | None = None,
        hypo_ids: torch.Tensor | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Run the blocks. A step of more than :data:`PREFILL_CHUNK` positions on a session runs
        as consecutive chunks of that many (so its attention's memory stays bounded however long
        the prompt), and a stateless pass over many rows runs them in groups of about that many
        positions; every caller chunks the same way, so results are the same everywhere.

        ``should_stop`` is checked before every block of every chunk (and, when the output
        requires grad, before every block's backward): once it returns true the pass ends with
        :class:`StepCancelled` (work nobody waits for any more stops; the session's
        cache is then unusable, close it)."""
        if hidden.dim() != 3 or hidden.shape[-1] != self.config.hidden_size or hidden.shape[1] == 0:
            raise ValueError(
                f"hidden states must have shape [batch, seq ≥ 1, {self.config.hidden_size}], got {list(hidden.shape)}"
            )
        batch, seq, _ = hidden.shape
        if session is None:  # stateless: rows in groups of about PREFILL_CHUNK positions (bounded activations)
            rows = max(1, PREFILL_CHUNK // seq)
            if batch <= rows:
                return self._run(hidden, None, should_stop)
            return torch.cat([self._run(hidden[i : i + rows], None, should_stop) for i in range(0, batch, rows)])
        if batch != session.batch:
            raise ValueError(f"the session was opened for batch {session.batch}, got hidden states of batch {batch}")
        session.check_room(seq)
        if hypo_ids is not None:
            session.reorder(hypo_ids)
        if seq <= PREFILL_CHUNK:
            return self._run(hidden, session, should_stop)
        chunks = [self._run(hidden[:, i : i + PREFILL_CHUNK], session, should_stop) for i in range(0, seq, PREFILL_CHUNK)]
        return torch.cat(chunks, dim=1)

    def run_batch(
        self,
        steps: list[tuple[torch.Tensor, SessionKV]],
        should_stop: Callable[[], bool] | None = None,
        per_position: Sequence[bool] | None = None,
    ) -> list[torch.Tensor]:
        """The steps of several sessions of batch 1 (``(hidden [1, seq, hidden], session)``, each
        at most :data:`PREFILL_CHUNK` positions) as one pass: attention runs per session (decode
        steps over the same cached positions in one matmul), each linear over pools of sessions'
        rows as large as its kernel was measured batch-invariant for (see
        :func:`~swarm.engine.fast.run_per_segment`), the rest once. Each output is bit-identical
        to the session's step run alone (a session of batch 1 always steps this way). Blocks whose
        linears are not wrapped to run per session (not :attr:`batch_exact`) run the steps one
        after another. Raises ``ValueError`` for a step that does not fit its session (see
        :meth:`check_batch_step`); nothing has run then.

        ``per_position[i]``: step ``i``'s positions are computed each as its own decode step
        would be (a speculative verification: position ``j`` gives the bits a step of that one
        token after the ones before it gives), as segments of one position sharing the session's
        cache; without batch-exact linears, one position after another."""
        flags = list(per_position) if per_position is not None else [False] * len(steps)
        for hidden, session in steps:
            self.check_batch_step(hidden, session)
        if len({id(session) for _, session in steps}) != len(steps):
            raise ValueError("a session may appear once in a batched step")
        if not self.batch_exact and (len(steps) > 1 or any(f and h.shape[1] > 1 for f, (h, _) in zip(flags, steps))):
            return [self._one_by_one(step, flag, should_stop) for step, flag in zip(steps, flags)]
        segments, caches = [], []
        for (hidden, session), each in zip(steps, flags):
            lengths = [1] * hidden.shape[1] if each else [hidden.shape[1]]
            past = session.length
            for seq in lengths:
                segment = StepContext(past=past, seq=seq)
                self.family.prepare_step(self.config, segment, self.dtype, 1)
                segments.append(segment)
                caches.append(session)
                past += seq
        ctx = StepContext.batched(segments)
        x = steps[0][0].to(self.dtype) if len(steps) == 1 else torch.cat([h.to(self.dtype) for h, _ in steps], dim=1)
        token = SEGMENTS.set(tuple(s.seq for s in segments))
        try:
            for i, block in enumerate(self.blocks):
                if should_stop is not None and should_stop():
                    raise StepCancelled("the pass was cancelled: nobody waits for its result any more")
                x, ctx = self._onto(i, x, ctx)
                x = _guard(block(x, ctx, [(session.keys[i], session.values[i]) for session in caches]))
        finally:
            SEGMENTS.reset(token)
        for hidden, session in steps:
            session.advance(hidden.shape[1])
        x = x.to(self.io_device)
        return [x] if len(steps) == 1 else list(x.split([h.shape[1] for h, _ in steps], dim=1))

    def _onto(self, i: int, x: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, StepContext]:
        """The input of block ``i`` and its step context, on that block's device."""
        device = self.block_devices[i]
        return (x if x.device == device else x.to(device)), ctx.to(device)

    def _one_by_one(self, step: tuple[torch.Tensor, SessionKV], each: bool, should_stop) -> torch.Tensor:
        """One step of :meth:`run_batch` alone; ``each``: position after position."""
        hidden, session = step
        if not each or hidden.shape[1] == 1:
            return self.run_batch([step], should_stop)[0]
        return torch.cat([self.run_batch([(hidden[:, j : j + 1], session)], should_stop)[0] for j in range(hidden.shape[1])], dim=1)

    def check_batch_step(self, hidden: torch.Tensor, session: SessionKV) -> None:
        """``ValueError`` unless ``hidden`` is one step :meth:`run_batch` can run on ``session``:
        ``[1, 1..PREFILL_CHUNK, hidden_size]``, on a session of batch 1 with room for it."""
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[-1] != self.config.hidden_size:
            raise ValueError(f"a batched step needs hidden states [1, seq, {self.config.hidden_size}], "
                             f"got {list(hidden.shape)}")
        if session.batch != 1 or not 1 <= hidden.shape[1] <= PREFILL_CHUNK:
            raise ValueError(f"a batched step needs sessions of batch 1 and 1 to {PREFILL_CHUNK} positions")
        session.check_room(hidden.shape[1])

    @property
    def batch_exact(self) -> bool:
        """Whether :meth:`run_batch` may run several sessions in one pass: every linear is wrapped
        to pool only sessions' rows it is invariant for (as :func:`~swarm.engine.adapters.attach` wraps them)."""
        if not self._exact:  # once wrapped, always wrapped: walked until then, not on every pass
            wrapped = {id(m.base) for m in self.modules() if hasattr(m, "base") and is_frozen_linear(m.base)}
            self._exact = all(id(m) in wrapped for m in self.modules() if is_frozen_linear(m))
        return self._exact

    def _run(self, hidden: torch.Tensor, session: SessionKV | None, should_stop) -> torch.Tensor:
        # hidden: [batch, seq, hidden_size]; writes positions [past, past + seq) of the session
        if session is not None and session.batch == 1:  # the way every batch-1 session steps (batched or not)
            return self.run_batch([(hidden, session)], should_stop)[0]
        batch, seq, _ = hidden.shape
        ctx = StepContext(past=session.length if session is not None else 0, seq=seq)
        self.family.prepare_step(self.config, ctx, self.dtype, batch)
        hidden = hidden.to(self.dtype)
        for i, block in enumerate(self.blocks):
            if should_stop is not None and should_stop():
                raise StepCancelled("the pass was cancelled: nobody waits for its result any more")
            kv = (session.keys[i], session.values[i]) if session is not None else None
            hidden, ctx = self._onto(i, hidden, ctx)
            hidden = _guard(block(hidden, ctx, kv))
            if should_stop is not None and hidden.requires_grad:  # the backward asks too, block by block
                hidden.register_hook(_stop_hook(should_stop))
        if session is not None:
            session.advance(seq)
        return hidden.to(self.io_device)
