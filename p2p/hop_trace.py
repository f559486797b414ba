"""Timestamps of a server's hops, for the benchmarks (off unless one turns it on).

``scripts/bench_wire.py`` sets :data:`marks` to a dict, runs decode steps through an in-process
server, and reads when each step was read and decoded (``read``), queued for the compute thread
(``queued``), started and finished there (``started``, ``done``), back on the libp2p thread
(``resumed``) and written (``written``): where a hop's software time goes. Off, a mark costs one
test of a global."""

from __future__ import annotations

import time

marks: dict[str, list[float]] | None = None


def mark(name: str) -> None:
    if marks is not None:
        marks.setdefault(name, []).append(time.perf_counter())
