"""Batched steps are exact: a session's output through :meth:`BlockRange.run_batch` is bit-identical
to its step run alone, whatever shares the pass (other sessions' decode steps and prefill chunks,
at other positions), for every family, in float32 and bfloat16."""

from __future__ import annotations

import threading

import pytest
import torch

from swarm.engine.adapters import attach
from swarm.engine.checkpoint import PREFILL_CHUNK, Checkpoint
from swarm.engine.fast import POOL_ROWS, invariant_rows, measure_pooling, pools
from swarm_utils import clone_session

pytestmark = pytest.mark.usefixtures("one_thread")


def _sessions(blocks, prompts: list[int], max_length: int = 96):
    """One session per prompt length, each holding that many positions of random hidden states."""
    torch.manual_seed(0)
    sessions = []
    for length in prompts:
        session = blocks.open_session(1, max_length)
        blocks(torch.randn(1, length, blocks.config.hidden_size), session)
        sessions.append(session)
    return sessions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_session_steps_the_same_alone_and_in_any_batch(tiny_checkpoint, dtype):
    blocks = Checkpoint(tiny_checkpoint).load_blocks(0, 4, dtype)
    assert not blocks.batch_exact  # no kernel is trusted to be batch-invariant (scripts/bench_invariance.py)
    attach(blocks)  # as servers do: each linear then pools only as many sessions' rows as it is invariant for
    assert blocks.batch_exact
    pooling = measure_pooling(blocks, dtype)
    if dtype == torch.bfloat16:  # packed bfloat16 linears pool the pass's rows: that path is what is checked
        assert max(pooling) > 16, pooling
    sessions = _sessions(blocks, [3, 17, 1, 40, 8, 64, 5])
    hidden = blocks.config.hidden_size
    torch.manual_seed(1)
    steps = [torch.randn(1, seq, hidden) for seq in (1, 1, 1, 4, 1, 1, 9)]  # decode steps and prefill chunks
    alone = [blocks.run_batch([(h, clone_session(s))])[0] for h, s in zip(steps, sessions)]
    for order in (list(range(7)), [6, 2, 0, 5, 3, 1, 4], [3, 5]):
        copies = {i: clone_session(sessions[i]) for i in order}
        batched = blocks.run_batch([(steps[i], copies[i]) for i in order])
        for i, out in zip(order, batched):
            assert torch.equal(out, alone[i]), f"session {i} differs in batch {order}"
            assert copies[i].length == sessions[i].length + steps[i].shape[1]
        # and the next step after a batched one sees the same cache as after a lone one
        for i in order:
            lone = clone_session(sessions[i])
            blocks.run_batch([(steps[i], lone)])
            nxt = torch.randn(1, 1, hidden)
            assert torch.equal(blocks.run_batch([(nxt, lone)])[0], blocks.run_batch([(nxt, copies[i])])[0])


@pytest.mark.parametrize("segments, limit, expected", [
    ((1, 1, 1), 1, [1, 1, 1]),  # not invariant: every session's rows alone
    ((1, 1, 1), 64, [3]),
    ((1,) * 10, 4, [4, 4, 2]),
    ((1, 9, 1, 1), 8, [1, 9, 2]),  # a session longer than the limit runs alone, the others pool around it
    ((3, 5, 2, 6), 8, [8, 8]),
    ((3, 6, 2), 8, [3, 8]),  # sessions are never split: each pool ends where the next would not fit
    ((8, 8), 8, [8, 8]),
    ((), 8, []),
])
def test_pools_of_a_pass(segments, limit, expected):
    assert pools(segments, limit) == expected
    assert sum(expected) == sum(segments)


class _RowCountLinear(torch.nn.Linear):
    """A "linear" whose rows are independent (elementwise) except that it changes path past
    ``switch`` rows, as real kernels do at some row counts."""

    switch = 5

    def forward(self, x):
        out = x[..., : self.out_features] * 2.0
        return out + 1e-3 if x.shape[-2] > self.switch else out


