# The two commands: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Builds the demo corpus + tokenizer when missing, then trains on 2 CPU ranks.
demo: $(STAMP)
	$(PY) -m tokenization.demo_corpus --out data/demo
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m neox_zoology.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# CPU benchmarks (bench/run_all.py lists them); each writes bench/results/<name>.json with ratios against
# a peer measured in the same run; bench/results/SUMMARY.md collects the headline figures.
bench: $(STAMP)
	$(PY) -m bench.run_all

clean:
	rm -rf runs data/demo
