"""The client of tests/test_netns.py, run on its own emulated host: greedy generation through the
swarm; after token PAUSE_AT it prints ``serving PEER_ID`` (the server now running BLOCK) and waits
for a line on stdin (the test cuts that server's link meanwhile); at the end one JSON line with
the tokens and the peers that served BLOCK.

    python tests/netns_client.py MODEL_DIR INITIAL_PEER PAUSE_AT BLOCK MAX_NEW_TOKENS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from swarm.engine.generation import GenerationConfig
from swarm_utils import swarm_generate


def main() -> None:
    model, initial_peer, pause_at, block, tokens = Path(sys.argv[1]), sys.argv[2], *map(int, sys.argv[3:6])
    served_by: list[str] = []

    def on_token(i, chain) -> None:
        peer = next(s.span.peer_id for s in chain.sessions if s.span.start <= block < s.span.end)
        if not served_by or served_by[-1] != peer:
            served_by.append(peer)
        if i == pause_at:
            print(f"serving {peer}", flush=True)
            sys.stdin.readline()

    cfg = GenerationConfig(max_new_tokens=tokens, eos_token_ids=())
    out = swarm_generate(model, initial_peer, cfg, on_token, step_timeout=4.0, wait_timeout=20.0)
    print(json.dumps({"tokens": out, "served_by": served_by}), flush=True)


if __name__ == "__main__":
    main()
