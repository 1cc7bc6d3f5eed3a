# The two commands: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test bench gpu-check clean

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

# On a CUDA machine, with this package's dependencies in $(PYTHON)'s environment (its CUDA torch, then
# `pip install -e '.[dev]'`): the CUDA-only tests (every fast path against the portable code) and the
# GPU throughput targets at the 360M configs, bf16, L 2048, micro-batch 8.
GPU_CONFIGS := attention baseconv baseconv_random baseconv_programmatic baseconv_learned
gpu-check:
	$(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA device visible to torch')"
	$(PYTHON) -m pytest -q tests/test_fast_paths.py
	$(PYTHON) -m bench.train_throughput --bf16 --seq-len 2048 --micro-batch 8 --warmup 3 --steps 10 \
	    $(foreach c,$(GPU_CONFIGS),--config configs/neox/$(c)_360m.yml) \
	    --out bench/results/train_throughput_gpu.json --md bench/results/train_throughput_gpu.md

clean:
	rm -rf runs data/demo
