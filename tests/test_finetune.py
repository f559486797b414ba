"""Fine-tuning (engine/finetune.py, engine/finetune_data.py, `swarm finetune --local`) on tiny models.

The gates: bad data is one line naming file:line before any model loads; loss masks cover exactly
the completion / assistant tokens; a run lowers the loss and its adapter loads in peft with the
engine's logits; a run through real servers ends with the adapter of a local run; a run interrupted (in-process, and by a real SIGINT to `swarm finetune`) and
resumed ends with exactly the adapter of an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import write_tiny_checkpoint
from swarm.cli.main import app
from swarm.engine.adapter_io import load_adapter
from swarm.engine.adapters import LocalBlocks, applied
from swarm.engine.client import ClientModel
from swarm.engine.finetune import CHECKPOINT, FinetuneConfig, finetune
from swarm.engine.finetune_data import IGNORE, collate, read_jsonl, tokenize_records
from swarm_utils import ServerProcess, running_swarm, swarm_cmd, swarm_env

FACTS = Path(__file__).resolve().parents[1] / "scripts" / "data" / "facts.jsonl"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ft") / "llama", "llama")


@pytest.fixture(scope="module")
def client(tiny) -> ClientModel:
    return ClientModel.load(tiny)


def _dataset(client, path=FACTS, max_length=64):
    return tokenize_records(read_jsonl(path), client.tokenizer, path, max_length, client.eos_token_ids[0])


def _invoke(args: list[str]):
    result = CliRunner().invoke(app, ["finetune", *args])
    # an exception other than the exit itself would be a traceback for a user
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


BAD_DATA = {
    "bad json": (['{"text": "fine"}', '{"text": "oops",'], ":2: not valid JSON"),
    "missing completion": (['{"prompt": "a"}'], ':1: has \'prompt\' but no "completion"'),
    "wrong type": (['{"text": "x"}', '{"prompt": "a", "completion": 3}'], ':2: "completion" must be a string'),
    "unknown fields": (['{"question": "a"}'], ":1: no known fields (has question)"),
    "no assistant": (['{"messages": [{"role": "user", "content": "hi"}]}'], ":1: no assistant message"),
    "empty file": ([], ": no examples (the file is empty)"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_is_one_line_naming_file_and_line_before_the_model_loads(case, tmp_path):
    lines, message = BAD_DATA[case]
    data = _write(tmp_path / "data.jsonl", lines)
    # the model does not exist: the data error comes first, so nothing was loaded
    result = _invoke([str(data), "--local", "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"{data}{message}" in result.stderr, result.stderr


def test_bad_flags_are_one_line(tiny, tmp_path):
    for flags, text in [
        (["--target-modules", "qq_proj"], "--target-modules: qq_proj names no linear"),
        (["--adapter", "bitfit"], "--adapter must be one of lora, prompt, deep-prompt"),
        (["--eval-fraction", "1"], "--eval-fraction must be in [0, 1)"),
    ]:
        result = _invoke([str(FACTS), "--local", "--model", str(tiny), "--output", str(tmp_path / "o"), *flags])
        assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert text in result.stderr, result.stderr
    chat = _write(tmp_path / "chat.jsonl", ['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'])
    result = _invoke([str(chat), "--local", "--model", str(tiny), "--output", str(tmp_path / "o")])
    assert result.exit_code == 1 and f'{chat}:1: "messages" need a chat template' in result.stderr, result.stderr
    assert not (tmp_path / "o").exists()  # refused before anything ran


def test_loss_masks_cover_completions_and_assistant_turns(client, tmp_path):
    tok, eos = client.tokenizer, client.eos_token_ids[0]
    data = _write(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "The capital of France is", "completion": " Paris."}),
        json.dumps({"text": "A swarm of machines"}),
        json.dumps({"messages": [{"role": "user", "content": "Capital of Italy?"},
                                 {"role": "assistant", "content": "Rome."},
                                 {"role": "user", "content": "And France?"},
                                 {"role": "assistant", "content": "Paris."}]}),
        json.dumps({"prompt": "x", "completion": " The capital of France is Paris " * 30}),
    ])
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    try:
        ds = tokenize_records(read_jsonl(data), tok, data, 64, eos)
    finally:
        tok.chat_template = None
    completion, text, chat, long = ds.examples
    prompt_len = len(tok("The capital of France is")["input_ids"])
    assert completion.labels[:prompt_len] == [IGNORE] * prompt_len
    assert completion.labels[prompt_len:] == completion.input_ids[prompt_len:]
    assert completion.input_ids[-1] == eos and tok.decode(completion.input_ids[prompt_len:-1]) == " Paris."
    assert text.labels == text.input_ids and text.input_ids[-1] == eos
    learned = tok.decode([t for t, lab in zip(chat.input_ids, chat.labels) if lab != IGNORE])
    assert learned == "Rome.</s>Paris.</s>", learned
    assert len(long.input_ids) == 64 and ds.truncated == 1 and ds.dropped == 0
    batch = collate([completion, long], pad_id=0)
    assert batch.input_ids.shape == (2, 64) and batch.num_tokens == len(completion.input_ids) + 64
    assert (batch.labels[0, len(completion.input_ids) :] == IGNORE).all()


def _cfg(out: Path, **kw) -> FinetuneConfig:
    base = {"output": out, "epochs": 5, "batch_size": 8, "lr": 1e-2, "save_every": 0, "eval_fraction": 0.1, "max_length": 64}
    return FinetuneConfig(**{**base, **kw})


def test_lora_run_lowers_loss_and_its_adapter_loads_in_peft(tiny, client, tmp_path):
    import transformers
    from peft import PeftModel

    blocks = LocalBlocks(client.checkpoint.load_blocks(0, client.checkpoint.num_blocks))
    result = finetune(_cfg(tmp_path / "a", target_modules="all-linear"), blocks, client, _dataset(client))
    assert result.steps == result.total_steps == 5 * 4
    assert result.train_loss_after < result.train_loss_before - 1.0
    assert result.eval_loss_after < result.eval_loss_before
    lines = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["type"] == "step"] == list(range(1, 21))
    assert {"loss", "lr", "tokens", "tokens_per_s", "time", "epoch"} <= set(lines[1])

    adapter = load_adapter(tmp_path / "a", client.checkpoint)
    assert any(v.abs().max() > 0 for k, v in adapter.tensors.items() if k.endswith("lora_B"))
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, tmp_path / "a").eval()
    ids = torch.tensor([client.encode("The capital of the planet Zorbia is")])
    with torch.no_grad(), applied(blocks.blocks, adapter.tensors, adapter.spec):
        ours = client.head.logits(blocks.blocks(client.head.embed(ids)))
        theirs = peft_model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["prompt", "deep-prompt"])
def test_prompt_tuning_lowers_loss_and_round_trips(kind, client, tmp_path):
    blocks = LocalBlocks(client.checkpoint.load_blocks(0, client.checkpoint.num_blocks))
    result = finetune(_cfg(tmp_path / kind, adapter=kind, num_virtual_tokens=4, epochs=3), blocks, client, _dataset(client))
    assert result.train_loss_after < result.train_loss_before
    adapter = load_adapter(tmp_path / kind, client.checkpoint)
    assert adapter.kind == kind and adapter.prompt.shape == (4, 64)
    assert kind == "prompt" or any(v.abs().max() > 0 for v in adapter.tensors.values())


class Stop(Exception):
    pass


def test_resume_after_an_interruption_equals_an_uninterrupted_run(client, tmp_path):
    """With dropout, gradient accumulation and a ragged last micro-batch: stop after step 5 (last
    checkpoint at 3), resume, and compare every tensor exactly."""
    blocks = LocalBlocks(client.checkpoint.load_blocks(0, client.checkpoint.num_blocks))
    dataset = _dataset(client)
    kw = {"dropout": 0.2, "grad_accum": 2, "batch_size": 3, "epochs": 2, "save_every": 3, "weight_decay": 0.01}
    whole = finetune(_cfg(tmp_path / "whole", **kw), blocks, client, dataset)

    def stop_at_5(event):
        if event["type"] == "step" and event["step"] == 5:
            raise Stop

    with pytest.raises(Stop):
        finetune(_cfg(tmp_path / "cut", **kw), blocks, client, dataset, on_event=stop_at_5)
    with pytest.raises(ValueError, match="--output .* holds a run's checkpoint already"):
        finetune(_cfg(tmp_path / "cut", **kw), blocks, client, dataset)
    with pytest.raises(ValueError, match="--resume: --lr is 0.02 but .* used 0.01"):
        finetune(_cfg(tmp_path / "cut", resume=True, **{**kw, "lr": 0.02}), blocks, client, dataset)
    resumed = finetune(_cfg(tmp_path / "cut", resume=True, **kw), blocks, client, dataset)

    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.steps == whole.steps and resumed.eval_loss_after == whole.eval_loss_after
    # the best so far came back from the checkpoint: the same best, the same adapter in best/
    assert (resumed.best_step, resumed.best_eval_loss) == (whole.best_step, whole.best_eval_loss)
    a, b = (load_file(tmp_path / d / "best" / "adapter_model.safetensors") for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(d):
        lines = (tmp_path / d / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["type"] == "step"]

    assert losses("cut") == losses("whole")  # the lost steps' lines were dropped, then redone


@pytest.mark.slow
def test_sigint_stops_cleanly_and_resume_is_exact(tiny, tmp_path):
    data = _write(tmp_path / "d.jsonl", FACTS.read_text().splitlines()[:8])  # 6 to train on, 2 steps an epoch
    args = [str(data), "--local", "--model", str(tiny), "--epochs", "50", "--batch-size", "3", "--lr", "1e-2",
            "--save-every", "2", "--dropout", "0.1", "--max-length", "64", "--eval-fraction", "0.25"]
    out = tmp_path / "cut"
    proc = subprocess.Popen(swarm_cmd("finetune", *args, "--output", str(out)), stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**swarm_env(tmp_path), "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while not (out / CHECKPOINT).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr.strip().splitlines()[-1], stderr
    saved = torch.load(out / CHECKPOINT, weights_only=True)["step"]
    assert 2 <= saved < 100, "the run was interrupted after a save and before its end"

    result = _invoke([*args, "--output", str(out), "--resume", "--json"])
    assert result.exit_code == 0, result.stderr
    result = _invoke([*args, "--output", str(tmp_path / "whole"), "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 100
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_server_killed_during_training_changes_nothing(tiny, tmp_path):
    """`swarm finetune` through two servers (0:2, 2:4), LoRA dropout on; the 2:4 server gets
    SIGKILL after two steps and a new one takes its blocks: training finishes, and the adapter
    equals a `--local` run's (the same, to float32 rounding, as an undisturbed swarm run's)."""
    data = _write(tmp_path / "d.jsonl", FACTS.read_text().splitlines()[:10])
    args = [str(data), "--model", str(tiny), "--epochs", "8", "--batch-size", "4", "--lr", "1e-2", "--dropout", "0.1",
            "--max-length", "64", "--json"]
    out = tmp_path / "swarm"
    with running_swarm(tiny, ["0:2", "2:4"], tmp_path, extra=("--threads", "1")) as servers:
        proc = subprocess.Popen(
            swarm_cmd("finetune", *args, "--output", str(out), "--initial-peers", servers[0].maddr),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**swarm_env(tmp_path), "OMP_NUM_THREADS": "1"},
        )
        try:
            deadline = time.monotonic() + 90
            while _steps(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _steps(out) >= 2 and proc.poll() is None, "the run did not get going"
            at_kill = _steps(out)
            servers[1].proc.kill()  # the only 2:4 server: the run is certainly using it
            spare = ServerProcess(["--model", str(tiny), "--blocks", "2:4", "--threads", "1", "--announce-period", "1",
                                   "--initial-peers", servers[0].maddr], tmp_path, "spare")
            servers.append(spare)
            spare.wait_ready()
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "failed" in stderr and "take over" in stderr, stderr  # the failover happened
    assert json.loads(stdout)["steps"] == 24 > at_kill
    result = _invoke([*args, "--output", str(tmp_path / "local"), "--local"])
    assert result.exit_code == 0, result.stderr
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("swarm", "local"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def _steps(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    if not metrics.exists():
        return 0
    return sum('"type": "step"' in line for line in metrics.read_text().splitlines())


def _split_aware(path: Path, n: int, fraction: float, train: dict, held: dict) -> Path:
    """``n`` lines: ``held`` on the lines the split (seed 0) holds out, ``train`` on the others."""
    from swarm.engine.finetune import split

    held_out = set(split(list(range(n)), fraction, 0)[1])
    return _write(path, [json.dumps(held if i in held_out else train) for i in range(n)])


@pytest.mark.parametrize("flags, steps, limit", [
    ([], 30, "30 steps (15 epochs)"),
    (["--epochs", "3"], 6, "6 steps (--epochs 3)"),
    (["--max-steps", "40"], 40, "40 steps (--max-steps)"),  # past the 15 epochs a default would give
    (["--max-steps", "5", "--epochs", "4"], 5, "5 steps (--max-steps)"),
    (["--epochs", "3", "--max-steps", "40"], 6, "6 steps (--epochs 3 ends before --max-steps 40)"),
])
def test_max_steps_wins_over_the_default_epochs_and_the_start_line_says_which_limit_applies(
    flags, steps, limit, tiny, tmp_path
):
    data = _write(tmp_path / "d.jsonl", FACTS.read_text().splitlines()[:8])  # 6 to train on, 2 steps an epoch
    result = _invoke([str(data), "--local", "--model", str(tiny), "--output", str(tmp_path / "o"), "--batch-size", "3",
                      "--eval-fraction", "0.25", "--max-length", "64", "--save-every", "0", *flags])
    assert result.exit_code == 0, result.stderr
    assert f"(2 held out): {limit}, lr" in result.stderr, result.stderr
    assert f"trained a lora adapter: {steps} steps over 6 examples" in result.stdout, result.stdout
    lines = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["type"] == "step"] == list(range(1, steps + 1))


def test_the_best_adapter_by_eval_loss_is_kept_when_the_eval_loss_rises(client, tmp_path):
    """Data whose held-out completions differ from the trained ones: the eval loss falls, then rises
    as the run learns the trained answer. OUTPUT/best holds the adapter of the lowest eval loss (the
    one its step's checkpoint held), the final adapter stays the last step's."""
    from swarm.engine.finetune import save_adapter

    data = _split_aware(tmp_path / "d.jsonl", 8, 0.25, {"prompt": "Say it:", "completion": " zz"},
                        {"prompt": "Say it:", "completion": " qq"})
    cfg = _cfg(tmp_path / "o", lr=0.05, max_steps=40, epochs=None, batch_size=3, eval_fraction=0.25, save_every=4,
               target_modules="all-linear", rank=16)
    blocks = LocalBlocks(client.checkpoint.load_blocks(0, client.checkpoint.num_blocks))
    snapshots = tmp_path / "at"

    def snapshot(event):  # the adapter at each checkpoint, saved as the run saves adapters
        if event["type"] == "checkpoint":
            state = torch.load(cfg.output / CHECKPOINT, weights_only=True)
            save_adapter(cfg, client, state["tensors"], snapshots / str(event["step"]))

    result = finetune(cfg, blocks, client, _dataset(client, data), on_event=snapshot)
    records = map(json.loads, (tmp_path / "o" / "metrics.jsonl").read_text().splitlines())
    evals = [r for r in records if r["type"] == "eval"]
    losses = {r["step"]: r["eval_loss"] for r in evals}
    best_step = min(losses, key=losses.get)
    assert 0 < best_step < result.steps == 40 and result.eval_loss_after > losses[best_step] + 0.25, losses
    assert (result.best_step, result.best_eval_loss) == (best_step, losses[best_step])
    assert result.best_output == cfg.output / "best"
    new_lows = [s for s in losses if losses[s] < min([v for t, v in losses.items() if t < s], default=float("inf"))]
    assert [r["step"] for r in evals if r.get("best")] == new_lows
    best = load_file(cfg.output / "best" / "adapter_model.safetensors")
    at_best = load_file(snapshots / str(best_step) / "adapter_model.safetensors")
    final = load_file(cfg.output / "adapter_model.safetensors")
    assert best.keys() == at_best.keys() == final.keys()
    assert all(torch.equal(best[k], at_best[k]) for k in best)
    assert not all(torch.equal(best[k], final[k]) for k in best)
    assert (cfg.output / "best" / "adapter_config.json").read_text() == (cfg.output / "adapter_config.json").read_text()
    assert sorted(p.name for p in cfg.output.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "best",
                                                            "checkpoint", "metrics.jsonl"]  # no .tmp/.old left


def test_a_normal_run_keeps_a_best_that_generate_loads(tiny, client, tmp_path):
    data = _write(tmp_path / "d.jsonl", FACTS.read_text().splitlines()[:8])
    args = [str(data), "--local", "--model", str(tiny), "--epochs", "2", "--batch-size", "3", "--eval-fraction", "0.25",
            "--max-length", "64", "--lr", "1e-2"]
    result = _invoke([*args, "--output", str(tmp_path / "o")])
    assert result.exit_code == 0, result.stderr
    best = tmp_path / "o" / "best"
    assert f"  best        {best}  (eval loss " in result.stdout, result.stdout
    assert "at step 4: the final adapter)" in result.stdout, result.stdout  # the loss fell throughout
    adapter = load_adapter(best, client.checkpoint)
    assert adapter.kind == "lora" and any(v.abs().max() > 0 for k, v in adapter.tensors.items() if k.endswith("lora_B"))
    generated = CliRunner().invoke(app, ["generate", "--local", "--model", str(tiny), "--adapter", str(best),
                                         "--max-new-tokens", "2", "--json", "The capital of Zorbia is"])
    assert generated.exit_code == 0, (generated.stderr, generated.exception)
    assert len(json.loads(generated.stdout)["token_ids"]) == 2

    result = _invoke([*args, "--output", str(tmp_path / "j"), "--json"])
    summary = json.loads(result.stdout)
    assert summary["best_output"] == str(tmp_path / "j" / "best") and summary["best_step"] == summary["steps"] == 4
    assert summary["best_eval_loss"] == summary["eval_loss_after"]

    result = _invoke([*args, "--output", str(tmp_path / "n"), "--no-save-best", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["best_output"] is None, result.stderr
    assert not (tmp_path / "n" / "best").exists()
    result = _invoke([*args, "--output", str(tmp_path / "e"), "--save-best", "--eval-fraction", "0"])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--save-best keeps the adapter of the best eval loss: it needs --eval-fraction above 0" in result.stderr


def test_a_version_1_checkpoint_still_resumes_exactly(client, tmp_path):
    """A checkpoint of before best-keeping (version 1: no best, and --epochs 15 recorded even for a
    --max-steps run) resumes, and ends with the adapter of an uninterrupted run."""
    blocks = LocalBlocks(client.checkpoint.load_blocks(0, client.checkpoint.num_blocks))
    dataset = _dataset(client)
    kw = {"epochs": None, "max_steps": 6, "save_every": 3, "batch_size": 4}
    finetune(_cfg(tmp_path / "whole", **kw), blocks, client, dataset)

    def stop_at_4(event):
        if event["type"] == "step" and event["step"] == 4:
            raise Stop

    with pytest.raises(Stop):
        finetune(_cfg(tmp_path / "cut", **kw), blocks, client, dataset, on_event=stop_at_4)
    path = tmp_path / "cut" / CHECKPOINT
    state = torch.load(path, weights_only=True)
    del state["best"]
    state["version"], state["run"]["epochs"] = 1, 15
    torch.save(state, path)
    resumed = finetune(_cfg(tmp_path / "cut", resume=True, **kw), blocks, client, dataset)
    assert resumed.steps == 6 and resumed.best_step == 6  # best kept from the resumed step on
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.load(path, weights_only=True)["version"] == 2
