"""Adapters applied from outside (engine/adapters.py, engine/adapter_io.py) against transformers + peft.

The oracle is peft itself: an adapter saved by peft loads here, and the engine's logits, loss and
LoRA gradients equal peft's on the transformers model of the same checkpoint."""

from __future__ import annotations

import pytest
import torch

from conftest import NEW_FAMILIES, write_tiny_checkpoint
from swarm.engine.adapter_io import AdapterError, load_adapter, save_deep_prompt, save_lora, save_prompt
from swarm.engine.adapters import (
    AdapterSpec,
    applied,
    attach,
    check_tensors,
    init_deep_prompts,
    init_lora,
    resolve_targets,
    run_backward,
    run_forward,
    span_tensors,
)
from swarm.engine.checkpoint import Checkpoint

TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "bloom": ["query_key_value", "dense"]}


def assert_relative(ours: torch.Tensor, theirs: torch.Tensor, tol: float) -> None:
    """Largest difference ≤ ``tol`` × the largest magnitude (relative to the tensor, not per element)."""
    scale = theirs.abs().max().item()
    assert (ours - theirs).abs().max().item() <= tol * scale, (ours - theirs).abs().max().item() / scale


@pytest.fixture(scope="module", params=["llama", "bloom"])
def peft_case(request, tmp_path_factory):
    """A tiny checkpoint and a LoRA adapter saved by peft with random non-zero weights."""
    import transformers
    from peft import LoraConfig, get_peft_model

    family = request.param
    root = tmp_path_factory.mktemp(f"peft-{family}")
    model_dir = write_tiny_checkpoint(root / "model", family)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(root / "adapter")
    return family, model_dir, root / "adapter", peft_model


def _engine_logits(checkpoint, adapter, ids, with_grad=False):
    head = checkpoint.load_head()
    blocks = attach(checkpoint.load_blocks(0, checkpoint.num_blocks))
    with torch.set_grad_enabled(with_grad), applied(blocks, adapter.tensors, adapter.spec):
        return head.logits(blocks(head.embed(ids)))


