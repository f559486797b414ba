"""The newer families (Qwen3: per-head query/key norms; Phi-3: fused projections, partial rotary
embeddings, a sliding window on every layer) against transformers, the oracle, on tiny random
checkpoints: logits step by step with a KV cache, greedy tokens locally and through three real
`swarm serve` processes split at uneven block boundaries, and LoRA gradients through those servers
equal to local autograd."""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import NEW_FAMILIES, write_tiny_checkpoint
from swarm.engine.adapters import AdapterSpec, LocalBlocks, init_lora, resolve_targets
from swarm.engine.checkpoint import Checkpoint
from swarm.engine.families import get_family
from swarm_utils import assert_batched_steps_equal_alone, lora_grads, running_swarm

STEPS = [7, 1, 1, 1, 4, 1, 6]  # a prefill, single steps, chunks after the cache (past Phi-3's window of 6)
RANGES = ["0:1", "1:3", "3:4"]


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def checkpoint(request, tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def servers(checkpoint, tmp_path_factory):
    """Three `swarm serve` processes of ``checkpoint``, split at uneven block boundaries (one
    swarm for both tests that need one)."""
    home = tmp_path_factory.mktemp("swarm")
    with running_swarm(checkpoint, RANGES, home) as processes:
        yield processes, home


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 300, (2, n), generator=torch.Generator().manual_seed(seed))


def _steps_equal_transformers(checkpoint, cuts=(0, 1, 4)):
    """Logits of :data:`STEPS` with KV caches, the blocks split at ``cuts``, within 1e-4 of
    transformers' step by step; returns the model, the head, the parts and the ids."""
    ckpt = Checkpoint(checkpoint)
    ids = _ids(sum(STEPS))
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    head, parts = ckpt.load_head(), [ckpt.load_blocks(a, b) for a, b in zip(cuts, cuts[1:])]
    sessions = [p.open_session(batch=2, max_length=ids.shape[1]) for p in parts]
    past, pos = transformers.DynamicCache(config=model.config), 0
    with torch.no_grad():
        for n in STEPS:
            result = model(ids[:, pos : pos + n], past_key_values=past, use_cache=True)
            hidden = head.embed(ids[:, pos : pos + n])
            for part, session in zip(parts, sessions):
                hidden = part(hidden, session)
            diff = (head.logits(hidden) - result.logits.float()).abs().max().item()
            assert diff <= 1e-4, f"{n} tokens at position {pos}: max abs diff {diff}"
            past, pos = result.past_key_values, pos + n
    return model, head, parts, ids


def test_logits_step_by_step_equal_transformers(checkpoint):
    _steps_equal_transformers(checkpoint)


SIZES = dict(vocab_size=320, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
CONFIGS = {  # settings the tiny fixtures leave out: transformers config kwargs beside SIZES
    "qwen3-yarn": ("Qwen3Config", dict(head_dim=16, rope_scaling=YARN)),
    "qwen3-yarn-mscale": ("Qwen3Config", dict(head_dim=16, rope_scaling={
        **YARN, "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2, "mscale": 0.8, "mscale_all_dim": 0.5})),
    "qwen3-yarn-untruncated": ("Qwen3Config", dict(head_dim=32, rope_theta=1e6, rope_scaling={**YARN, "truncate": False})),
    "falcon-yarn": ("FalconConfig", dict(new_decoder_architecture=True, num_kv_heads=2, rope_scaling=YARN)),
    "qwen3_moe-window": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                moe_intermediate_size=32, use_sliding_window=True, sliding_window=4)),
    "gemma3-attn-softcap": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
                                                     pad_token_id=0, attn_logit_softcapping=2.0)),
}


@pytest.mark.parametrize("case", CONFIGS)
def test_more_settings_step_by_step_equal_transformers(case, tmp_path):
    """YaRN rotary scaling (Qwen3's long-context setting; its mscale and untruncated variants),
    Qwen3-MoE's one window on every layer, and Gemma 3 ignoring an attention soft cap as
    transformers does."""
    name, kwargs = CONFIGS[case]
    config = getattr(transformers, name)(**SIZES, **kwargs)
    _steps_equal_transformers(write_tiny_checkpoint(tmp_path, config.model_type, config=config))


def _gemma3_multimodal(tmp_path):
    """A tiny multimodal Gemma 3 checkpoint (a vision tower of one layer beside the language model)."""
    text = dict(SIZES, num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
                sliding_window_pattern=2, pad_token_id=0, final_logit_softcapping=3.0)  # a cap it ignores
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=300, boi_token_index=301, eoi_token_index=302)
    return write_tiny_checkpoint(tmp_path / "gemma3", "gemma3", config=config)


