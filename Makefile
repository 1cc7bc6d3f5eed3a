# The two commands: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test bench gpu-kit gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[dev,eval]'
	touch $(STAMP)

# Builds the demo corpus + tokenizer when missing, then trains on 2 CPU ranks.
demo: $(STAMP)
	$(PY) -m tokenization.demo_corpus --out data/demo
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m eval.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# CPU benchmarks (bench/run_all.py lists them); each writes bench/results/<name>.json with ratios against
# a peer measured in the same run; bench/results/SUMMARY.md collects the headline figures.
bench: $(STAMP)
	$(PY) -m bench.run_all

# The device kit (needs PyPI): wheels for a GPU machine with no network (Python 3.12, manylinux x86-64) in
# .gpu-kit/, with MANIFEST.json, resolved offline against scripts/gpu_device_packages.txt (scripts/gpu_kit.py).
gpu-kit: $(STAMP)
	$(PY) scripts/gpu_kit.py --out .gpu-kit

# On a CUDA machine: installs .gpu-kit (when present) into $(PYTHON), the interpreter holding its CUDA torch,
# then runs bench.gpu_check: the CUDA-only tests, every layer type in bf16 through the trainer, the 360M
# bf16 throughput targets with profiles, the memory plan against measured peaks, an MQAR slice.
# GPU_CHECK_ARGS=--smoke for the two-minute variant. Output: $$OUT, else bench/results/gpu.
gpu-check:
	PYTHON=$(PYTHON) scripts/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf runs data/demo
