"""A lying server, for testing verification: a real `swarm serve` (real libp2p host, real blocks,
real KV caches) whose outputs are changed before they leave it.

    python scripts/liar_server.py --lie noise:0.01 [--after 20] [--rate 0.3] [--only PEER] \
        -- swarm serve --blocks 0:4 --initial-peers ...

(``-- python -m swarm.cli.main serve ...`` works too, so it can prefix a serve command.) Lies:

- ``noise:S``: Gaussian noise of ``S`` times the output's standard deviation added to it;
- ``scale:F``: the blocks' change of the hidden state (output − input) multiplied by ``F``;
- ``permute``: that change permuted along the hidden dimension (a wrong but plausible block:
  the right magnitudes, the wrong values);
- ``zero``: that change dropped (the blocks skipped).

``--after N``: honest for the first N positions of each session, lying after. ``--rate P``: lie
on a step with chance P (seeded: ``--seed``). ``--only PEER``: lie only to these clients (peer
ids, repeatable). Inference steps, pushed or not, and stateless forward and backward passes
(fine-tuning: the backward's gradient with respect to the input gets the same kind of lie) are
all affected (``--only`` applies to inference; ``--after`` counts passes there). Run it only in swarms you own.
"""

from __future__ import annotations

import argparse
import random
import sys

import swarm  # noqa: F401  (before torch: its OpenMP settings)
import torch


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv:
        raise SystemExit("usage: liar_server.py [options] -- swarm serve ARGS")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lie", default="noise:0.01", help="noise:S, scale:F, permute or zero")
    parser.add_argument("--after", type=int, default=0, help="honest for this many positions of each session")
    parser.add_argument("--rate", type=float, default=1.0, help="the chance a step is a lie")
    parser.add_argument("--only", action="append", default=[], help="lie only to this client (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    for marker in ("swarm.cli.main", "swarm"):  # `python -m swarm.cli.main serve ...` or `swarm serve ...`
        if marker in command:
            command = command[command.index(marker) + 1 :]
            break
    return args, command


class Liar:
    def __init__(self, args: argparse.Namespace):
        self.kind, _, value = args.lie.partition(":")
        if self.kind not in ("noise", "scale", "permute", "zero"):
            raise SystemExit(f"--lie {args.lie}: one of noise:S, scale:F, permute, zero")
        self.value = float(value) if value else 0.0
        self.after, self.rate, self.only = args.after, args.rate, set(args.only)
        self.rng = random.Random(args.seed)
        self.gen = torch.Generator().manual_seed(args.seed)
        self.perm: torch.Tensor | None = None
        self.passes = 0

    def wants(self, peer: str, end_position: int) -> bool:
        if self.only and peer not in self.only:
            return False
        if end_position <= self.after:
            return False
        return self.rng.random() < self.rate

    def wants_pass(self) -> bool:
        """Stateless passes (fine-tuning): lie after ``after`` of them (``--only`` does not apply:
        a pass's client is not known where it is computed)."""
        self.passes += 1
        return self.passes > self.after and self.rng.random() < self.rate

    def __call__(self, hidden: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        out = output.float()
        delta = out - hidden.float()
        if self.kind == "noise":
            noise = torch.randn(out.shape, generator=self.gen) * out.std() * self.value
            lied = out + noise
        elif self.kind == "scale":
            lied = hidden.float() + delta * self.value
        elif self.kind == "zero":
            lied = hidden.float().clone()
        else:
            if self.perm is None or len(self.perm) != out.shape[-1]:
                self.perm = torch.randperm(out.shape[-1], generator=self.gen)
            lied = hidden.float() + delta[..., self.perm]
        return lied.to(output.dtype)


def install(liar: Liar) -> None:
    from swarm.engine import adapters
    from swarm.p2p import passes, session_loop

    honest_step = session_loop.SessionLoop._step

    async def step(self, session, frame, source):
        output, fresh = await honest_step(self, session, frame, source)
        if output is not None:
            hidden = session_loop.step_parts(frame)[0]
            if liar.wants(session.peer, frame["position"] + hidden.shape[1]):
                output = liar(hidden, output)
        return output, fresh

    session_loop.SessionLoop._step = step

    def forward(blocks, hidden, *args, **kwargs):
        output = adapters.run_forward(blocks, hidden, *args, **kwargs)
        return liar(hidden, output) if liar.wants_pass() else output

    def backward(blocks, hidden, grad_output, *args, **kwargs):
        grad, grads = adapters.run_backward(blocks, hidden, grad_output, *args, **kwargs)
        if liar.wants_pass():
            grad = liar(torch.zeros_like(grad), grad)
        return grad, grads

    passes.run_forward, passes.run_backward = forward, backward


def main(argv: list[str]) -> None:
    args, command = parse(argv)
    install(Liar(args))
    from swarm.cli.main import app

    sys.argv = ["swarm", *command]
    app()


if __name__ == "__main__":
    main(sys.argv[1:])
