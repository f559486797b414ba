"""What the benchmark scripts share: their results files, and a client for checkpoints without a
tokenizer.

Each benchmark prints its figures and writes them to ``scripts/results/NAME.json`` (``--out``
elsewhere) with the run's date, commit, machine and settings, so that `make docs`
(scripts/docs_figures.py) renders the docs' tables from the file and never from a typed copy::

    {"benchmark": "local", "date": "2026-12-05T10:00:00+00:00", "commit": "abc1234", "dirty": false,
     "machine": {"cpu_count": 2, "cpu": "AMD EPYC ...", "torch": "2.9.1", ...},
     "settings": {"steps": 64, ...}, ...the figures}

Clients go through the public facade (:func:`swarm.open`), as a user's program does.
:func:`open_swarm` opens one for the random 1.1B checkpoint too, which has no tokenizer: token ids
in, token ids out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "scripts" / "results"


def add_out(parser: argparse.ArgumentParser, name: str) -> None:
    """``--out PATH``, by default ``scripts/results/NAME.json``."""
    parser.add_argument("--out", type=Path, default=RESULTS / f"{name}.json",
                        help=f"write the figures here (default: scripts/results/{name}.json)")


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine() -> dict:
    """The machine and software a run measured: cores, CPU, memory, Python, PyTorch and its threads."""
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gb": _memory_gb(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [],
    }


def write_results(path: Path, benchmark: str, settings: dict, figures: dict) -> None:
    """Write ``figures`` to ``path`` as one JSON object, after the run's date, commit (``dirty``:
    tracked files differed from it), machine and ``settings``; prints where."""
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    record = {
        "benchmark": benchmark,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": None if dirty is None else bool(dirty),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine(),
        "settings": settings,
        **figures,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


def open_swarm(path: Path, initial_peers: Sequence[str], **options):
    """:func:`swarm.open` of the checkpoint at ``path``, joined through ``initial_peers``, with the
    client's ``options`` (``dtype``, ``push``, ``step_timeout``...). A checkpoint without tokenizer
    files (the random 1.1B) gets the same :class:`swarm.Swarm` with no tokenizer: its
    ``generate_ids``, ``blocks`` and ``status`` work, its text methods do not. Raises what
    :func:`swarm.open` raises."""
    import swarm
    from swarm.engine.checkpoint import Checkpoint
    from swarm.engine.client import TOKENIZER_FILES, ClientModel

    path = Path(path)
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        return swarm.open(path, initial_peers=list(initial_peers), **options)
    built = swarm.ClientOptions.build(model=str(path), initial_peers=tuple(initial_peers), **options)
    ckpt = Checkpoint(path)
    client = swarm.Swarm(built, ClientModel(path, ckpt, None, ckpt.load_head(built.torch_dtype), ()), None)
    client.connect()
    return client