def test_peft_adapter_loads_and_matches_peft_logits(peft_case):
    family, model_dir, adapter_dir, peft_model = peft_case
    checkpoint = Checkpoint(model_dir)
    adapter = load_adapter(adapter_dir, checkpoint)
    assert adapter.kind == "lora" and adapter.spec.scale == 2.0
    ids = torch.randint(3, 300, (2, 9))
    ours = _engine_logits(checkpoint, adapter, ids)
    with torch.no_grad():
        theirs = peft_model.eval()(ids).logits
        plain = _engine_logits(checkpoint, load_adapter(adapter_dir, checkpoint).__class__("lora"), ids)
    assert (plain - theirs).abs().max() > 1e-2, "the adapter must change the output"
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_lora_loss_and_gradients_equal_peft(peft_case):
    family, model_dir, adapter_dir, peft_model = peft_case
    checkpoint = Checkpoint(model_dir)
    adapter = load_adapter(adapter_dir, checkpoint)
    ids = torch.randint(3, 300, (2, 9))
    params = {k: v.clone().requires_grad_(True) for k, v in adapter.tensors.items()}
    adapter.tensors = params
    logits = _engine_logits(checkpoint, adapter, ids, with_grad=True)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    peft_model.zero_grad()
    out = peft_model.train()(ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(loss, out.loss, rtol=1e-4, atol=1e-5)
    theirs = {n: p.grad for n, p in peft_model.named_parameters() if "lora_" in n}
    assert len(theirs) == len(params)
    for key, p in params.items():
        index, rest = key.split(".", 1)
        path, which = rest.rsplit(".lora_", 1)
        match = [g for n, g in theirs.items() if f".{index}.{path}.lora_{which}." in n]
        assert len(match) == 1, key
        assert_relative(p.grad, match[0], 1e-4)


def test_saved_lora_round_trips_through_peft(peft_case, tmp_path):
    import transformers
    from peft import PeftModel

    family, model_dir, adapter_dir, peft_model = peft_case
    checkpoint = Checkpoint(model_dir)
    adapter = load_adapter(adapter_dir, checkpoint)
    targets = resolve_targets(checkpoint, TARGETS[family])
    save_lora(tmp_path / "again", checkpoint, adapter.tensors, rank=4, alpha=8, dropout=0.0, targets=targets,
              base_model=str(model_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(model, tmp_path / "again").eval()
    ids = torch.randint(3, 300, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, peft_model.eval()(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_span_backward_equals_autograd_with_lora_dropout_and_deep_prompts(family, tmp_path):
    """Backward over two spans (recomputing each span's forward, as servers do) equals one autograd
    pass through all blocks; LoRA dropout masks are the same in both."""
    checkpoint = Checkpoint(write_tiny_checkpoint(tmp_path, family))
    targets = resolve_targets(checkpoint, "all-linear")
    tensors = init_lora(checkpoint, targets, rank=3, seed=0)
    for k in tensors:
        if k.endswith("lora_B"):
            tensors[k].normal_(0, 0.1)
    prompts = {k: torch.randn(v.shape) * 0.1 for k, v in init_deep_prompts(4, 3, 64).items()}
    tensors.update(prompts)
    spec = AdapterSpec(scale=0.5, dropout=0.2, seed=7)
    blocks = attach(checkpoint.load_blocks(0, 4))
    check_tensors(blocks, tensors)
    hidden = torch.randn(2, 6, 64)
    grad_out = torch.randn(2, 6, 64)

    leaves = {k: v.clone().requires_grad_(True) for k, v in tensors.items()}
    x = hidden.clone().requires_grad_(True)
    with applied(blocks, leaves, spec):
        out = blocks(x)
    out.backward(grad_out)

    first, second = blocks.sub(0, 2), blocks.sub(2, 4)
    mid = run_forward(first, hidden, span_tensors(tensors, 0, 2), spec)
    torch.testing.assert_close(run_forward(second, mid, span_tensors(tensors, 2, 4), spec), out.detach())
    g_mid, grads2 = run_backward(second, mid, grad_out, span_tensors(tensors, 2, 4), spec)
    g_in, grads1 = run_backward(first, hidden, g_mid, span_tensors(tensors, 0, 2), spec)
    torch.testing.assert_close(g_in, x.grad, rtol=1e-5, atol=1e-6)
    grads = {**grads1, **grads2}
    assert set(grads) == set(leaves)
    for k, leaf in leaves.items():
        torch.testing.assert_close(grads[k], leaf.grad, rtol=1e-5, atol=1e-6)


def test_prompt_and_deep_prompt_formats_round_trip(tmp_path):
    checkpoint = Checkpoint(write_tiny_checkpoint(tmp_path / "m", "llama"))
    prompt = torch.randn(5, 64)
    save_prompt(tmp_path / "p", checkpoint, prompt, "m")
    loaded = load_adapter(tmp_path / "p", checkpoint)
    assert loaded.kind == "prompt" and torch.equal(loaded.prompt, prompt) and not loaded.tensors
    deep = {k: torch.randn(v.shape) for k, v in init_deep_prompts(4, 5, 64).items()}
    save_deep_prompt(tmp_path / "d", checkpoint, prompt, deep, "m")
    loaded = load_adapter(tmp_path / "d", checkpoint)
    assert loaded.kind == "deep-prompt" and all(torch.equal(loaded.tensors[k], v) for k, v in deep.items())


def test_bad_targets_and_bad_tensors_are_named(tmp_path):
    checkpoint = Checkpoint(write_tiny_checkpoint(tmp_path / "m", "llama"))
    with pytest.raises(ValueError, match="--target-modules: qq_proj .*q_proj"):
        resolve_targets(checkpoint, ["qq_proj"])
    assert resolve_targets(checkpoint, None) == ["self_attn.q_proj", "self_attn.v_proj"]
    blocks = attach(checkpoint.load_blocks(0, 2))
    good = init_lora(checkpoint, ["self_attn.q_proj"], rank=2, seed=0, blocks=range(2))
    check_tensors(blocks, good)
    bad_cases = {
        "not a LoRA": {"0.self_attn.q_proj.weight": torch.zeros(2, 2)},
        "not in 0:2": {"3.prompt": torch.zeros(2, 64)},
        "no linear": {"0.self_attn.x_proj.lora_A": torch.zeros(2, 64), "0.self_attn.x_proj.lora_B": torch.zeros(64, 2)},
        "must be": {"0.self_attn.q_proj.lora_A": torch.zeros(2, 63), "0.self_attn.q_proj.lora_B": torch.zeros(64, 2)},
        "both be given": {"0.self_attn.q_proj.lora_A": torch.zeros(2, 64)},
        "float32": {"0.prompt": torch.zeros(2, 64, dtype=torch.int64)},
    }
    for message, tensors in bad_cases.items():
        with pytest.raises(ValueError, match=message):
            check_tensors(blocks, tensors)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json"):
        load_adapter(tmp_path / "empty", checkpoint)
    zero = {k: v[:0] if k.endswith("A") else v[:, :0] for k, v in good.items()}  # r = 0: was a ZeroDivisionError
    save_lora(tmp_path / "r0", checkpoint, zero, rank=0, alpha=4, dropout=0.0, targets=["self_attn.q_proj"], base_model="m")
    with pytest.raises(AdapterError, match="r ≥ 1"):
        load_adapter(tmp_path / "r0", checkpoint)


@pytest.mark.parametrize("family", ["llama", "bloom", *NEW_FAMILIES])
def test_prompt_tuning_adapter_equals_peft(family, tmp_path):
    """A prompt saved in peft's PROMPT_TUNING format means the same to peft as to the engine
    (for BLOOM: virtual tokens enter before the embedding LayerNorm, as in peft)."""
    import transformers
    from peft import PeftModel

    model_dir = write_tiny_checkpoint(tmp_path / "m", family)
    checkpoint = Checkpoint(model_dir)
    prompt = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    save_prompt(tmp_path / "p", checkpoint, prompt, str(model_dir))
    adapter = load_adapter(tmp_path / "p", checkpoint)
    head, blocks = checkpoint.load_head(), checkpoint.load_blocks(0, checkpoint.num_blocks)
    ids = torch.randint(3, 300, (2, 7))
    with torch.no_grad():
        ours = head.logits(blocks(head.embed(ids, prefix=adapter.prompt)))
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        theirs = PeftModel.from_pretrained(model, tmp_path / "p").eval()(input_ids=ids).logits
    assert ours.shape == theirs.shape == (2, 12, 320)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_generation_with_a_prompt_adapter_equals_its_forward_bloom(tmp_path):
    """Generation puts a prompt adapter's virtual tokens where training and peft do: through
    ``head.embed(ids, prefix)`` (for BLOOM, before the embedding LayerNorm). Greedy cached
    generation equals greedy argmax over the whole sequence's forward, recomputed each token."""
    from swarm.engine.generation import GenerationConfig, LocalSession, generate

    checkpoint = Checkpoint(write_tiny_checkpoint(tmp_path / "m", "bloom"))
    prompt = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3
    head, blocks = checkpoint.load_head(), checkpoint.load_blocks(0, checkpoint.num_blocks)
    seq = [5, 17, 42]
    ours = generate(head, lambda b, n: LocalSession(blocks, b, n), seq, GenerationConfig(max_new_tokens=5, eos_token_ids=()),
                    prefix=prompt)
    with torch.no_grad():
        for _ in range(5):
            seq.append(int(head.logits(blocks(head.embed(torch.tensor([seq]), prefix=prompt)))[0, -1].argmax()))
    assert ours == seq[-5:]


def test_adapter_keys_are_canonical(tmp_path):
    """A stranger's key with a trailing newline, a leading zero or a non-ASCII digit names no
    tensor ``applied`` can find: refused by ``check_tensors`` (it used to pass, then fail with a
    KeyError in the pass, a traceback in the server's log)."""
    checkpoint = Checkpoint(write_tiny_checkpoint(tmp_path / "m", "llama"))
    blocks = attach(checkpoint.load_blocks(0, 1))
    good = init_lora(checkpoint, ["self_attn.q_proj"], rank=2, seed=0, blocks=range(1))
    for rename in (lambda k: k + "\n", lambda k: "0" + k, lambda k: "\u0660" + k[1:]):
        with pytest.raises(ValueError, match="not a LoRA or deep-prompt name"):
            check_tensors(blocks, {rename(k): v for k, v in good.items()})
    with pytest.raises(ValueError, match="not a LoRA or deep-prompt name"):
        check_tensors(blocks, {"0.self_attn.q_proj.lora_A\n": good["0.self_attn.q_proj.lora_A"],
                               "0.self_attn.q_proj.lora_B": good["0.self_attn.q_proj.lora_B"]})
