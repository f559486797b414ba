"""The offloading baseline: the whole model in one process, its blocks' weights read from disk anew
for every pass, as a user with one machine and too little memory runs a model.

The embeddings, final norm and LM head stay resident (they are small next to the blocks and a
user's process keeps them); each block's weights are read from the safetensors file each time a
pass reaches it (every decode step, every prefill chunk's pass, every forward), used, and dropped;
the KV cache stays in memory. Blocks are the engine's (:meth:`Checkpoint.load_blocks`), so the
math is the swarm servers' math. Two ways to read a block:

- ``mmap``: the engine's :class:`Checkpoint` as it is: the file is memory-mapped and each tensor
  copied out of the map (page faults bring the bytes in);
- ``stream``: plain reads of the block's byte range (located once from the file's header) into a
  buffer reused every other block, the tensors being views of that buffer (no copy, no page
  faults on fresh memory).

With ``prefetch`` a reader thread loads block i+1 while block i computes. ``fast`` (packing
bfloat16 linears as each block loads) is off: the packing copy costs more than it saves on
weights used once per load (1.1B model, capped decode: 0.65 steps/s with it, 1.2–1.3 without).

Run under a memory cap (``--cap-gb``: a memory cgroup, page cache included, see
:mod:`memcap`) smaller than the weights, the reads really go to the disk; caches are dropped
before each capped run. Measured on the random 1.1B Llama (bfloat16, 1.94 GB of blocks) under a
1.1 GB cap, ``stream`` is the faster mode (decode 1.3 steps/s against mmap's 1.1; forward 1×128
150 tokens/s against 129): one large read per block into a reused buffer, where the memory map
takes a page fault per 4 KB page and copies every tensor again into fresh memory (which faults
too). Both read the 1.94 GB from disk at every step (``/proc/self/io``), so the disk's read rate
bounds them. Results in ``scripts/results/offload.json``.

    python scripts/offload.py MODEL_DIR [--mode stream] [--prompt 128,1024] [--steps 6]
        [--forward 1x128,16x128] [--cap-gb 1.1 [--timeout 300]] [--fast] [--no-prefetch] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import swarm  # noqa: F401  (first: it sets OpenMP's spin count, which must precede PyTorch)
import torch
from memcap import drop_caches, memory_cgroup, run_capped  # a sibling script (its folder is on sys.path)

from swarm.cache.kv import LayerKVShape, SessionKV
from swarm.engine.checkpoint import BlockRange, Checkpoint, CheckpointError, parse_dtype

MODES = ("mmap", "stream")
SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MERGE_GAP = 1 << 20  # bytes: tensors closer than this in a file are read in one go
DISK_SHARE = 0.9  # a capped pass reading less than this share of the blocks from disk got help from the page cache
BUFFER_SLOTS = 2  # stream mode: read buffers in turn (the block computing, the block being read)


class StreamedCheckpoint(Checkpoint):
    """A :class:`Checkpoint` whose tensors come from plain reads of their byte ranges, not from a
    memory map. Tensors are views of a read buffer: while :attr:`slot` is set, reads go into that
    slot's buffers, reused by the next read into the same slot (so a block loaded into a slot is
    valid until the next load into it); with no slot, each read gets a fresh buffer."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self._layouts = {file: _layout(file) for file in self.files_of(self.tensor_names())}
        self.slot: int | None = None
        self._buffers: dict[tuple[int, int], torch.Tensor] = {}

    def read(self, keys: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        tensors, run_index = {}, 0
        for file, file_keys in self.files_of(keys).items():
            layout = self._layouts[file]
            wanted = sorted(file_keys, key=lambda k: layout[k][2])
            with open(file, "rb", buffering=0) as f:
                for run in _runs(wanted, layout):
                    start, end = layout[run[0]][2], max(layout[k][3] for k in run)
                    buffer = self._buffer(run_index, end - start)
                    run_index += 1
                    _read_into(f, start, buffer)
                    for key in run:
                        tensor_dtype, shape, a, b = layout[key]
                        raw = buffer[a - start : b - start]
                        if (a - start) % tensor_dtype.itemsize:  # misaligned for its type: copy it out
                            raw = raw.clone()
                        tensors[key] = raw.view(tensor_dtype).view(shape).to(dtype)
        self.keys_read += keys
        return tensors

    def _buffer(self, run_index: int, size: int) -> torch.Tensor:
        if self.slot is None:
            return torch.empty(size, dtype=torch.uint8)
        key = (self.slot, run_index)
        if key not in self._buffers or self._buffers[key].numel() < size:
            self._buffers.pop(key, None)
            self._buffers[key] = torch.empty(size, dtype=torch.uint8)
        return self._buffers[key][:size]


def _layout(file: Path) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """Each tensor's dtype, shape and absolute byte range ``[start, end)`` in a safetensors ``file``
    (its header is an 8-byte little-endian length, then that much JSON)."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    layout = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {key} has dtype {info['dtype']}, which streaming does not read")
        start, end = info["data_offsets"]
        layout[key] = (SAFETENSORS_DTYPES[info["dtype"]], info["shape"], 8 + size + start, 8 + size + end)
    return layout


def _runs(keys: list[str], layout: dict) -> list[list[str]]:
    """``keys`` (sorted by offset) grouped into runs of tensors that lie within ``MERGE_GAP`` of each other."""
    runs: list[list[str]] = []
    for key in keys:
        if runs and layout[key][2] - max(layout[k][3] for k in runs[-1]) <= MERGE_GAP:
            runs[-1].append(key)
        else:
            runs.append([key])
    return runs


def _read_into(f, offset: int, buffer: torch.Tensor) -> None:
    view, done = memoryview(buffer.numpy()), 0
    while done < len(view):
        n = os.preadv(f.fileno(), [view[done:]], offset + done)
        if n == 0:
            raise CheckpointError(f"{f.name} ends before byte {offset + len(view)}: it is truncated")
        done += n


def open_checkpoint(path: str | Path, mode: str) -> Checkpoint:
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    return Checkpoint(path) if mode == "mmap" else StreamedCheckpoint(path)


@dataclass
class IOStats:
    """Where a pass's time went: ``load_s`` reading and building blocks (in whichever thread),
    ``wait_s`` the computing thread waiting for a block."""

    load_s: float = 0.0
    wait_s: float = 0.0
    blocks: int = 0


class OffloadedModel:
    """The whole model in this process with only the head resident: ``run(hidden, sessions)``
    reads every block's weights from the checkpoint again and runs it.

    ``fast`` packs each block's bfloat16 linears as it is loaded (see :mod:`swarm.engine.fast`);
    that costs a copy per load, which a block used once per load may not earn back."""

    def __init__(
        self,
        path: str | Path,
        dtype: torch.dtype = torch.bfloat16,
        mode: str = "stream",
        fast: bool = False,
        prefetch: bool = True,
    ):
        self.checkpoint = open_checkpoint(path, mode)
        self.dtype, self.mode, self.fast, self.prefetch = dtype, mode, fast, prefetch
        self.head = self.checkpoint.load_head(dtype)
        self.stats = IOStats()
        self._kv_shape = LayerKVShape(*self.checkpoint.family.kv_heads(self.checkpoint.config))

    @property
    def num_blocks(self) -> int:
        return self.checkpoint.num_blocks

    def _load(self, index: int) -> BlockRange:
        t = time.perf_counter()
        streamed = isinstance(self.checkpoint, StreamedCheckpoint)
        if streamed:
            self.checkpoint.slot = index % BUFFER_SLOTS
        try:
            block = self.checkpoint.load_blocks(index, index + 1, self.dtype, fast=self.fast)
        finally:
            if streamed:
                self.checkpoint.slot = None
        self.stats.load_s += time.perf_counter() - t
        self.stats.blocks += 1
        return block

    def blocks(self) -> Iterator[BlockRange]:
        """Every block in order, each read anew. A block is valid until the next one is asked for
        (stream mode reuses its buffer then), so use each before asking for more."""
        n = self.num_blocks
        if not self.prefetch:
            for index in range(n):
                t = time.perf_counter()
                block = self._load(index)
                self.stats.wait_s += time.perf_counter() - t
                yield block
                del block
            return
        with ThreadPoolExecutor(1, thread_name_prefix="offload-reader") as reader:
            pending = reader.submit(self._load, 0)
            for index in range(n):
                t = time.perf_counter()
                block = pending.result()
                self.stats.wait_s += time.perf_counter() - t
                if index + 1 < n:
                    pending = reader.submit(self._load, index + 1)
                yield block
                del block

    def run(
        self, hidden: torch.Tensor, sessions: list[SessionKV] | None = None, hypo_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``hidden: [batch, seq, hidden]`` through every block: with ``sessions`` (one per block,
        from :meth:`open_kv`) a step after their cached positions, else a stateless forward."""
        with torch.no_grad():
            for index, block in enumerate(self.blocks()):
                hidden = block(hidden, None if sessions is None else sessions[index], hypo_ids)
        return hidden

    def open_kv(self, batch: int, max_length: int) -> list[SessionKV]:
        return [
            SessionKV(None, batch=batch, max_length=max_length, layers=[self._kv_shape], dtype=self.dtype)
            for _ in range(self.num_blocks)
        ]

    def open_session(self, batch: int, max_length: int) -> OffloadedSession:
        """An inference session for :func:`swarm.engine.generation.generate` (an ``OpenSession``)."""
        return OffloadedSession(self, self.open_kv(batch, max_length))


@dataclass
class OffloadedSession:
    """One sequence batch's KV cache (a :class:`SessionKV` per block) over an offloaded model."""

    model: OffloadedModel
    kv: list[SessionKV]

    def step(self, hidden: torch.Tensor, hypo_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.run(hidden, self.kv, hypo_ids)

    def close(self) -> None:
        for session in self.kv:
            session.close()


def disk_read_bytes() -> int:
    """Bytes this process has had read from storage (page-cache hits excluded)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def weight_bytes(ckpt: Checkpoint) -> tuple[int, int]:
    """Bytes in the checkpoint's files of every block's tensors (what each pass reads) and of the rest."""
    prefixes = tuple(ckpt.family.block_prefix(ckpt.config, i) for i in range(ckpt.num_blocks))
    names = set(ckpt.tensor_names())
    blocks = rest = 0
    for file in ckpt.path.glob("*.safetensors"):
        for key, (_, _, start, end) in _layout(file).items():
            if key not in names:
                continue
            if key.startswith(prefixes):
                blocks += end - start
            else:
                rest += end - start
    return blocks, rest


def measure_decode(model: OffloadedModel, prompt: int, steps: int, seed: int = 0) -> dict:
    """Greedy single-sequence decoding after a ``prompt``-token prompt of random ids: the prefill's
    time, then ``steps`` steps (embed, every block, LM head, argmax), each timed."""
    ids = torch.randint(
        0, model.checkpoint.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(seed)
    )
    session = model.open_session(1, prompt + steps)
    head = model.head
    try:
        with torch.no_grad():
            t = time.perf_counter()
            token = head.logits(session.step(head.embed(ids))[:, -1:]).argmax(-1)
            prefill_s = time.perf_counter() - t
            times, reads, waits = [], [], []
            for _ in range(steps):
                read0, wait0, t = disk_read_bytes(), model.stats.wait_s, time.perf_counter()
                token = head.logits(session.step(head.embed(token))[:, -1:]).argmax(-1)
                times.append(time.perf_counter() - t)
                reads.append(disk_read_bytes() - read0)
                waits.append(model.stats.wait_s - wait0)
    finally:
        session.close()
    return {
        "prompt": prompt,
        "prefill_s": prefill_s,
        "steps": steps,
        "step_s": times,
        "steps_per_s": len(times) / sum(times),
        "weight_wait_s_per_step": sum(waits) / len(waits),
        "disk_read_bytes_per_step": sum(reads) // len(reads),
    }


def measure_forward(model: OffloadedModel, batch: int, length: int, seed: int = 0) -> dict:
    """One stateless forward of ``batch × length`` random tokens through the embeddings and every
    block (no KV cache, as a fine-tuning forward runs), timed; the LM head is timed apart, a
    sequence at a time (the swarm's forward protocol covers the blocks only)."""
    vocab = model.checkpoint.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        read0, wait0, t = disk_read_bytes(), model.stats.wait_s, time.perf_counter()
        hidden = model.run(model.head.embed(ids))
        seconds = time.perf_counter() - t
        read, wait = disk_read_bytes() - read0, model.stats.wait_s - wait0
        t = time.perf_counter()
        for row in hidden.split(1):  # all 16×128 tokens' float32 logits at once: 262 MB for a 32k vocabulary
            model.head.logits(row)
        head_s = time.perf_counter() - t
    return {
        "batch": batch,
        "length": length,
        "seconds": seconds,
        "tokens_per_s": batch * length / seconds,
        "head_s": head_s,
        "weight_wait_s": wait,
        "disk_read_bytes": read,
    }


@dataclass(frozen=True)
class Plan:
    """What to measure: decode after each of ``prompts`` (``steps`` steps each) and a forward of
    each ``(batch, length)`` in ``forwards``, for the model at ``path`` read in ``mode``."""

    path: str
    mode: str = "stream"
    dtype: str = "bfloat16"
    prompts: tuple[int, ...] = (128, 1024)
    steps: int = 6
    forwards: tuple[tuple[int, int], ...] = ((1, 128), (16, 128))
    fast: bool = False
    prefetch: bool = True

    def runs(self) -> list[Plan]:
        """One plan per measurement (a capped run gives each its own process and cold caches)."""
        decodes = [Plan(**{**self.__dict__, "prompts": (p,), "forwards": ()}) for p in self.prompts]
        return decodes + [Plan(**{**self.__dict__, "prompts": (), "forwards": (f,)}) for f in self.forwards]

    def args(self) -> list[str]:
        """This plan as command-line arguments of this script."""
        args = [self.path, "--mode", self.mode, "--dtype", self.dtype, "--steps", str(self.steps)]
        args += [
            "--prompt",
            ",".join(map(str, self.prompts)),
            "--forward",
            ",".join(f"{b}x{n}" for b, n in self.forwards),
        ]
        return args + ["--fast" if self.fast else "--no-fast", "--prefetch" if self.prefetch else "--no-prefetch"]


def describe(plan: Plan, ckpt: Checkpoint) -> dict:
    """The header of a result: what ran, and the bytes read per pass and held resident."""
    blocks, rest = weight_bytes(ckpt)
    return {
        "model": str(plan.path),
        "mode": plan.mode,
        "dtype": plan.dtype,
        "fast": plan.fast,
        "prefetch": plan.prefetch,
        "block_weight_bytes": blocks,
        "resident_weight_bytes": rest,
    }


def measure(plan: Plan) -> dict:
    """Run ``plan`` in this process (no cap: whatever memory and page cache there is)."""
    model = OffloadedModel(plan.path, parse_dtype(plan.dtype), plan.mode, plan.fast, plan.prefetch)
    result = describe(plan, model.checkpoint) | {"decode": {}, "forward": {}}
    if plan.forwards:  # a small pass first: one-time costs (kernels, allocator) out of the timing
        model.run(model.head.embed(torch.zeros(1, 8, dtype=torch.long)))
    for prompt in plan.prompts:
        result["decode"][str(prompt)] = measure_decode(model, prompt, plan.steps)
    for batch, length in plan.forwards:
        result["forward"][f"{batch}x{length}"] = measure_forward(model, batch, length)
    return result | {"peak_rss_bytes": peak_rss_bytes()}


def measure_capped(plan: Plan, cap_bytes: int, timeout: float = 300.0) -> dict:
    """Run each measurement of ``plan`` in its own process inside a fresh memory cgroup of
    ``cap_bytes`` (page cache included), caches dropped before each. Each entry gains the
    group's peak memory (``cgroup_peak_bytes``) and the process's (``peak_rss_bytes``); a run
    that failed gets an ``error`` instead of figures: killed by the cap's OOM killer (the
    process's own memory does not fit), or not done in ``timeout`` s (it thrashes: its code
    pages and weights evict each other). Raises :class:`memcap.CgroupError` when not root."""
    result = describe(plan, open_checkpoint(plan.path, plan.mode)) | {
        "cap_bytes": cap_bytes,
        "decode": {},
        "forward": {},
    }
    for run in plan.runs():
        part, key = ("decode", str(run.prompts[0])) if run.prompts else ("forward", "x".join(map(str, run.forwards[0])))
        drop_caches()
        with memory_cgroup(f"swarm-offload-{os.getpid()}", cap_bytes) as group:
            cmd = [sys.executable, str(Path(__file__).resolve()), *run.args(), "--json"]
            try:
                done = run_capped(cmd, group, timeout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            except subprocess.TimeoutExpired:
                done = None
            peak, kills = group.peak_bytes(), group.oom_kills()
        if done is None:
            result[part][key] = {
                "error": f"not done in {timeout:.0f} s under a {cap_bytes / 1e9:.2f} GB cap (thrashing: too little "
                f"room for the process's own pages)",
                "cgroup_peak_bytes": peak,
            }
        elif done.returncode == 0:
            child = json.loads(done.stdout)
            entry = child[part][key] | {"cgroup_peak_bytes": peak, "peak_rss_bytes": child["peak_rss_bytes"]}
            read = entry.get("disk_read_bytes_per_step", entry.get("disk_read_bytes"))
            if read < DISK_SHARE * result["block_weight_bytes"]:
                entry["warning"] = (
                    f"only {read / result['block_weight_bytes']:.0%} of the blocks' bytes came from the disk per "
                    f"pass; the page cache served the rest (pages cached outside the cap, by another process "
                    f"reading the file meanwhile?): run this alone"
                )
            result[part][key] = entry
        else:
            why = "killed by the cap's OOM killer" if kills else f"exited with status {done.returncode}"
            last = done.stderr.strip().splitlines()[-1:] if done.stderr.strip() else []
            result[part][key] = {
                "error": f"{why} under a {cap_bytes / 1e9:.2f} GB cap" + "".join(f": {line}" for line in last),
                "cgroup_peak_bytes": peak,
            }
    return result


def baseline(plan: Plan, cap_bytes: int | None = None, timeout: float = 300.0) -> dict:
    """The offloading baseline's figures for ``plan``: capped (see :func:`measure_capped`, each
    measurement given ``timeout`` s) when ``cap_bytes`` is given, else in this process."""
    return measure(plan) if cap_bytes is None else measure_capped(plan, cap_bytes, timeout)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _shapes(text: str) -> tuple[tuple[int, int], ...]:
    try:
        return tuple((int(b), int(n)) for b, n in (x.lower().split("x") for x in text.split(",") if x))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--forward takes BATCHxLENGTH[,...], e.g. 1x128,16x128; got {text!r}"
        ) from None


def _decode_line(r: dict) -> str:
    return (
        f"{r['steps_per_s']:.3f} steps/s (prefill {r['prefill_s']:.1f} s, waiting for weights "
        f"{r['weight_wait_s_per_step']:.2f} s/step, disk {r['disk_read_bytes_per_step'] / 1e9:.2f} GB/step)"
    )


def _forward_line(r: dict) -> str:
    return (
        f"{r['tokens_per_s']:.1f} tokens/s ({r['seconds']:.1f} s, LM head apart {r['head_s']:.1f} s, "
        f"disk {r['disk_read_bytes'] / 1e9:.2f} GB)"
    )


def _warning(r: dict) -> str:
    return f"\n    WARNING: {r['warning']}" if "warning" in r else ""


def summary(result: dict) -> str:
    """``result`` (of :func:`baseline`) in a few lines for people."""
    cap = result.get("cap_bytes")
    title = (
        f"{result['model']} ({result['dtype']}, mode {result['mode']}, fast {result['fast']}, "
        f"prefetch {result['prefetch']}), cap {f'{cap / 1e9:.2f} GB' if cap else 'none'}: "
        f"{result['block_weight_bytes'] / 1e9:.2f} GB of blocks read per pass, "
        f"{result['resident_weight_bytes'] / 1e9:.2f} GB resident"
    )
    lines = [title]
    entries = [r for part in ("decode", "forward") for r in result[part].values()]
    for key, r in result["decode"].items():
        lines.append(f"  decode after {key:>5} tokens: {r.get('error') or _decode_line(r)}{_warning(r)}")
    for key, r in result["forward"].items():
        lines.append(f"  forward {key:>10}:     {r.get('error') or _forward_line(r)}{_warning(r)}")
    rss = max((r["peak_rss_bytes"] for r in entries if "peak_rss_bytes" in r), default=result.get("peak_rss_bytes"))
    group = max((r["cgroup_peak_bytes"] for r in entries if r.get("cgroup_peak_bytes")), default=None)
    peaks = [f"peak RSS {rss / 1e9:.2f} GB"] if rss else []
    if group:
        peaks.append(f"peak memory of the cgroup (page cache included) {group / 1e9:.2f} GB")
    if peaks:
        lines.append("  " + ", ".join(peaks))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint directory (config.json, safetensors)")
    parser.add_argument(
        "--mode", choices=MODES, default="stream", help="how blocks are read: memory map or plain reads"
    )
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--prompt", type=_ints, default=(128, 1024), help="prompt lengths to decode after, e.g. 128,1024"
    )
    parser.add_argument("--steps", type=int, default=6, help="decode steps timed after each prompt")
    parser.add_argument(
        "--forward", type=_shapes, default=((1, 128), (16, 128)), help="stateless forwards, BATCHxLENGTH,..."
    )
    parser.add_argument(
        "--fast", action=argparse.BooleanOptionalAction, default=False, help="pack bf16 linears per load"
    )
    parser.add_argument(
        "--prefetch", action=argparse.BooleanOptionalAction, default=True, help="read block i+1 while i runs"
    )
    parser.add_argument("--cap-gb", type=float, help="run each measurement in a memory cgroup of this many GB (root)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds each capped measurement may take")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    plan = Plan(args.model, args.mode, args.dtype, args.prompt, args.steps, args.forward, args.fast, args.prefetch)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a TERM unwinds: the child is killed, the cgroup removed
    try:
        result = baseline(plan, None if args.cap_gb is None else int(args.cap_gb * 1e9), args.timeout)
    except (CheckpointError, ValueError, RuntimeError) as exc:
        sys.exit(f"error: {exc}")
    print(json.dumps(result) if args.json else summary(result), flush=True)


if __name__ == "__main__":
    main()