def test_int8_linears_with_outliers_never_pool():
    """LLM.int8's outlier columns are the union over a call's rows: a row's result depends on the
    others' values, which random inputs would not show. Such linears run once per session."""
    from swarm.engine.quant import Int8Linear

    generator = torch.Generator().manual_seed(0)
    linear = Int8Linear(torch.randn(1536, 576, generator=generator) * 0.05, None)
    assert linear.rows_interact and invariant_rows(linear, torch.float32) == 1
    x = torch.randn(8, 576, generator=generator)
    for row in range(8):  # a few outlier features per row, in other columns each
        x[row, torch.randint(0, 576, (3,), generator=generator)] = 20.0
    together = linear(x)
    assert any(not torch.equal(together[r : r + 1], linear(x[r : r + 1])) for r in range(8))


def test_invariance_is_measured_per_kind_of_linear():
    assert invariant_rows(_RowCountLinear(8, 4), torch.float32) == _RowCountLinear.switch
    _RowCountLinear.switch = 100
    try:  # the same kind and shapes: remembered, not measured again
        assert invariant_rows(_RowCountLinear(8, 4), torch.float32) == 5
        assert invariant_rows(_RowCountLinear(8, 6), torch.float32) == POOL_ROWS
    finally:
        _RowCountLinear.switch = 5


def test_a_plain_forward_on_a_session_is_the_batched_path(tiny_checkpoints):
    blocks = Checkpoint(tiny_checkpoints["llama"]).load_blocks(0, 4)
    (a,), (b,) = _sessions(blocks, [5]), _sessions(blocks, [5])  # the same positions cached
    step = torch.randn(1, 1, blocks.config.hidden_size)
    other = torch.randn(1, 1, blocks.config.hidden_size)
    (third,) = _sessions(blocks, [9])
    assert torch.equal(blocks(step, a), blocks.run_batch([(step, b), (other, third)])[0])


def test_blocks_that_cannot_batch_exactly_run_the_steps_one_by_one(tiny_checkpoints):
    blocks = Checkpoint(tiny_checkpoints["llama"]).load_blocks(0, 4, torch.float32)
    assert not blocks.batch_exact  # float32 linears, not attached
    sessions = _sessions(blocks, [3, 6])
    steps = [torch.randn(1, 1, blocks.config.hidden_size), torch.randn(1, 2, blocks.config.hidden_size)]
    alone = [blocks.run_batch([(h, clone_session(s))])[0] for h, s in zip(steps, sessions)]
    together = blocks.run_batch(list(zip(steps, sessions)))
    assert all(torch.equal(a, b) for a, b in zip(alone, together))


def test_bad_batches_are_refused_before_anything_runs(tiny_checkpoints):
    blocks = Checkpoint(tiny_checkpoints["llama"]).load_blocks(0, 4)
    (session,) = _sessions(blocks, [4])
    hidden = blocks.config.hidden_size
    for steps, match in [
        ([(torch.randn(2, 1, hidden), session)], "1, seq"),
        ([(torch.randn(1, PREFILL_CHUNK + 1, hidden), session)], "positions"),
        ([(torch.randn(1, 1, hidden), session), (torch.randn(1, 1, hidden), session)], "once"),
        ([(torch.randn(1, 200, hidden), session)], "max_length"),
    ]:
        with pytest.raises(ValueError, match=match):
            blocks.run_batch(steps)
    assert session.length == 4


PROMPTS = [
    "The capital of France is", "Once upon a time", "1, 2, 3, 4,", "Hello", "The quick brown fox jumps over the lazy dog and",
    "In a hole in the ground there lived", "def fib(n):", "Paris", "Water boils at", "Roses are red,", "A", "To be or not",
]


