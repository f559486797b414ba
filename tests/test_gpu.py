"""The GPU path on a real GPU (``pytest -m gpu``; run by ``scripts/gpu_check.sh``; skipped where
torch sees no GPU): GPU blocks against CPU blocks within the verification tolerance of their
precisions, a swarm of GPU servers giving the tokens of ``--local`` on the same GPU, LoRA
gradients through GPU servers equal to local autograd on the GPU, int8 and nf4 through
bitsandbytes' CUDA kernels, several GPUs in one server, and memory sizing from the GPU's memory."""

from __future__ import annotations

import pytest
import torch

from conftest import write_tiny_checkpoint
from swarm.engine.devices import gpu_count

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(gpu_count() == 0, reason="no GPU here (torch.cuda.is_available() is false)"),
]

GPU = torch.device("cuda", 0)
FAMILIES = ["llama", "gemma2", "mixtral", "phi3", "bloom"]
RANGES = ["0:1", "1:3", "3:4"]


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 300, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_gpu_blocks_agree_with_cpu_blocks(checkpoint, dtype):
    """Step by step with a KV cache: a GPU range's outputs against the CPU's, by the checks'
    own measure (:func:`~swarm.p2p.verify.disagreement`) within the tolerance a client allows
    between two honest servers of those precisions (so GPU and CPU servers can check each other)."""
    from swarm.engine.checkpoint import Checkpoint, parse_dtype
    from swarm.p2p.verify import Precision, disagreement, tolerance

    ckpt = Checkpoint(checkpoint)
    cpu = ckpt.load_blocks(0, ckpt.num_blocks, torch.float32)
    gpu = ckpt.load_blocks(0, ckpt.num_blocks, parse_dtype(dtype), devices=(GPU,))
    allowed = tolerance(Precision("float32"), Precision(dtype))
    ids = _ids(16)
    head = ckpt.load_head()
    with torch.no_grad(), cpu.open_session(2, 32) as a, gpu.open_session(2, 32) as b:
        for start, end in [(0, 7), (7, 8), (8, 9), (9, 13), (13, 14)]:
            x = head.embed(ids[:, start:end])
            want, got = cpu(x, a), gpu(x, b)
            assert got.device.type == "cpu"
            worst = disagreement(x, want, got.float()).max().item()
            assert worst <= allowed, f"positions {start}:{end}: disagreement {worst:.3g} > {allowed:.3g}"


def _swarm_tokens(checkpoint, tmp_path, server_args, client_args):
    from swarm_utils import generate_json, running_swarm

    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    with running_swarm(checkpoint, RANGES, home, ("--device", "cuda", *server_args)) as servers:
        peer = servers[0].maddr
        swarm = generate_json(["The capital of France is", "--model", str(checkpoint), "--initial-peers", peer,
                               "--max-new-tokens", "12", "--device", "cuda", *client_args], home)
    local = generate_json(["The capital of France is", "--model", str(checkpoint), "--local", "--max-new-tokens", "12",
                           "--device", "cuda", *client_args], home)
    return swarm["token_ids"], local["token_ids"]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "dtype"), [("llama", "float32"), ("llama", "bfloat16"), ("gemma2", "bfloat16"),
                                               ("mixtral", "float32"), ("phi3", "float16")])
def test_gpu_swarm_gives_the_tokens_of_local_on_the_gpu(family, dtype, tmp_path):
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt", family)
    swarm, local = _swarm_tokens(checkpoint, tmp_path, ("--dtype", dtype), ("--dtype", dtype))
    assert swarm == local and len(local) > 0


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_gpu_quantized_servers_give_the_tokens_of_quantized_local(quant, tmp_path):
    """bitsandbytes' CUDA layers on servers and on a --local run: the same tokens, and the
    quantized blocks stay close to the float ones."""
    from swarm.engine.checkpoint import Checkpoint
    from swarm.engine.quant import quantization

    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt", "llama", hidden_size=128, intermediate_size=256)
    ckpt = Checkpoint(checkpoint)
    blocks = ckpt.load_blocks(0, ckpt.num_blocks, torch.float32, quant=quant, devices=(GPU,))
    assert quantization(blocks) == quant
    x = torch.randn(1, 5, ckpt.config.hidden_size)
    with torch.no_grad():
        float_out = ckpt.load_blocks(0, ckpt.num_blocks, torch.float32)(x)
        quant_out = blocks(x)
    assert ((quant_out - float_out).norm() / float_out.norm()).item() < 0.2
    swarm, local = _swarm_tokens(checkpoint, tmp_path, ("--quant", quant), ("--quant", quant))
    assert swarm == local


