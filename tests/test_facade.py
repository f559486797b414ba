"""The Python API at the package top (``swarm.open`` and friends): the same text as the commands,
the same gradients as local autograd, the same one-line messages as the flags."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import swarm
from swarm.cli.main import app
from swarm_utils import cli_json, local_json, running_swarm

PROMPT = "The capital of France is"


def cli_error(args: list[str]) -> str:
    """The one-line message `swarm ARGS` fails with (without its "error: " prefix)."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    line = " ".join(result.stderr.split())
    assert line.startswith("error: "), line
    return line.removeprefix("error: ")


def test_local_generate_and_stream_print_what_the_command_prints(tiny_checkpoints):
    model = tiny_checkpoints["llama"]
    expected = local_json(["--model", str(model), "--max-new-tokens", "10", PROMPT])["text"]
    sampled = local_json(["--model", str(model), "--max-new-tokens", "10", "--temperature", "0.8", "--seed", "3", PROMPT])
    with swarm.open(model, local=True) as s:
        assert s.generate(PROMPT, max_new_tokens=10) == expected
        pieces = list(s.stream(PROMPT, max_new_tokens=10))
        assert len(pieces) > 1 and "".join(pieces) == expected
        assert s.generate(PROMPT, max_new_tokens=10, temperature=0.8, seed=3) == sampled["text"]
        assert s.generate(PROMPT, max_new_tokens=10) == expected  # reused: nothing left over from the last call
        assert s.status()["gaps"] == [] and s.status()["num_blocks"] == 4


def test_leaving_a_stream_early_stops_it(tiny_checkpoints):
    with swarm.open(tiny_checkpoints["llama"], local=True) as s:
        stream = s.stream(PROMPT, max_new_tokens=40)
        first = next(stream)
        stream.close()  # the generation thread ends; the next call runs as usual
        assert first and s.generate(PROMPT, max_new_tokens=3)


def test_a_closed_swarm_refuses_use_and_frees_its_blocks(tiny_checkpoints):
    s = swarm.open(tiny_checkpoints["llama"], local=True)
    assert s.generate(PROMPT, max_new_tokens=2) and s.blocks is not None
    s.close()
    assert s.local_blocks is None
    for use in (lambda: s.generate(PROMPT, max_new_tokens=2), lambda: s.blocks, s.status, s.connect):
        with pytest.raises(RuntimeError, match="closed"):
            use()
    s.close()  # idempotent


def test_read_dataset_tokenizes_as_finetune_does(tiny_checkpoints, tmp_path):
    from swarm.engine.finetune_data import read_jsonl, tokenize_records

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "one two three"}\n{"prompt": "Q?", "completion": " A."}\n')
    with swarm.open(tiny_checkpoints["llama"], local=True) as s:
        stop = s.client_model.eos_token_ids[0]
        expected = tokenize_records(read_jsonl(data), s.tokenizer, data, 64, stop).examples
        got = swarm.read_dataset(data, s, max_length=64).examples
        assert [e.input_ids for e in got] == [e.input_ids for e in expected] and got[0].input_ids[-1] == stop
        other = swarm.read_dataset(data, s, max_length=64, eos_token_id=stop + 1).examples
        assert other[0].input_ids[-1] == stop + 1


def test_bad_options_get_the_flags_messages(tiny_checkpoints, monkeypatch):
    model = str(tiny_checkpoints["llama"])
    cases = [
        (dict(step_timeout=-1), ["generate", "--model", model, "--step-timeout", "-1", "--local", PROMPT]),
        (dict(wire_dtype="int4"), ["generate", "--model", model, "--wire-dtype", "int4", PROMPT]),
        (dict(dtype="float8"), ["generate", "--model", model, "--dtype", "float8", "--local", PROMPT]),
        (dict(local=True, no_quant_servers=True),
         ["generate", "--model", model, "--local", "--no-quant-servers", PROMPT]),
    ]
    for options, args in cases:
        with pytest.raises(ValueError) as caught:
            swarm.open(model, **options)
        assert str(caught.value) == cli_error(args), options
    with swarm.open(model, local=True) as s:
        for options, flag in [(dict(max_new_tokens=0), "--max-new-tokens"), (dict(top_p=2.0), "--top-p")]:
            with pytest.raises(ValueError) as caught:
                s.generate(PROMPT, **options)
            value = str(next(iter(options.values())))
            assert str(caught.value) == cli_error(["generate", "--model", model, "--local", flag, value, PROMPT])
        with pytest.raises(TypeError, match="max_new_token"):
            s.generate(PROMPT, max_new_token=3)
    with pytest.raises(ValueError, match=r"^--step-timeout must be a number of seconds > 0, got '5'$"):
        swarm.open(model, local=True, step_timeout="5")  # a string, as from a config file: the flag's rule
    with pytest.raises(TypeError, match="unknown option stepp_timeout"):
        swarm.open(model, stepp_timeout=3)
    monkeypatch.delenv("SWARM_INITIAL_PEERS", raising=False)
    with pytest.raises(swarm.SwarmError, match="--initial-peers"):
        swarm.open(model)
    with pytest.raises(ValueError) as caught:
        swarm.open(model, initial_peers="/ip4/999.1.1.1/tcp/1")
    assert str(caught.value) == cli_error(["generate", "--model", model, "--initial-peers", "/ip4/999.1.1.1/tcp/1", PROMPT])


@pytest.mark.slow
def test_through_the_swarm_text_stream_status_and_gradients(tmp_path, tiny_checkpoints, monkeypatch):
    model = tiny_checkpoints["llama"]
    data_file = tmp_path / "data.jsonl"
    data_file.write_text('{"text": "The capital of France is Paris."}\n{"prompt": "A swarm of", "completion": " machines."}\n')
    with running_swarm(model, ["0:2", "2:4"], tmp_path) as servers:
        peer = servers[0].maddr
        expected = cli_json(["--model", str(model), "--initial-peers", peer, "--max-new-tokens", "10", PROMPT],
                            tmp_path)["text"]
        monkeypatch.setenv("SWARM_INITIAL_PEERS", peer)  # the environment's peers when none are given
        with swarm.open(model) as s:
            assert s.generate(PROMPT, max_new_tokens=10) == expected
            assert "".join(s.stream(PROMPT, max_new_tokens=10)) == expected
            status = s.status()
            assert status["gaps"] == [] and sorted(tuple(x["blocks"]) for x in status["servers"]) == [(0, 2), (2, 4)]
            remote = _lora_grads(s, data_file)
    with swarm.open(model, local=True) as s:
        local = _lora_grads(s, data_file)
    assert remote.keys() == local.keys()
    for key in local:
        torch.testing.assert_close(remote[key], local[key], atol=1e-5, rtol=1e-4)


def _lora_grads(s: swarm.Swarm, data_file) -> dict[str, torch.Tensor]:
    """One loss over a small batch, as the README's loop computes it: the LoRA gradients."""
    data = swarm.read_dataset(data_file, s, max_length=64)
    lora = swarm.init_lora(s.checkpoint, ["q_proj", "v_proj"], rank=4, seed=0)
    with torch.no_grad():  # B starts at zero: give it values, so A's gradient is not zero too
        generator = torch.Generator().manual_seed(1)
        for key, value in lora.items():
            if key.endswith("lora_B"):
                value.normal_(0, 0.1, generator=generator)
    (batch,) = swarm.batches(data, batch_size=4)
    s.loss(batch, lora, swarm.AdapterSpec(scale=2.0)).backward()
    grads = {k: v.grad.clone() for k, v in lora.items()}
    assert all(g.abs().sum() > 0 for g in grads.values())
    return grads