def _requests() -> list[tuple[str, dict]]:
    """Prompts of many lengths with greedy and sampled settings."""
    out = []
    for i, prompt in enumerate(PROMPTS):
        settings = dict(max_new_tokens=6 + i % 5)
        if i % 3 == 1:
            settings.update(temperature=0.9, top_p=0.9, seed=i)
        elif i % 3 == 2:
            settings.update(temperature=0.7, top_k=20, seed=100 + i)
        out.append((prompt, settings))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_concurrent_generations_batch_and_each_equals_its_run_alone(tiny_checkpoints, tmp_path, dtype):
    """12 concurrent generations (other prompts, lengths and sampling) through two in-process
    servers that batch: every text equals the same request run alone and run locally, and the
    servers did run steps of several sessions as one pass."""
    import swarm

    model = tiny_checkpoints["llama"]
    requests = _requests()
    with swarm.open(model, local=True, dtype=dtype) as local:
        expected = [local.generate(p, **kw) for p, kw in requests]
    common = dict(throughput=100, announce_period=1, max_batch=8, dtype=dtype, choice_delay=0)
    with swarm.Server(model, blocks="0:2", new_swarm=True, identity=tmp_path / "a.key", **common) as first, \
         swarm.Server(model, blocks="2:4", initial_peers=[first.address], identity=tmp_path / "b.key", **common) as second:
        with swarm.open(model, initial_peers=[first.address], dtype=dtype) as s:
            alone = [s.generate(p, **kw) for p, kw in requests[:3]]
            assert alone == expected[:3]
            results: list[str | None] = [None] * len(requests)
            barrier = threading.Barrier(len(requests))

            def run(i: int) -> None:
                barrier.wait(30)
                results[i] = s.generate(requests[i][0], **requests[i][1])

            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert results == expected
            queues = [server._server.queue for server in (first, second)]
            assert all(q.max_batch == 8 for q in queues)
            assert all(q.batched_steps > 0 for q in queues), [(q.passes, q.steps, q.batched_steps) for q in queues]
            report = s.status()
            assert {srv["max_batch"] for srv in report["servers"]} == {8}


def _info(maddr: str) -> dict:
    """A server's own info reply (what it would announce now)."""
    from swarm.p2p import protocols
    from swarm.p2p.host import Host
    from swarm.p2p.loop import run
    from swarm.p2p.wire import Frame

    async def ask() -> dict:
        host = await Host.start()
        try:
            peer = await host.connect(maddr, timeout=10)
            return (await protocols.request(host, peer, protocols.INFO, Frame("info"), 10))["info"]
        finally:
            await host.close()

    return run(ask())


@pytest.mark.slow
def test_a_server_killed_while_its_batch_holds_16_sessions_changes_no_output(tiny_checkpoints, tmp_path):
    """16 concurrent generations (greedy and sampled, prompts of many lengths) batched on one
    `swarm serve` process, SIGKILLed while it holds all of them: every session fails over to a
    replacement, replays, and ends with exactly its local output."""
    import swarm
    from swarm_utils import ServerProcess, running_swarm

    model = tiny_checkpoints["llama"]
    requests = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), kw | {"max_new_tokens": 10})
                for i, (_, kw) in enumerate(_requests() * 2)][:16]
    expected = []
    with swarm.open(model, local=True) as local:
        for i, (prompt, kw) in enumerate(requests):
            while True:  # a sampled request whose seed ends it before the pause takes another seed
                out = local.generate_ids(local.encode(prompt), local.generation_config(**kw))
                if len(out) >= 4 or "seed" not in kw:
                    break
                kw = kw | {"seed": kw["seed"] + 1000}
            requests[i] = (prompt, kw)
            expected.append(out)
    assert min(len(e) for e in expected) >= 4  # each reaches the pause
    with running_swarm(model, ["0:2", "2:4"], tmp_path, ("--throughput", "100", "--max-batch", "16")) as servers:
        doomed = servers[1]
        with swarm.open(model, initial_peers=[servers[0].maddr]) as s:
            arrived, resume = threading.Barrier(len(requests) + 1), threading.Event()
            results: list = [None] * len(requests)

            def run(i: int) -> None:
                count = [0]

                def on_token(_) -> None:  # every session holds at its 4th token until the server is gone
                    count[0] += 1
                    if count[0] == 4:
                        arrived.wait(60)
                        resume.wait(60)

                prompt, kw = requests[i]
                results[i] = s.generate_ids(s.encode(prompt), s.generation_config(**kw), on_token=on_token)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
            for t in threads:
                t.start()
            arrived.wait(60)  # all 16 sessions are open on the doomed server, mid-generation
            info = _info(doomed.maddr)  # it holds them all, and has run them in batched passes
            assert info["sessions"] == len(requests) and info["batch"] > 1, info
            replacement = ServerProcess(["--model", str(model), "--blocks", "2:4", "--throughput", "100",
                                         "--announce-period", "1", "--initial-peers", servers[0].maddr],
                                        tmp_path, "replacement")
            try:
                replacement.wait_ready()
                doomed.proc.kill()
                doomed.proc.wait(10)
                resume.set()
                for t in threads:
                    t.join(120)
            finally:
                resume.set()
                replacement.stop()
    assert not any(t.is_alive() for t in threads)
    assert results == expected  # a session that failed left None
