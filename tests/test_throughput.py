"""`--throughput`: auto announces the cached measurement, eval measures again (and updates the
cache), a number is announced as it is; anything else is refused naming the flag."""

from __future__ import annotations

import json

import pytest

from swarm.engine.throughput import parse_throughput
from swarm.p2p.loop import run
from swarm.p2p.server import BlockServer, ServerConfig


async def _announced(model, throughput) -> float:
    server = await BlockServer.start(ServerConfig(model_dir=model, blocks="0:2", new_swarm=True, throughput=throughput))
    try:
        return server.info().throughput
    finally:
        await server.stop()


def test_auto_uses_the_cache_eval_measures_again_and_a_number_is_announced(tmp_path, monkeypatch, tiny_checkpoints):
    monkeypatch.setenv("SWARM_HOME", str(tmp_path))
    model = tiny_checkpoints["llama"]
    measured = run(_announced(model, "auto"))  # measured once, cached
    cache = tmp_path / "throughput.json"
    assert measured > 0 and list(json.loads(cache.read_text()).values()) == [measured]
    cache.write_text(json.dumps({key: 123456.0 for key in json.loads(cache.read_text())}))
    assert run(_announced(model, "auto")) == 123456.0
    remeasured = run(_announced(model, "eval"))
    assert remeasured != 123456.0 and list(json.loads(cache.read_text()).values()) == [remeasured]
    assert run(_announced(model, 7.5)) == 7.5


@pytest.mark.parametrize("spec", ["0", "-3", "abc", "nan", "inf", ""])
def test_bad_throughput_is_refused_naming_the_flag(spec):
    with pytest.raises(ValueError, match="--throughput must be auto, eval or a positive number"):
        parse_throughput(spec)
