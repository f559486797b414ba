"""The main job: a local swarm of the default model on loopback, then status and generation.

Starts three `swarm serve` processes covering blocks 0:10, 10:20 and 20:30, shows `swarm status`,
generates with `swarm generate` through them (and with `--local` for comparison), then stops the
servers (SIGTERM: they announce offline and exit). Usage: python scripts/demo_swarm.py [PROMPT]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from swarm.launch import ServeProcess

RANGES = ["0:10", "10:20", "20:30"]


def swarm(*args: str) -> list[str]:
    return [sys.executable, "-m", "swarm.cli.main", *args]


def main() -> int:
    prompt = sys.argv[1] if len(sys.argv) > 1 else "The capital of France is"
    servers: list[ServeProcess] = []
    with tempfile.TemporaryDirectory(prefix="swarm-demo-") as tmp:
        try:
            first = None
            for i, blocks in enumerate(RANGES):
                args = ["--blocks", blocks, "--identity", str(Path(tmp) / f"server-{i}.key"),
                        "--public-name", f"demo-{i}", "--announce-period", "2"]
                args += ["--new-swarm"] if first is None else ["--initial-peers", first]
                print(f"$ swarm serve {' '.join(args)}", flush=True)
                servers.append(ServeProcess(args))
                addr = servers[-1].wait_ready()
                print(f"  ready at {addr}", flush=True)
                first = first or addr
            print("\n$ swarm status", flush=True)
            subprocess.run(swarm("status", "--initial-peers", first), check=True)
            print(f'\n$ swarm generate --initial-peers {first} "{prompt}" --max-new-tokens 24', flush=True)
            subprocess.run(swarm("generate", "--initial-peers", first, prompt, "--max-new-tokens", "24"), check=True)
            print(f'\n$ swarm generate --local "{prompt}" --max-new-tokens 24', flush=True)
            subprocess.run(swarm("generate", "--local", prompt, "--max-new-tokens", "24"), check=True)
        finally:
            for server in servers:
                server.terminate()
            for server in servers:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
