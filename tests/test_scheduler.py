"""What a server computes next (:func:`swarm.p2p.scheduler.pick`), table-tested, and the queue on a
real compute thread: interactive steps first, peers in turns, batchable steps together."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest

from swarm.p2p.scheduler import ComputeQueue, Work, fair_order, pick


def W(peer: str, name: str, kind: str = "step", batch: bool = True, positions: int = 1, key: object = "blocks") -> Work:
    work = Work(peer=peer, kind=kind, positions=positions)
    if batch and kind == "step":
        work.batch_key, work.batch = key, ("blocks", None, None, None)
    work.name = name
    return work


def names(works) -> list[str]:
    return [w.name for w in works]


CASES = [
    # (waiting, after_peer, max_batch, max_positions, expected)
    ("nothing", [], None, 8, 1024, []),
    ("one step", [W("a", "a1")], None, 8, 1024, ["a1"]),
    ("steps of one peer batch in order", [W("a", "a1"), W("a", "a2"), W("a", "a3")], None, 8, 1024, ["a1", "a2", "a3"]),
    ("max_batch bounds the batch", [W("a", f"a{i}") for i in range(5)], None, 2, 1024, ["a0", "a1"]),
    ("max_batch 1: one step", [W("a", "a1"), W("b", "b1")], None, 1, 1024, ["a1"]),
    ("peers take turns: a greedy peer cannot push out another",
     [*(W("a", f"a{i}") for i in range(6)), W("b", "b0")], None, 3, 1024, ["a0", "b0", "a1"]),
    ("the turn passes after the peer served last", [W("a", "a0"), W("b", "b0"), W("c", "c0")], {"step": "a"}, 2, 1024,
     ["b0", "c0"]),
    ("equal shares of a batch for the peers waiting",
     [*(W("a", f"a{i}") for i in range(6)), *(W("b", f"b{i}") for i in range(6)), W("c", "c0")], None, 5, 1024,
     ["a0", "b0", "c0", "a1", "b1"]),
    ("a peer gets more only of what others leave",
     [*(W("a", f"a{i}") for i in range(6)), W("b", "b0")], None, 4, 1024, ["a0", "b0", "a1", "a2"]),
    ("alone, a peer fills the batch", [W("a", f"a{i}") for i in range(6)], None, 4, 1024, ["a0", "a1", "a2", "a3"]),
    ("inference before training", [W("a", "p", kind="pass"), W("b", "s")], None, 8, 1024, ["s"]),
    ("a training pass runs alone", [W("a", "p1", kind="pass"), W("a", "p2", kind="pass")], None, 8, 1024, ["p1"]),
    ("an unbatchable step runs alone", [W("a", "u", batch=False), W("b", "b0")], None, 8, 1024, ["u"]),
    ("unbatchable steps are skipped by a batch", [W("a", "a0"), W("b", "u", batch=False), W("c", "c0")], None, 8, 1024,
     ["a0", "c0"]),
    ("other blocks do not batch", [W("a", "a0"), W("b", "b0", key="other"), W("c", "c0")], None, 8, 1024, ["a0", "c0"]),
    ("positions bound the batch", [W("a", "a0", positions=512), W("b", "b0", positions=512), W("c", "c0", positions=1)],
     None, 8, 600, ["a0", "c0"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_pick(case):
    _, waiting, after, max_batch, max_positions, expected = case
    assert names(pick(waiting, after, max_batch, max_positions)) == expected


def test_passes_past_their_patience_go_before_steps_in_their_own_turns():
    from swarm.p2p.scheduler import PASS_PATIENCE

    passes = [W("t1", "t1a", kind="pass"), W("t1", "t1b", kind="pass"), W("t2", "t2a", kind="pass")]
    for k, work in enumerate(passes):
        work.queued = 100.0 + k * 0.1
    steps = [W("a", "a0"), W("b", "b0")]
    for work in steps:
        work.queued = 101.0
    waiting = [*steps, *passes]
    later = 100.0 + PASS_PATIENCE
    assert names(pick(waiting, None, 8, 1024, now=100.0 + PASS_PATIENCE / 2)) == ["a0", "b0"]  # steps first
    assert names(pick(waiting, None, 8, 1024)) == ["a0", "b0"]  # no clock: steps first
    assert names(pick(waiting, {"pass": "t1"}, 8, 1024, now=later)) == ["t2a"]  # overdue: passes, t2's turn
    assert names(fair_order(waiting, {"pass": "t2", "step": "a"}, now=later)) == ["t1a", "t2a", "t1b"]
    # no step waits: passes take their turns whatever their age (no first-come first-served)
    assert names(pick(passes, {"pass": "t1"}, 8, 1024, now=later + 60)) == ["t2a"]


def test_the_queue_keeps_the_trainers_turns_when_steps_run_inside_their_passes():
    executor = concurrent.futures.ThreadPoolExecutor(1)
    queue = ComputeQueue(executor, max_batch=4, max_positions=1024)
    gate, ran = threading.Event(), []

    def train(name: str) -> None:
        ran.append(name)
        queue.submit(Work(peer="user", kind="step", fn=ran.append, args=(f"step in {name}",)))
        queue.between()  # the step that came meanwhile runs here, inside the pass

    blocker = queue.submit(Work(peer="x", kind="step", fn=gate.wait, args=(10,)))  # holds the thread
    futures = [queue.submit(Work(peer=p, kind="pass", fn=train, args=(f"{p}{i}",))) for p, i in
               (("t1", 0), ("t1", 1), ("t2", 0))]
    futures += [queue.submit(Work(peer=f"u{i}", kind="step", fn=ran.append, args=(f"u{i}",))) for i in range(3)]
    gate.set()
    for future in [blocker, *futures]:
        future.result(10)
    # the steps went first; then the trainers alternate (a step run inside t1's pass does not hand t1 the next turn)
    assert [r for r in ran if r.startswith("t")] == ["t10", "t20", "t11"], ran
    assert ran[3:] == ["t10", "step in t10", "t20", "step in t20", "t11", "step in t11"]
    executor.shutdown()


def test_fair_order_interleaves_peers_keeping_each_peers_order():
    waiting = [W("a", "a0"), W("a", "a1"), W("b", "b0"), W("a", "a2"), W("c", "c0"), W("b", "b1")]
    assert names(fair_order(waiting, None)) == ["a0", "b0", "c0", "a1", "b1", "a2"]
    assert names(fair_order(waiting, {"step": "b"})) == ["c0", "a0", "b0", "a1", "b1", "a2"]
    assert names(fair_order(waiting, {"step": "gone", "pass": "b"})) == ["a0", "b0", "c0", "a1", "b1", "a2"]


def test_queue_serves_steps_before_passes_and_skips_cancelled_work():
    executor = concurrent.futures.ThreadPoolExecutor(1)
    queue = ComputeQueue(executor, max_batch=4, max_positions=1024)
    gate, ran = threading.Event(), []
    blocker = queue.submit(Work(peer="x", kind="pass", fn=gate.wait, args=(10,)))  # holds the thread
    passes = [queue.submit(Work(peer="t", kind="pass", fn=ran.append, args=(f"pass{i}",))) for i in range(2)]
    steps = [queue.submit(Work(peer=p, kind="step", fn=ran.append, args=(p,))) for p in ("a", "b")]
    cancelled = queue.submit(Work(peer="c", kind="step", fn=ran.append, args=("cancelled",)))
    assert cancelled.cancel()
    gate.set()
    for future in [blocker, *passes, *steps]:
        future.result(10)
    assert ran == ["a", "b", "pass0", "pass1"]
    assert queue.waiting() == 0
    executor.shutdown()


def test_a_shut_down_executor_fails_the_work_at_once():
    executor = concurrent.futures.ThreadPoolExecutor(1)
    executor.shutdown()
    future = ComputeQueue(executor, 4, 1024).submit(Work(peer="a", kind="step", fn=lambda: 1))
    with pytest.raises(RuntimeError):
        future.result(1)


def test_work_behind_a_cancelled_drain_fails_instead_of_hanging():
    executor = concurrent.futures.ThreadPoolExecutor(1)
    queue = ComputeQueue(executor, max_batch=4, max_positions=1024)
    gate = threading.Event()
    executor.submit(gate.wait, 10)  # the thread is busy: the queue's drain waits in the executor
    waiting = queue.submit(Work(peer="a", kind="step", fn=lambda: 1))
    executor.shutdown(wait=False, cancel_futures=True)  # as a stopping server does: the drain is cancelled
    gate.set()
    with pytest.raises(RuntimeError, match="stopping"):
        waiting.result(5)


def test_the_compute_thread_is_handed_back_between_passes():
    """A server's main thread runs the queue through MainThreadExecutor and checks for a stop
    request between calls: a queue that always has work must still let it see one."""
    from swarm.p2p.loop import MainThreadExecutor

    executor = MainThreadExecutor()
    queue = ComputeQueue(executor, max_batch=4, max_positions=1024)
    ran = []
    futures = [queue.submit(Work(peer="a", kind="pass", fn=ran.append, args=(i,))) for i in range(3)]
    executor.run_until(lambda: len(ran) >= 1, poll=0.05)
    assert ran == [0] and queue.waiting() == 2  # returned after one pass, the rest still queued
    executor.run_until(lambda: len(ran) == 3, poll=0.05)
    assert [f.result(1) for f in futures] == [None, None, None]


def test_a_malformed_step_fails_alone_not_the_steps_batched_with_it(tiny_checkpoints):
    """A stranger's step of the wrong shape must not end other peers' sessions in its pass."""
    import torch

    from swarm.engine.adapters import attach
    from swarm.engine.checkpoint import Checkpoint

    blocks = attach(Checkpoint(tiny_checkpoints["llama"]).load_blocks(0, 4))
    hidden = blocks.config.hidden_size
    good, bad = blocks.open_session(1, 16), blocks.open_session(1, 16)
    executor = concurrent.futures.ThreadPoolExecutor(1)
    queue = ComputeQueue(executor, max_batch=4, max_positions=1024)
    gate = threading.Event()
    queue.submit(Work(peer="x", kind="step", fn=gate.wait, args=(10,)))  # hold the thread: both wait together
    key = (id(blocks.blocks[0]), blocks.end)
    ok = queue.submit(Work(peer="a", kind="step", positions=1, batch_key=key,
                           batch=(blocks, torch.randn(1, 1, hidden), good, lambda: False)))
    wrong = queue.submit(Work(peer="b", kind="step", positions=1, batch_key=key,
                              batch=(blocks, torch.randn(2, 1, hidden), bad, lambda: False)))
    gate.set()
    assert ok.result(10)[0].shape == (1, 1, hidden) and good.length == 1
    with pytest.raises(ValueError, match="batched step"):
        wrong.result(10)
    executor.shutdown()


@pytest.mark.parametrize("kind, phase", [("forward", "forward"), ("backward", "forward"), ("backward", "backward")])
def test_steps_run_between_the_blocks_of_a_long_pass_exactly(tiny_checkpoints, kind, phase):
    """A training pass checks the queue before each block's forward and backward: steps that
    wait run there, without the pass's adapter (LoRA and a deep prompt), each output equal to
    its step alone, and the pass's own result equal to the pass run without interruption."""
    import torch

    from swarm.engine.adapters import attach, init_lora, run_backward, run_forward, suspended
    from swarm.engine.checkpoint import Checkpoint

    ckpt = Checkpoint(tiny_checkpoints["llama"])
    blocks = attach(ckpt.load_blocks(0, 4))
    size = blocks.config.hidden_size
    generator = torch.Generator().manual_seed(3)
    tensors = init_lora(ckpt, ["self_attn.q_proj", "mlp.down_proj"], rank=4, seed=1)
    tensors = {k: torch.randn(v.shape, generator=generator) * 0.3 for k, v in tensors.items()}  # B ≠ 0: it shows
    tensors["1.prompt"] = torch.randn(3, size, generator=generator)
    hidden, grad = torch.randn(1, 200, size, generator=generator), torch.randn(1, 200, size, generator=generator)
    steps = [torch.randn(1, n, size, generator=generator) for n in (5, 1, 3)]

    def run_pass(check):
        if kind == "forward":
            return run_forward(blocks, hidden, tensors, None, check)
        return run_backward(blocks, hidden, grad, tensors, None, check)

    expected_pass = run_pass(lambda: False)
    with torch.no_grad():
        expected_steps = [blocks(h, blocks.open_session(1, 16)) for h in steps]

    executor = concurrent.futures.ThreadPoolExecutor(1)
    queue = ComputeQueue(executor, max_batch=2, max_positions=1024)
    calls, submitted, done_at = [], threading.Event(), {}
    interrupt_at = 2 if phase == "forward" else blocks.end + 2  # the forward's 2nd block; the backward's 2nd

    def check() -> bool:
        calls.append(1)
        if len(calls) == interrupt_at:
            submitted.wait(10)
        queue.between(suspended)
        return False

    result = queue.submit(Work(peer="trainer", kind="pass", fn=run_pass, args=(check,)))
    deadline = time.monotonic() + 30
    while len(calls) < interrupt_at - 1:  # the pass is running: steps come now
        assert not result.done() and time.monotonic() < deadline, result
        threading.Event().wait(0.001)
    key = (id(blocks.blocks[0]), blocks.end)
    futures = []
    for i, h in enumerate(steps):
        work = Work(peer=f"user{i}", kind="step", positions=h.shape[1], batch_key=key,
                    batch=(blocks, h, blocks.open_session(1, 16), lambda: False))
        futures.append(queue.submit(work))
        futures[-1].add_done_callback(lambda f, i=i: done_at.setdefault(i, len(calls)))
    submitted.set()
    got_pass = result.result(30)
    assert all(done_at[i] < len(calls) for i in range(len(steps))), (done_at, len(calls))  # before the pass ended
    assert queue.interleaved >= 2  # max_batch 2: the three steps took two stops
    for future, want in zip(futures, expected_steps):
        assert torch.equal(future.result(1)[0], want)
    if kind == "forward":
        assert torch.equal(got_pass, expected_pass)
    else:
        assert torch.equal(got_pass[0], expected_pass[0])
        assert all(torch.equal(got_pass[1][k], expected_pass[1][k]) for k in tensors)
    executor.shutdown()


def test_a_backward_nobody_waits_for_stops_between_blocks(tiny_checkpoints):
    import torch

    from swarm.engine.adapters import attach, run_backward
    from swarm.engine.checkpoint import Checkpoint, StepCancelled

    blocks = attach(Checkpoint(tiny_checkpoints["llama"]).load_blocks(0, 4))
    hidden = torch.randn(1, 20, blocks.config.hidden_size)
    calls = []

    def check() -> bool:  # the client leaves once the forward is done
        calls.append(1)
        return len(calls) > blocks.end + 1

    with pytest.raises(StepCancelled, match="backward"):
        run_backward(blocks, hidden, torch.randn_like(hidden), None, None, check)
    assert len(calls) == blocks.end + 2  # four forwards, then the first two blocks' backward checks
