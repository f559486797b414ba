"""swarm: run and fine-tune large language models over a swarm of modest machines.

One way in, for programs as for the ``swarm`` command::

    import swarm

    with swarm.open(local=True) as s:          # or initial_peers=[...] / SWARM_INITIAL_PEERS
        print(s.generate("The capital of France is", max_new_tokens=8))

- :func:`open` → a :class:`Swarm`: ``generate``, ``stream``, ``chat``, ``tokenizer``, ``blocks`` (a
  differentiable ``torch.nn.Module``), ``loss``, ``status``.
- :func:`finetune`: train a LoRA, prompt or deep-prompt adapter through the swarm (`swarm finetune`).
- :class:`Server`: a server in this process (`swarm serve`), for notebooks and tests.
- The pieces of a training loop of one's own: :func:`read_dataset`, :func:`batches`,
  :func:`init_lora`, :class:`AdapterSpec`, :func:`save_lora`.
- The configs every way in shares: :class:`ClientOptions`, :class:`ServeOptions`,
  :class:`FinetuneConfig`.

The names load on first use, so ``import swarm`` (and the ``swarm`` command) stays quick. Inside,
the package's rooms: ``swarm.engine`` (model math), ``swarm.cache`` (memory that outlives one
call), ``swarm.p2p`` (peers and the wire), ``swarm.api`` (the OpenAI-compatible API) and
``swarm.cli`` (the commands).
"""

from __future__ import annotations

import os as _os
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# PyTorch's OpenMP threads spin for a while after each parallel region before sleeping (GNU
# OpenMP's default is 300,000 spins). Several processes computing in turn on the same cores (a
# server handing a step to the next, a client waiting for its chain) then steal each other's
# cores: measured here, 3 loopback servers and a client decode 1.9× faster with 10,000 spins, and
# a process alone runs as fast as with the default. Set before PyTorch loads; a user's own
# setting wins.
_os.environ.setdefault("GOMP_SPINCOUNT", "10000")

# public name → the module that defines it
_EXPORTS = {
    "open": "swarm.facade",
    "Swarm": "swarm.facade",
    "read_dataset": "swarm.facade",
    "batches": "swarm.facade",
    "init_lora": "swarm.facade",
    "save_lora": "swarm.facade",
    "ClientOptions": "swarm.config",
    "finetune": "swarm.train",
    "FinetuneConfig": "swarm.engine.finetune",
    "FinetuneResult": "swarm.engine.finetune",
    "Server": "swarm.p2p.server_handle",
    "ServeOptions": "swarm.p2p.serve_options",
    "AdapterSpec": "swarm.engine.adapters",
    "Batch": "swarm.engine.finetune_data",
    "Dataset": "swarm.engine.finetune_data",
    "GenerationConfig": "swarm.engine.generation",
    "SwarmError": "swarm.p2p.chain",
    "NoRouteError": "swarm.p2p.routing",
}
__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # what a type checker and an IDE see; at run time the names load on first use
    from swarm.config import ClientOptions
    from swarm.engine.adapters import AdapterSpec
    from swarm.engine.finetune import FinetuneConfig, FinetuneResult
    from swarm.engine.finetune_data import Batch, Dataset
    from swarm.engine.generation import GenerationConfig
    from swarm.facade import Swarm, batches, init_lora, open, read_dataset, save_lora
    from swarm.p2p.chain import SwarmError
    from swarm.p2p.routing import NoRouteError
    from swarm.p2p.serve_options import ServeOptions
    from swarm.p2p.server_handle import Server
    from swarm.train import finetune


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'swarm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