def test_a_multimodal_gemma3_checkpoint_serves_its_language_model(tmp_path):
    """model_type gemma3 (4B and up): the language model's logits are transformers' (text only; the
    vision tower is never read), its config read from text_config however little of it is stated,
    and a peft LoRA made on the whole model (vision tower included) loads with peft's logits."""
    import json

    from peft import LoraConfig, get_peft_model

    from swarm.engine.adapter_io import load_adapter
    from swarm.engine.adapters import applied, attach

    path = _gemma3_multimodal(tmp_path)
    _steps_equal_transformers(path, cuts=(0, 1, 3))
    ckpt = Checkpoint(path)
    assert ckpt.family.name == "gemma3" and not any("vision" in k for k in ckpt.keys_read)

    raw = json.loads((path / "config.json").read_text())
    defaults = transformers.Gemma3TextConfig().to_dict()
    raw["text_config"] = {k: v for k, v in raw["text_config"].items() if defaults.get(k) != v}
    assert len(raw["text_config"]) < len(defaults) // 2  # the Hub's configs look like this
    (path / "config.json").write_text(json.dumps(raw))
    assert Checkpoint(path).config == ckpt.config

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter = load_adapter(tmp_path / "adapter", ckpt)
    ids = _ids(9)
    head, blocks = ckpt.load_head(), attach(ckpt.load_blocks(0, 3))
    with torch.no_grad(), applied(blocks, adapter.tensors, adapter.spec):
        ours = head.logits(blocks(head.embed(ids)))
    with torch.no_grad():
        theirs = peft_model.eval()(ids).logits
        with peft_model.disable_adapter():
            assert (theirs - peft_model(ids).logits).abs().max() > 1e-2, "the adapter must change the output"
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family, settings, refusal", [
    ("qwen3", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "unsupported rope scaling type 'dynamic'"),
    ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention: an encoder"),
    ("gemma2", {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                 "original_max_position_embeddings": 64}}, "unsupported rope scaling type 'longrope'"),
    ("qwen3", {"rope_scaling": {"rope_type": "linear"}}, "has no 'factor'"),
    ("phi3", {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [2.0] * 3}},
     "longrope factors must number 4"),  # half the rotated half of a 16-wide head
])
def test_settings_swarm_does_not_compute_are_refused_at_load(family, settings, refusal, tmp_path):
    """Refused when the checkpoint is opened (a server never announces blocks it cannot run), in one line."""
    import json

    from swarm.engine.families import CheckpointError

    path = write_tiny_checkpoint(tmp_path, family)
    raw = json.loads((path / "config.json").read_text())
    raw.pop("rope_parameters", None)
    (path / "config.json").write_text(json.dumps({**raw, **settings}))
    with pytest.raises(CheckpointError, match=refusal) as refused:
        Checkpoint(path)
    assert "\n" not in str(refused.value) and "config.json" in str(refused.value)


@pytest.mark.slow
def test_greedy_tokens_through_three_servers_equal_transformers(checkpoint, servers, monkeypatch):
    from swarm.config import ClientOptions
    from swarm.engine.client import ClientModel, generate_local
    from swarm.engine.generation import GenerationConfig
    from swarm.facade import Swarm

    processes, home = servers
    monkeypatch.setenv("SWARM_HOME", str(home))
    client_model = ClientModel.load(checkpoint)
    prompt = client_model.encode("The capital of France is")
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=14, do_sample=False)
    expected = out[0, len(prompt) :].tolist()
    cfg = GenerationConfig(max_new_tokens=14)
    assert generate_local(client_model, prompt, cfg) == expected
    with Swarm(ClientOptions(model=str(checkpoint), initial_peers=(processes[0].maddr,)), client_model, None) as s:
        assert s.generate_ids(prompt, cfg) == expected


@pytest.mark.slow
def test_lora_gradients_through_three_servers_equal_local_autograd(checkpoint, servers, tmp_path):
    from swarm.p2p.client import ClientConfig
    from swarm.p2p.remote_blocks import RemoteBlocks
    from swarm.p2p.verify import VerifyPolicy

    ckpt = Checkpoint(checkpoint)
    targets = resolve_targets(ckpt, None)  # the family's default (peft's, or qkv_proj for Phi-3)
    assert {t.rsplit(".", 1)[-1] for t in targets} == set(get_family(ckpt.config.model_type).lora_default)
    tensors = init_lora(ckpt, targets, rank=2, seed=0)
    for key, value in tensors.items():
        if key.endswith("lora_B"):
            value.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    spec, ids, head = AdapterSpec(scale=2.0, dropout=0.1, seed=5), _ids(9, seed=4), ckpt.load_head()
    want_loss, want = lora_grads(head, LocalBlocks(ckpt.load_blocks(0, 4)), ids, tensors, spec)
    cfg = ClientConfig(request_timeout=10, step_timeout=20, wait_timeout=20, verify=VerifyPolicy("off"),
                       ledger=tmp_path / "verify.json")
    with RemoteBlocks.connect(checkpoint, [servers[0][0].maddr], cfg) as remote:
        loss, got = lora_grads(head, remote, ids, tensors, spec)
        assert [(s.start, s.end) for s in remote.last_spans] == [(0, 1), (1, 3), (3, 4)]
    assert abs(loss - want_loss) <= 1e-5 * abs(want_loss)
    for key in want:
        scale = want[key].abs().max().item()
        assert scale > 0 and (got[key] - want[key]).abs().max().item() <= 1e-5 * scale, key


