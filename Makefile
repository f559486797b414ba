# `make demo`: set everything up and run the main job.  `make test`: set up and run the test suite.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup model demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

model: setup
	$(PY) -m swarm.engine.default_model

demo: model
	$(VENV)/bin/swarm generate --local "The capital of France is" --max-new-tokens 24

test: model
	$(PY) -m pytest -q

bench: model
	$(PY) scripts/bench_local.py

clean:
	rm -rf $(VENV) build *.egg-info
