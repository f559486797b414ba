"""`swarm generate --adapter DIR`: adapters at inference, locally and through the swarm (issue 10).

The oracle for LoRA is transformers + peft on the same checkpoint and adapter directory; prompt
and deep-prompt adapters through the swarm must equal `--local`; a server killed mid-generation
is replaced and the tokens do not change; a stranger's bad adapter is refused and the server keeps
serving. One swarm of real `swarm serve` processes (blocks 0:2, 2:4 and a spare 2:4) serves the
whole module; the failover test, which kills a server, runs last.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_tiny_checkpoint
from server_utils import eventually, peer, served
from swarm.cli.main import app
from swarm.engine.adapter_io import Adapter, load_adapter, save_deep_prompt, save_prompt
from swarm.engine.adapters import adapter_digest
from swarm.engine.checkpoint import Checkpoint
from swarm.engine.client import ClientModel, generate_local
from swarm.engine.generation import GenerationConfig
from swarm.p2p import protocols
from swarm.p2p.client import SwarmError
from swarm.p2p.loop import run
from swarm.p2p.wire import Frame, adapter_fields, read_frame, write_frame
from swarm_utils import ServerProcess, generate_json, swarm_generate

PROMPT = "The capital of France is"
NEW_TOKENS = 12
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A tiny llama, a LoRA adapter saved by peft (random non-zero weights on q/k/v/o), a prompt
    adapter and a deep-prompt adapter (random, saved in their formats), and the peft model."""
    import transformers
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("gen-adapter")
    model_dir = write_tiny_checkpoint(root / "model", "llama")
    checkpoint = Checkpoint(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(root / "lora")
    hidden, blocks = checkpoint.config.hidden_size, checkpoint.num_blocks
    save_prompt(root / "prompt", checkpoint, torch.randn(5, hidden, generator=generator), str(model_dir))
    deep = {f"{i}.prompt": torch.randn(3, hidden, generator=generator) * 0.5 for i in range(blocks)}
    save_deep_prompt(root / "deep", checkpoint, torch.randn(3, hidden, generator=generator), deep, str(model_dir))
    return {"model": model_dir, "root": root, "peft": peft_model.eval()}


@contextmanager
def _swarm(model, home):
    """Servers 0:2 and two of 2:4 (the second a spare), the last two started together."""
    servers = []

    def start(i, blocks, extra):
        args = ["--model", str(model), "--blocks", blocks, "--identity", str(home / f"id-{i}.key"),
                "--announce-period", "1", *extra]
        servers.append(ServerProcess(args, home, f"server-{i}"))
        return servers[-1]

    try:
        first = start(0, "0:2", ["--new-swarm"])
        first.wait_ready()
        rest = [start(i, "2:4", ["--initial-peers", first.maddr]) for i in (1, 2)]
        for server in rest:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def swarm(case, tmp_path_factory):
    with _swarm(case["model"], tmp_path_factory.mktemp("gen-adapter-swarm")) as servers:
        yield servers


def _local(model_dir, cfg: GenerationConfig, adapter) -> list[int]:
    client = ClientModel.load(model_dir)
    return generate_local(client, client.encode(PROMPT), cfg, adapter=adapter)


@pytest.mark.slow
def test_a_peft_lora_adapter_gives_peft_tokens_locally_and_through_the_swarm(case, swarm, tmp_path):
    """Acceptance 4: `swarm generate --adapter` (--local and through two servers) equals greedy
    transformers + peft generation with the same adapter, token for token."""
    model_dir, peft_model = case["model"], case["peft"]
    args = ["--model", str(model_dir), "--adapter", str(case["root"] / "lora"), "--max-new-tokens", str(NEW_TOKENS)]
    result = CliRunner().invoke(app, ["generate", "--json", *args, "--local", PROMPT])  # in this process: faster
    assert result.exit_code == 0, result.output
    local = json.loads(result.stdout)
    through = generate_json([*args, "--initial-peers", swarm[0].maddr, PROMPT], tmp_path)  # a process of its own
    ids = torch.tensor([local["prompt_ids"]])
    settings = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": 2, "eos_token_id": 2}
    with torch.no_grad():
        theirs = peft_model.generate(input_ids=ids, **settings)[0, ids.shape[1] :].tolist()
        with peft_model.disable_adapter():
            plain = peft_model.generate(input_ids=ids, **settings)[0, ids.shape[1] :].tolist()
    assert local["token_ids"] == theirs
    assert through["token_ids"] == theirs
    assert plain != theirs, "the adapter must change the output"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["prompt", "deep"])
