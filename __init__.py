"""swarm: run and fine-tune large language models over a swarm of modest machines.

The repository root is the ``swarm`` package: ``swarm.engine`` (model math), ``swarm.cache``
(memory that outlives one call), ``swarm.p2p`` (peers and the wire) and ``swarm.cli`` (commands).
"""

__version__ = "0.1.0"
