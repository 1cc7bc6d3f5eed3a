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

# CPU benchmarks; each prints JSON with ratios against a peer measured in the same run.
bench: $(STAMP)
	mkdir -p bench/results
	$(PY) -m bench.trainer_overhead --out bench/results/trainer_overhead.json
	$(PY) -m bench.mixers --seq-len 2048 --out bench/results/mixers_2048.json --md bench/results/mixers_2048.md
	$(PY) -m bench.sparse --seq-len 2048 8192 --out bench/results/sparse.json --md bench/results/sparse.md
	$(PY) -m bench.ar_eval --out bench/results/ar_eval.json
	$(PY) -m bench.preprocess --mb 24 --rounds 2 --out bench/results/preprocess.json --md bench/results/preprocess.md
	$(PY) -m bench.bigrams --out bench/results/bigrams.json --md bench/results/bigrams.md

clean:
	rm -rf runs data/demo