def test_prompt_and_deep_prompt_adapters_through_the_swarm_equal_local(case, swarm, kind):
    model_dir = case["model"]
    adapter = load_adapter(case["root"] / kind, Checkpoint(model_dir))
    assert adapter.kind == {"prompt": "prompt", "deep": "deep-prompt"}[kind]
    greedy = GenerationConfig(max_new_tokens=NEW_TOKENS, eos_token_ids=())
    expected = _local(model_dir, greedy, adapter)
    assert swarm_generate(model_dir, swarm[0].maddr, greedy, adapter=adapter) == expected
    assert _local(model_dir, greedy, None) != expected, "the adapter must change the output"
    if kind == "deep":  # beams: every row gets the virtual tokens
        beams = GenerationConfig(max_new_tokens=6, num_beams=3, eos_token_ids=())
        assert swarm_generate(model_dir, swarm[0].maddr, beams, adapter=adapter) == _local(model_dir, beams, adapter)


def test_a_prompt_adapter_equals_peft_prompt_tuning(case):
    """Virtual tokens take positions 0..nv-1 before the prompt, as in peft's prompt tuning. The
    oracle is peft's forward over the whole sequence at each step (greedy, no cache): peft's own
    cached ``generate`` for prompt tuning departs from its forward after the first token with
    the transformers installed here."""
    import transformers
    from peft import PeftModel

    model_dir = case["model"]
    adapter = load_adapter(case["root"] / "prompt", Checkpoint(model_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, case["root"] / "prompt").eval()
    client = ClientModel.load(model_dir)
    seq = client.encode(PROMPT)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            seq.append(int(peft_model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    ours = _local(model_dir, GenerationConfig(max_new_tokens=NEW_TOKENS, eos_token_ids=()), adapter)
    assert ours == seq[-NEW_TOKENS:]


@pytest.mark.slow
def test_bad_adapters_are_refused_and_the_servers_keep_serving(case, swarm):
    model_dir = case["model"]
    cfg = GenerationConfig(max_new_tokens=4, eos_token_ids=())
    hidden = Checkpoint(model_dir).config.hidden_size
    wrong_shape = {"2.self_attn.q_proj.lora_A": torch.randn(4, hidden + 1), "2.self_attn.q_proj.lora_B": torch.randn(hidden, 4)}
    unknown = {"2.self_attn.x_proj.lora_A": torch.randn(4, hidden), "2.self_attn.x_proj.lora_B": torch.randn(hidden, 4)}
    for tensors, message in ((wrong_shape, r"must be \[r, 64\]"), (unknown, "has no linear 'self_attn.x_proj'")):
        with pytest.raises(SwarmError, match=f"refused the request: .*{message}"):
            swarm_generate(model_dir, swarm[0].maddr, cfg, adapter=Adapter("lora", tensors), wait_timeout=10.0)
    lora = load_adapter(case["root"] / "lora", Checkpoint(model_dir))
    assert swarm_generate(model_dir, swarm[0].maddr, cfg, adapter=lora) == _local(model_dir, cfg, lora)
    assert all(s.proc.poll() is None for s in swarm)


def test_a_bad_adapter_directory_is_one_line_naming_it(case, tmp_path):
    """Before any network: exit 1 and one line naming the flag or the file to fix."""
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "adapter_config.json").write_text((case["root"] / "lora" / "adapter_config.json").read_text())
    (damaged / "adapter_model.safetensors").write_bytes(b"not safetensors")
    other = write_tiny_checkpoint(tmp_path / "other", "llama", hidden_size=32)
    cases = {tmp_path / "missing": "--adapter", damaged: "adapter_model.safetensors", case["root"] / "deep": "needs prompt_embeddings"}
    for directory, named in cases.items():
        model = other if directory == case["root"] / "deep" else case["model"]
        result = CliRunner().invoke(app, ["generate", "--model", str(model), "--adapter", str(directory),
                                          "--initial-peers", "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA", PROMPT])
        assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.exception
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr


def test_session_adapters_are_bounded_and_freed_however_the_session_ends(case):
    """In-process server: an adapter over max_adapter_bytes is a bad request naming the bound; one
    peer's sessions hold at most peer_session_adapter_memory (busy beyond); a digest without tensors is
    unknown_adapter; every byte is given back when sessions end by close, by reset, or refused."""
    model_dir = case["model"]
    lora = load_adapter(case["root"] / "lora", Checkpoint(model_dir))
    part = {k: v for k, v in lora.tensors.items() if k.startswith(("0.", "1."))}
    nbytes = sum(v.numel() * v.element_size() for v in part.values())
    names = sorted(part)
    spec = lora.spec.to_wire()

    def open_frame(names_=names, tensors=None):
        fields = {"start": 0, "end": 2, "batch": 1, "max_length": 16}
        fields.update(adapter_fields(adapter_digest(part, lora.spec), spec, names_))
        return Frame("open", fields, [part[n] for n in names] if tensors is None else tensors)

    async def opened(host, sp, frame):
        stream = await host.open_stream(sp, protocols.INFERENCE, timeout=10)
        await write_frame(stream, frame, 10)
        return stream, await read_frame(stream, timeout=10)

    async def scenario():
        overrides = {"max_adapter_bytes": nbytes, "peer_session_adapter_memory": 2 * nbytes}
        async with served(model_dir, "0:2", **overrides) as (server, maddr):
            budget = server.inference.adapters
            async with peer(maddr) as (host, sp):
                big = {**part, "0.prompt": torch.zeros(2, 64)}
                _, reply = await opened(host, sp, Frame("open", {**open_frame().fields, **adapter_fields(
                    adapter_digest(big), spec, sorted(big))}, [big[n] for n in sorted(big)]))
                assert reply["code"] == "bad_request" and "max_adapter_bytes" in reply["message"]
                _, reply = await opened(host, sp, open_frame(names_=None, tensors=[]))
                assert reply["code"] == "unknown_adapter"
                first, reply = await opened(host, sp, open_frame())
                second, reply2 = await opened(host, sp, open_frame())
                _, reply3 = await opened(host, sp, open_frame())
                assert (reply.kind, reply2.kind, reply3["code"]) == ("opened", "opened", "busy"), reply3
                assert "adapters" in reply3["message"] and budget.used(host.peer_id) == 2 * nbytes
                await write_frame(first, Frame("close"), 10)
                assert (await read_frame(first, timeout=10)).kind == "closed"
                await second.reset()
                await eventually(lambda: budget.used() == 0 and not server.sessions, what="adapters freed")

    run(scenario())


@pytest.mark.slow
def test_failover_with_an_adapter_gives_the_same_tokens(case, swarm):
    """The server serving blocks 2:4 is killed mid-generation; the spare takes over, gets the
    adapter with its open, replays the history (virtual tokens included) and the tokens equal
    --local's. LoRA and deep prompts together, so both must be replayed right."""
    model_dir = case["model"]
    checkpoint = Checkpoint(model_dir)
    lora = load_adapter(case["root"] / "lora", checkpoint)
    deep = load_adapter(case["root"] / "deep", checkpoint)
    both = Adapter("deep-prompt", {**lora.tensors, **deep.tensors}, deep.prompt, lora.spec)
    cfg = GenerationConfig(max_new_tokens=16, eos_token_ids=())
    expected = _local(model_dir, cfg, both)
    by_peer = {s.maddr.rsplit("/p2p/", 1)[1]: s for s in swarm}
    killed = []

    def on_token(i, chain):
        if i == 5:
            victim = by_peer[next(s.span.peer_id for s in chain.sessions if s.span.start <= 2 < s.span.end)]
            victim.proc.kill()
            victim.proc.wait()
            killed.append(victim.blocks)

    tokens = swarm_generate(model_dir, swarm[0].maddr, cfg, on_token, adapter=both, step_timeout=5.0, wait_timeout=20.0)
    assert killed == [(2, 4)]
    assert tokens == expected
