"""Fixtures: tiny random checkpoints of every family, written by transformers, with a real tokenizer.

The tokenizer is a byte-level BPE trained here on a few sentences (a real ``tokenizers`` tokenizer,
saved with the checkpoint), so ``swarm generate --model DIR "prompt"`` runs end to end offline.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import swarm  # noqa: F401  (first: it sets GOMP_SPINCOUNT before torch loads, as in the commands)
import torch  # noqa: E402

# A suite started in the background by a non-interactive shell (`make test &` in a script) inherits
# SIGINT ignored, and so would every command it starts: the tests that press Ctrl-C on a command
# need SIGINT's default there (a handler here becomes the default in a started program)
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

FAMILIES = ["llama", "mistral", "qwen2", "bloom"]
# families tested by tests/test_families.py (exact against transformers, through the swarm, LoRA)
NEW_FAMILIES = ["qwen3", "phi3", "gemma2", "gemma3_text", "mixtral", "qwen3_moe", "falcon"]
VOCAB = 320

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "A swarm of small machines can run a model too large for any one of them.",
    "Hidden states flow through a chain of servers, each holding a range of blocks.",
] * 20


def _tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)


def tiny_config(family: str, **overrides):
    import transformers

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if family == "bloom":
        cfg = transformers.BloomConfig(hidden_size=64, n_layer=4, n_head=4, **common)
    elif family == "falcon":  # the 40B/180B layout: grouped-query attention, ln_attn and ln_mlp, biases
        cfg = transformers.FalconConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_kv_heads=2,
                                        new_decoder_architecture=True, bias=True, ffn_hidden_size=128,
                                        max_position_embeddings=256, **common)
    else:
        cls = {
            "llama": transformers.LlamaConfig,
            "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config,
            "qwen3": transformers.Qwen3Config,
            "phi3": transformers.Phi3Config,
            "gemma2": transformers.Gemma2Config,
            "gemma3_text": transformers.Gemma3TextConfig,
            "mixtral": transformers.MixtralConfig,
            "qwen3_moe": transformers.Qwen3MoeConfig,
        }[family]
        extra = {"sliding_window": 5} if family == "mistral" else {}
        if family == "qwen3":
            extra = {"head_dim": 16}  # its default is 128, not hidden / heads
        if family == "phi3":  # a window shorter than the tests' sequences, and half the head rotated
            extra = {"sliding_window": 6, "partial_rotary_factor": 0.5, "pad_token_id": 0}
        if family == "gemma2":  # small caps, so the scores and logits are really capped; a short window
            extra = {"head_dim": 16, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 2.0,
                     "final_logit_softcapping": 3.0, "sliding_window": 6, "pad_token_id": 0}
        if family == "mixtral":  # 4 experts, 2 per token
            extra = {"num_local_experts": 4, "num_experts_per_tok": 2}
        if family == "qwen3_moe":  # experts in every other block (dense MLPs between), probabilities not renormalized
            extra = {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                     "decoder_sparse_step": 2, "norm_topk_prob": False}
        if family == "gemma3_text":  # a local layer then a global one, a short window, distinct RoPE bases
            extra = {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 6, "sliding_window_pattern": 2,
                     "pad_token_id": 0}
        cfg = cls(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **extra,
            **common,
        )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def write_tiny_checkpoint(directory: Path, family: str, seed: int = 0, config=None, **overrides) -> Path:
    """A random ``family`` model saved by transformers (safetensors) plus the tiny tokenizer
    (``config``: a transformers config of the model instead of :func:`tiny_config`'s)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config or tiny_config(family, **overrides))
    with torch.no_grad():  # larger weights than the default init, so logits are far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(directory)
    _tokenizer(directory)
    return directory


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_checkpoint(request, tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    return {f: write_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-all-{f}"), f) for f in FAMILIES}


def netns_marks() -> list:
    """The marks of a module of tests on emulated hosts (scripts/netlab.py): slow, netns, and
    skipped with the reason where network namespaces cannot be made."""
    from netlab import unavailable  # scripts/netlab.py (pytest's pythonpath)

    reason = unavailable()
    return [pytest.mark.netns, pytest.mark.slow,
            pytest.mark.skipif(reason is not None, reason=f"no emulated hosts: {reason}")]


@pytest.fixture(scope="module")
def tiny6(tmp_path_factory) -> Path:
    """A tiny llama of 6 blocks, for swarms across emulated hosts."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny6"), "llama", num_hidden_layers=6)


@pytest.fixture(scope="module")
def one_thread():
    """PyTorch on one thread for a module of tiny models: two threads only wait on each other (and
    stall when the cores are shared)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _offline_environment():
    # the suite never reaches a model hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    yield
