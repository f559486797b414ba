# `make demo`: set everything up and run the main job.  `make test`: set up and run the test suite
# (`make test-fast`: the tests that take seconds, not minutes).
# PYTHON=python3.11 make demo: create .venv/ with that interpreter (Python 3.11 or newer).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup model demo test test-fast bench bench-paper docs clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

model: setup
	$(PY) -m swarm.engine.default_model

demo: model
	$(PY) scripts/demo_swarm.py "The capital of France is"

# TEST_WORKERS: pytest processes (pytest-xdist), each taking whole files; the suite mostly waits
# on processes and the network, so 2 workers keep 2 cores busy (about 10 minutes; 3 were at most a
# minute faster on 2 cores, and loaded them enough to make timing-dependent tests flaky)
TEST_WORKERS ?= 2

test: model
	bash scripts/setup.sh --browser  # the web page's test needs Debian's chromium (quick once installed)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: model  # under 2 minutes on 2 cores: no multi-process swarms, network namespaces or browser
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow and not netns and not browser"

bench: model  # each writes scripts/results/NAME.json; then `make docs` (bench_balance.py needs root: see docs/benchmarks.md)
	$(PY) scripts/bench_local.py
	$(PY) scripts/bench_swarm.py
	$(PY) scripts/bench_wire.py
	$(PY) scripts/bench_api.py
	$(PY) scripts/bench_recovery.py
	$(PY) scripts/bench_finetune.py
	$(PY) scripts/bench_concurrency.py
	$(PY) scripts/bench_invariance.py
	$(PY) scripts/bench_interference.py
	$(PY) scripts/bench_quant.py --json scripts/results/quant.json

bench-paper: model  # root: emulated hosts (network namespaces), memory cgroups, dropped caches
	bash scripts/setup.sh --netlab
	$(PY) -m pip install --quiet -e '.[plot]'
	$(PY) scripts/bench_paper.py

docs:  # rewrite the benchmark tables of README.md and docs/ from scripts/results/*.json (docs_figures.py --check compares)
	$(or $(PYTHON),python3) scripts/docs_figures.py

clean:
	rm -rf $(VENV) build *.egg-info
