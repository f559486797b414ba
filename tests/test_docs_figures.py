"""scripts/docs_figures.py's figures of the loopback benchmarks, from small results files written
here in the shape the scripts write them (scripts/bench_common.py's header, each script's figures):
the tables have the docs' columns, goals are marked, and a marker is rewritten in place."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

HEADER = {
    "date": "2026-12-05T10:00:00+00:00", "commit": "abc1234", "dirty": False,
    "machine": {"cpu_count": 2, "cpu": "Some CPU", "torch": "2.9.1", "torch_threads": 2},
}
FILES = {
    "local": {"settings": {}, "read_bandwidth_gb_s": 87.2, "rows": [
        {"model": "SmolLM2-135M", "dtype": "float32", "prefill_tok_s": 620.4, "decode_tok_s": 28.61,
         "bound_tok_s": 152.3, "of_bound": 0.188},
        {"model": "Llama-1.1B (random)", "dtype": "bfloat16", "prefill_tok_s": 412, "decode_tok_s": 25.7,
         "bound_tok_s": 39.6, "of_bound": 0.65}]},
    "swarm": {"settings": {"dtype": "bfloat16", "tokens": 48, "rounds": 3},
              "wire": [{"frame": "16 KB", "round_trip_ms": 0.87, "mb_s": 38.1},
                       {"frame": "32 MB", "round_trip_ms": 566.2, "mb_s": 119.0}],
              "decode": [{"model": "SmolLM2-135M", "threads": "default", "transport": t, "local_ms": 14.6,
                          "swarm_ms": 24.8, "ratio": 1.70} for t in ("libp2p, push", "libp2p, no push", "pipes")]
              + [{"model": "Llama-1.1B (random)", "threads": "1", "transport": "libp2p, push", "local_ms": 52.8,
                  "swarm_ms": 69.9, "ratio": 1.32}]},
    "api": {"settings": {"tokens": 32, "rounds": 3}, "open_ms": 1100.0, "same_text": True,
            "paths": [{"path": p, "ttft_ms": t, "decode_tok_s": 20.1} for p, t in
                      (("api", 206.4), ("reused", 190.0), ("fresh", 1740.0), ("cli", 3323.0))],
            "concurrency": [{"requests": n, "aggregate_tok_s": 18.4, "mean_ttft_ms": 218.0} for n in (1, 4, 8)]},
    "recovery": {"settings": {}, "identical": True, "undisturbed_tok_s": 12.6, "disturbed_tok_s": 10.5,
                 "kills": [{"token": 20, "to_next_ms": 367, "replay_ms": 223, "recovery_ms": 144},
                           {"token": 40, "to_next_ms": 514, "replay_ms": 406, "recovery_ms": 85}]},
    "finetune": {"settings": {"rounds": 3, "steps": 6, "dtype": "float32"},
                 "rows": [{"setting": "local", "tok_s": 243, "ratio": 1.0},
                          {"setting": "recomputing", "tok_s": 215, "ratio": 0.85},
                          {"setting": "swarm", "tok_s": 177, "ratio": 0.71}],
                 "wire_bytes_per_step": 19.5e6, "hidden_bytes_per_step": 17.7e6, "hidden_tensor_bytes": 1.18e6},
    "balance": {"settings": {"rounds": 5, "cgroups": True}, "whole_run_s": 324, "ratio": 1.21,
                "ratios": [1.01, 1.21, 2.05],
                "placements": {label: {"servers": [{"share": 0.5, "blocks": [0, 15]},
                                                   {"share": 0.0625, "blocks": [15, 30]}],
                                       "bottleneck": {"throughput": neck, "blocks": [[15, 30]]},
                                       "aggregate_tok_s": agg, "per_client_tok_s": 1.69}
                               for label, neck, agg in (("balanced", 349.0, 6.29), ("naive", 244.0, 4.78))}},
}


@pytest.fixture
def figures(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("docs_figures", ROOT / "scripts" / "docs_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, data in FILES.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"benchmark": name, **HEADER, **data}))
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    module.results.cache_clear()
    return module


def rows(text: str) -> list[list[str]]:
    """The cells of a markdown table's body."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


def test_every_loopback_figure_renders_with_its_provenance(figures):
    for name in ("local", "swarm_decode", "api_paths", "recovery", "finetune", "balance"):
        text = figures.FIGURES[name]()
        assert "the run of 2026-12-05 (commit abc1234; 2 cores of Some CPU, torch 2.9.1)" in text, name
    for name in ("swarm_wire", "api_concurrency", "headline_loopback"):
        assert rows(figures.FIGURES[name]()), name


def test_tables_have_the_docs_columns_and_mark_the_goals(figures):
    assert rows(figures.local()) == [["SmolLM2-135M", "float32", "620", "28.6", "152", "19 %"],
                                     ["Llama-1.1B (random)", "bfloat16", "412", "25.7", "39.6", "65 %"]]
    decode = rows(figures.swarm_decode())
    assert decode[0] == ["SmolLM2-135M", "default (2)", "libp2p, push", "14.6", "24.8", "**1.70**", "≤ 1.30"]
    assert decode[2][2] == "pipes (floor)" and decode[2][-1] == ""
    assert decode[3][-2:] == ["1.32", ""]  # one server thread: no goal
    assert rows(figures.swarm_wire()) == [["16 KB hidden state", "0.87 ms", "38 MB/s"],
                                          ["32 MB hidden state", "566 ms", "119 MB/s"]]
    assert [r[1] for r in rows(figures.api_paths())] == ["**206**", "190", "1,740", "3,323"]
    assert rows(figures.recovery())[1] == ["40", "514 ms", "406 ms", "85 ms"]
    assert rows(figures.finetune())[2] == ["swarm, 3 servers", "177", "**0.71**", "≥ 0.75"]
    assert "Wire per optimizer step: 19.5 MB" in figures.finetune()
    balance = figures.balance()
    assert rows(balance)[0] == ["balanced", "½→0:15, 1/16→15:30", "349 (15:30)", "**6.29**", "1.69"]
    assert "ranging from 1.01 to 2.05" in balance and "bottleneck ratio is 1.43" in balance
    assert rows(figures.headline_loopback())[2][1] == "**85–144 ms** (goal < 1 s)"


def test_a_marker_is_rewritten_and_then_up_to_date(figures, tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text("before\n<!-- figures:recovery -->\nold table\n<!-- /figures -->\nafter\n")
    assert figures.run([doc], check=True) == [f"{doc}: figures:recovery differs from scripts/results (run `make docs`)"]
    figures.run([doc], check=False)
    assert "| 20 | 367 ms |" in doc.read_text() and doc.read_text().endswith("<!-- /figures -->\nafter\n")
    assert figures.run([doc], check=True) == []


def test_a_missing_results_file_is_named(figures, tmp_path):
    (tmp_path / "api.json").unlink()
    with pytest.raises(figures.FigureError, match=r"figure api_paths: .*api\.json does not exist"):
        figures.render("<!-- figures:api_paths -->\n<!-- /figures -->\n", "page.md")
