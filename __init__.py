"""swarm: run and fine-tune large language models over a swarm of modest machines.

The repository root is the ``swarm`` package: ``swarm.engine`` (model math), ``swarm.cache``
(memory that outlives one call), ``swarm.p2p`` (peers and the wire) and ``swarm.cli`` (commands).
"""

__version__ = "0.1.0"

import os as _os

# PyTorch's OpenMP threads spin for a while after each parallel region before sleeping (GNU
# OpenMP's default is 300,000 spins). Several processes computing in turn on the same cores (a
# server handing a step to the next, a client waiting for its chain) then steal each other's
# cores: measured here, 3 loopback servers and a client decode 1.9× faster with 10,000 spins, and
# a process alone runs as fast as with the default. Set before PyTorch loads; a user's own
# setting wins.
_os.environ.setdefault("GOMP_SPINCOUNT", "10000")