def test_a_session_steps_the_same_alone_and_batched_with_others(checkpoint):
    """Servers batch sessions' steps (see tests/test_batching.py): bit-identical per session for
    these families too (soft-capped and windowed attention per segment)."""
    from swarm.engine.adapters import attach

    blocks = attach(Checkpoint(checkpoint).load_blocks(0, 4))
    assert blocks.batch_exact
    assert_batched_steps_equal_alone(blocks)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_lora_on_every_linear_of_a_mixture_of_experts(family, tmp_path):
    """`--target-modules all-linear` on a mixture of experts: attention, router and every expert's
    linears, and the dense MLPs of Qwen3-MoE's dense blocks where there are some (each block gets
    the targets it has). The adapter swarm saves loads in peft with the logits swarm computes
    (peft, converting it for transformers' fused experts, drops the LoRA of dense MLPs in a model
    with experts: those are left out of the comparison). peft's own all-linear adapter there (LoRA
    on the fused expert parameters) is refused in one line."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from swarm.engine.adapter_io import AdapterError, load_adapter, save_lora
    from swarm.engine.adapters import applied, attach

    model_dir = write_tiny_checkpoint(tmp_path / "model", family)
    ckpt = Checkpoint(model_dir)
    every = resolve_targets(ckpt, "all-linear")
    assert any(".experts.3." in t for t in every) and any(t.endswith("gate") for t in every)
    tensors = init_lora(ckpt, every, rank=2, seed=0)
    dense = {t for t in every if ".experts." not in t and t.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj")}
    has_dense = {int(k.split(".", 1)[0]) for k in tensors if k.split(".", 1)[1].rsplit(".lora_", 1)[0] in dense}
    has_experts = {int(k.split(".", 1)[0]) for k in tensors if ".experts." in k}
    assert has_dense.isdisjoint(has_experts) and has_dense | has_experts == set(range(4))
    assert bool(has_dense) == (family == "qwen3_moe")  # its tiny config: experts in blocks 1 and 3

    targets = [t for t in every if t not in dense]
    tensors = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) * 0.3
               for i, (k, v) in enumerate(init_lora(ckpt, targets, rank=2, seed=0).items())}
    save_lora(tmp_path / "adapter", ckpt, tensors, rank=2, alpha=4, dropout=0.0, targets=targets,
              base_model=str(model_dir))
    adapter = load_adapter(tmp_path / "adapter", ckpt)
    ids = _ids(9)
    head, blocks = ckpt.load_head(), attach(ckpt.load_blocks(0, 4))
    with torch.no_grad(), applied(blocks, adapter.tensors, adapter.spec):
        ours = head.logits(blocks(head.embed(ids)))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        base = model(ids).logits
        theirs = PeftModel.from_pretrained(model, tmp_path / "adapter").eval()(ids).logits
    assert (theirs - base).abs().max() > 1e-1, "the adapter must change the output"
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    fresh = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    get_peft_model(fresh, LoraConfig(r=2, target_modules="all-linear")).save_pretrained(tmp_path / "peft")
    with pytest.raises(AdapterError, match="target_parameters") as refused:
        load_adapter(tmp_path / "peft", ckpt)
    assert "\n" not in str(refused.value)


def test_mixtral_experts_count_in_memory_and_are_quantized(tmp_path):
    """A mixture of experts' blocks: the experts' bytes are in the block's size (what --num-blocks
    auto sizes by), --quant quantizes every expert, and the quantized blocks still route and run."""
    from swarm.engine.memory import block_bytes
    from swarm.engine.quant import QUANT_CLASSES, weight_bytes

    path = write_tiny_checkpoint(tmp_path / "mixtral", "mixtral", num_local_experts=4, num_experts_per_tok=2,
                                 intermediate_size=128)
    ckpt = Checkpoint(path)
    h, i = ckpt.config.hidden_size, ckpt.config.intermediate_size
    experts = 4 * 3 * h * i * 4  # float32
    assert block_bytes(ckpt, 0, torch.float32) >= experts
    assert block_bytes(ckpt, 0, torch.float32, quant="int8") < block_bytes(ckpt, 0, torch.float32) - experts // 2
    whole = ckpt.load_blocks(0, 1, torch.float32)
    assert weight_bytes(whole) >= experts
    for quant in ("int8", "nf4"):
        blocks = ckpt.load_blocks(0, 1, torch.float32, quant=quant)
        linears = [m for m in blocks.modules() if isinstance(m, QUANT_CLASSES[quant])]
        assert len([m for m in linears if m.out_features == i or m.in_features == i]) == 4 * 3, quant  # every expert
        x = torch.randn(1, 5, h)
        with torch.no_grad():
            assert torch.isfinite(blocks(x)).all()


@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json", "chat_template.json"])
def test_the_checkpoints_chat_template_is_used_whatever_file_holds_it(checkpoint, tmp_path, where):
    """--chat and the API take the template the checkpoint ships, as transformers saves it now
    (chat_template.jinja), as older releases do (in tokenizer_config.json) or as a multimodal
    model's processor does (chat_template.json), for every family."""
    import json
    import shutil

    from swarm.engine.client import ClientModel

    path = tmp_path / "model"
    shutil.copytree(checkpoint, path)
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"
    if where == "chat_template.jinja":
        (path / where).write_text(template)
    elif where == "chat_template.json":
        (path / where).write_text(json.dumps({"chat_template": template}))
    else:
        config = json.loads((path / where).read_text())
        (path / where).write_text(json.dumps({**config, "chat_template": template}))
    client = ClientModel.load(path)
    assert client.has_chat_template
    text = client.tokenizer.decode(client.encode("hi there", chat=True))
    assert text.startswith("<|user|>hi there") and text.endswith("<|assistant|>"), text


