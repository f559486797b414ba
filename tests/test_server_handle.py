"""`swarm serve`'s options as one config (:class:`ServeOptions`): a Python caller gets the message a
flag gets; the ranges a model cannot have are refused saying what is wrong; and :class:`Server`, a
server in this process that a client generates through."""

from __future__ import annotations

from dataclasses import fields

import pytest
import typer
from typer.testing import CliRunner

from server_utils import served
from swarm.cli.main import app
from swarm.engine.client import ClientModel, generate_local
from swarm.engine.generation import GenerationConfig
from swarm.p2p.identity import claim_identity
from swarm.p2p.loop import run
from swarm.p2p.placement import Placed
from swarm.p2p.serve_options import ServeOptions
from swarm.p2p.server_handle import Server
from swarm_utils import swarm_generate

# (Python options, the same as flags): one message for both
SAME = [
    (dict(cache_tokens=0), ["--cache-tokens", "0"]),
    (dict(idle_timeout=0), ["--idle-timeout", "0"]),
    (dict(frame_memory=0), ["--frame-memory", "0"]),
    (dict(peer_cache_share=1.5), ["--peer-cache-share", "1.5"]),
    (dict(throughput="fast"), ["--throughput", "fast"]),
    (dict(blocks="5:3"), ["--blocks", "5:3"]),
    (dict(blocks="-1:3"), ["--blocks", "-1:3"]),
    (dict(blocks="0:2", num_blocks=2), ["--blocks", "0:2", "--num-blocks", "2"]),
    (dict(), []),  # neither --initial-peers nor --new-swarm
    (dict(blocks="0:9", new_swarm=True), ["--blocks", "0:9", "--new-swarm"]),  # the tiny model has 4
    (dict(num_blocks=99, new_swarm=True), ["--num-blocks", "99", "--new-swarm"]),
]


@pytest.mark.parametrize("options, flags", SAME, ids=[" ".join(f) or "no swarm" for _, f in SAME])
def test_a_python_caller_reads_the_flag_s_message(options, flags, tiny_checkpoints, tmp_path):
    model = tiny_checkpoints["llama"]
    key = tmp_path / "id.key"
    with pytest.raises(ValueError) as raised:
        Server(model, identity=key, **options)
    result = CliRunner().invoke(app, ["serve", "--model", str(model), "--identity", str(key), *flags])
    assert result.exit_code == 1 and result.stderr.strip() == f"error: {raised.value}", result.stderr
    claim_identity(key).release()  # a refused start leaves the key file free


def test_ranges_say_what_is_wrong():
    for blocks, text in [("5:3", "START must be less than END"), ("3:3", "START must be less than END"),
                         ("-1:2", "START must be at least 0"), ("0-4", "START:END (e.g. 0:10) or auto")]:
        with pytest.raises(ValueError, match="--blocks") as raised:
            ServeOptions(blocks=blocks, new_swarm=True)
        assert text in str(raised.value), raised.value


def test_num_blocks_beyond_the_model_is_refused_by_the_server_too(tiny_checkpoints):
    """A ServerConfig built by hand (tests, programs) meets the same rule at the start."""

    async def scenario():
        async with served(tiny_checkpoints["llama"], "auto", num_blocks=5):
            pass

    with pytest.raises(ValueError, match="--num-blocks must be at most this model's 4 blocks, got 5"):
        run(scenario())


def test_python_values_of_the_wrong_type_name_the_flag():
    with pytest.raises(ValueError, match=r"--cache-tokens must be a whole number, got '4096'"):
        ServeOptions(cache_tokens="4096", new_swarm=True)
    with pytest.raises(ValueError, match="--idle-timeout must be a number"):
        ServeOptions(idle_timeout=None, new_swarm=True)
    with pytest.raises(TypeError, match="unknown option step_timeout"):
        ServeOptions.build(step_timeout=5.0, new_swarm=True)


def test_the_flags_defaults_and_derived_limits_are_the_options(tiny_checkpoints, tmp_path):
    """`swarm serve`'s flags default to the options' defaults (the command reads them there), and
    the server's limits in bytes are derived from the MiB the options give."""
    serve = typer.main.get_command(app).commands["serve"]
    defaults = {f.name: f.default for f in fields(ServeOptions)}
    flags = {p.name: p.default for p in serve.params if p.name in defaults}
    assert set(flags) == set(defaults)
    assert {k: v for k, v in flags.items() if v is not None} == {k: v for k, v in defaults.items()
                                                                 if v not in (None, ())}
    options = ServeOptions(model=str(tiny_checkpoints["llama"]), new_swarm=True, identity=tmp_path / "id.key",
                           throughput="5", adapter_memory=32, session_adapter_memory=128, frame_memory=8)
    cfg = options.server_config()
    cfg.identity.release()
    assert (cfg.throughput, cfg.frame_memory, cfg.adapter_memory, cfg.peer_adapter_memory) == (5.0, 8 << 20, 32 << 20,
                                                                                              32 << 20)
    assert (cfg.session_adapter_memory, cfg.peer_session_adapter_memory, cfg.max_adapter_bytes) == (
        128 << 20, 128 << 20, 64 << 20)
    assert cfg.model_dir == tiny_checkpoints["llama"] and cfg.listen_host == "127.0.0.1"


def test_step_timeout_is_idle_timeout_s_old_name():
    result = CliRunner().invoke(app, ["serve", "--step-timeout", "0", "--new-swarm"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1
    assert lines == ["warning: --step-timeout is deprecated, use --idle-timeout",
                     "error: --idle-timeout must be a number of seconds > 0, got 0.0"], result.stderr


def test_a_server_in_this_process_serves_a_client(tiny_checkpoints, tmp_path):
    """Two in-process servers of halves of a model: a client generates through them what the
    whole model generates here; closing is idempotent and gives the identity back."""
    model = tiny_checkpoints["llama"]
    cfg = GenerationConfig(max_new_tokens=6, eos_token_ids=())
    client_model = ClientModel.load(model)
    expected = generate_local(client_model, client_model.encode("The capital of France is"), cfg)
    common = dict(throughput=10.0, announce_period=1.0)
    with Server(model, blocks="0:2", new_swarm=True, identity=tmp_path / "a.key", **common) as first:
        assert first.blocks == (0, 2) and first.address == first.addresses[0]
        assert first.address.startswith("/ip4/127.0.0.1/tcp/") and first.address.endswith(f"/p2p/{first.peer_id}")
        assert first.model == client_model_id(client_model)
        with Server(model, blocks="2:4", initial_peers=first.address, identity=tmp_path / "b.key", **common) as second:
            assert second.blocks == (2, 4)
            assert isinstance(second._server, Placed)  # all placement may touch of a server
            tokens = swarm_generate(model, first.address, cfg, wait_timeout=20.0)
    assert tokens == expected
    first.close()
    assert "closed" in repr(first)
    claim_identity(tmp_path / "a.key").release()


def client_model_id(client_model) -> str:
    from swarm.p2p.table import model_id

    return model_id(client_model.checkpoint)