@pytest.mark.slow
def test_gpu_lora_gradients_through_servers_equal_local_autograd(tmp_path):
    from swarm.engine.adapters import AdapterSpec, LocalBlocks, init_lora, resolve_targets
    from swarm.engine.checkpoint import Checkpoint
    from swarm.p2p.client import ClientConfig
    from swarm.p2p.remote_blocks import RemoteBlocks
    from swarm.p2p.verify import VerifyPolicy
    from swarm_utils import lora_grads, running_swarm

    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt", "llama")
    ckpt = Checkpoint(checkpoint)
    tensors = init_lora(ckpt, resolve_targets(ckpt, None), rank=2, seed=0)
    for key, value in tensors.items():
        if key.endswith("lora_B"):
            value.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    spec, ids = AdapterSpec(scale=2.0, dropout=0.1, seed=5), _ids(9, seed=4)
    head = ckpt.load_head(device=GPU)
    want_loss, want = lora_grads(head, LocalBlocks(ckpt.load_blocks(0, 4, devices=(GPU,))), ids, tensors, spec)
    cpu_loss, _ = lora_grads(ckpt.load_head(), LocalBlocks(ckpt.load_blocks(0, 4)), ids, tensors, spec)
    assert abs(cpu_loss - want_loss) <= 1e-4 * abs(want_loss)
    home = tmp_path / "home"
    home.mkdir()
    cfg = ClientConfig(request_timeout=10, step_timeout=20, wait_timeout=20, verify=VerifyPolicy("off"),
                       ledger=tmp_path / "verify.json")
    with running_swarm(checkpoint, RANGES, home, ("--device", "cuda")) as servers:
        with RemoteBlocks.connect(checkpoint, [servers[0].maddr], cfg) as remote:
            loss, got = lora_grads(head, remote, ids, tensors, spec)
    assert abs(loss - want_loss) <= 1e-5 * abs(want_loss)
    for key in want:
        scale = want[key].abs().max().item()
        assert scale > 0 and (got[key] - want[key]).abs().max().item() <= 1e-4 * scale, key


def test_gpu_batched_steps_equal_steps_alone(checkpoint):
    """A GPU server's batched pass (linears pooled only as far as measured invariant on the
    GPU): each session's output bit-identical to its step alone."""
    from swarm.engine.adapters import attach
    from swarm.engine.checkpoint import Checkpoint
    from swarm_utils import assert_batched_steps_equal_alone

    assert_batched_steps_equal_alone(attach(Checkpoint(checkpoint).load_blocks(0, 4, torch.bfloat16, devices=(GPU,))))


@pytest.mark.skipif(gpu_count() < 2, reason="needs two GPUs")
def test_a_range_split_over_two_gpus_equals_one_gpu(tmp_path):
    from swarm.engine.checkpoint import Checkpoint

    ckpt = Checkpoint(write_tiny_checkpoint(tmp_path, "llama"))
    one = ckpt.load_blocks(0, 4, devices=(GPU,))
    two = ckpt.load_blocks(0, 4, devices=(GPU, torch.device("cuda", 1)))
    assert two.devices == [GPU, torch.device("cuda", 1)]
    x = torch.randn(1, 6, ckpt.config.hidden_size)
    with torch.no_grad(), one.open_session(1, 8) as a, two.open_session(1, 8) as b:
        assert torch.equal(one(x, a), two(x, b))
        assert torch.equal(one(x[:, :1], a), two(x[:, :1], b))


def test_memory_sizing_uses_the_gpu(tmp_path):
    from swarm.engine.checkpoint import Checkpoint
    from swarm.engine.devices import free_memory
    from swarm.engine.memory import default_num_blocks

    ckpt = Checkpoint(write_tiny_checkpoint(tmp_path, "llama"))
    free = free_memory(GPU)
    assert 0 < free < torch.cuda.mem_get_info(GPU)[1]
    assert default_num_blocks(ckpt, torch.float32, None, 1024, devices=(GPU,)) == ckpt.num_blocks
    with pytest.raises(ValueError, match="--memory"):
        default_num_blocks(ckpt, torch.float32, 0.0001, 1024, devices=(GPU,))