def test_phi3_longrope_by_position(tmp_path):
    """Phi-3's LongRoPE (its 128k checkpoints): within the original context, the short factors,
    step by step as transformers; a position past it rotates by the long factors (transformers'
    own rotation tables for a longer sequence), and its output is the same however the sequence
    is stepped: one pass, steps, or a replay in other chunks (what checks and failovers rely on)."""
    from swarm.engine.layers import StepContext

    rope = {"rope_type": "longrope", "short_factor": [1.0, 1.3, 1.9, 2.6], "long_factor": [1.5, 3.0, 7.0, 12.0],
            "partial_rotary_factor": 0.5, "rope_theta": 10000.0}
    checkpoint = write_tiny_checkpoint(tmp_path, "phi3", rope_scaling=rope, original_max_position_embeddings=21,
                                       max_position_embeddings=64)
    ckpt = Checkpoint(checkpoint)
    assert ckpt.config.rope_scaling["rope_type"] == "longrope"
    model, head, (blocks,), ids = _steps_equal_transformers(checkpoint, (0, 4))  # 21 positions: all within
    ctx = StepContext(past=19, seq=4)
    ckpt.family.prepare_step(ckpt.config, ctx, torch.float32, 1)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for seq_len, rows in ((21, slice(0, 2)), (40, slice(2, 4))):  # positions 19, 20 short; 21, 22 long
        inv, factor = ROPE_INIT_FUNCTIONS["longrope"](model.config, None, seq_len=seq_len)
        want = torch.cat([torch.arange(19, 23)[:, None].float() * inv[None, :]] * 2, dim=-1)
        assert torch.allclose(ctx.extra["rope"][0][rows], (want.cos() * factor)[rows], atol=1e-6)
    longer = torch.cat([ids, _ids(9, seed=9)], dim=1)  # 30 positions: past the original context
    with torch.no_grad():
        whole = blocks(head.embed(longer))
        session = blocks.open_session(batch=2, max_length=30)
        steps = torch.cat([blocks(head.embed(longer[:, a:b]), session) for a, b in ((0, 20), (20, 22), (22, 30))], dim=1)
        session = blocks.open_session(batch=2, max_length=30)
        other = torch.cat([blocks(head.embed(longer[:, a:b]), session) for a, b in ((0, 5), (5, 29), (29, 30))], dim=1)
    scale = whole.abs().max().item()
    assert (whole - steps).abs().max().item() <= 1e-5 * scale and (whole - other).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize(
    "layout",
    [
        dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False),  # Falcon-7B
        dict(new_decoder_architecture=False, multi_query=False, parallel_attn=False, bias=True, num_kv_heads=4),  # sequential
        dict(new_decoder_architecture=True, num_kv_heads=1, num_ln_in_parallel_attn=1),  # Falcon2-11B: one norm
    ],
    ids=["7b", "sequential", "11b"],
)
def test_falcon_layouts_equal_transformers(layout, tmp_path):
    """Falcon's other block layouts (the NEW_FAMILIES one is the 40B/180B layout): multi-query
    attention with attention and MLP in parallel, per-head fused projections with the MLP after
    attention, and the new layout with one norm; logits step by step against transformers."""
    _steps_equal_transformers(write_tiny_checkpoint(tmp_path, "falcon", **layout))
