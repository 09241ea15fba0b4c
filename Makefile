# Efficiency Workbench: `make lab` opens the workbench, `make test` runs every test. Both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PORT ?= 8888
# The JupyterLab / Voila token: a new random one each start (printed in the URL) unless given as `make lab
# TOKEN=...` (or $WORKBENCH_TOKEN). Only from the command line: a TOKEN in the environment is often another
# service's secret, and it would be printed in the URL.
LAB_TOKEN = $(if $(filter command line,$(origin TOKEN)),--token $(TOKEN))
# The prepared demo model (a safetensors copy of the embedded GGUF) and cached base-model outputs live here.
export WORKBENCH_HOME ?= $(CURDIR)/.cache/workbench-home
# torch first, pinned to the CPU build this machine serves from disk; a looser requirement would pull CUDA wheels.
TORCH_VERSION ?= 2.13.0
# llama-cpp-python builds llama.cpp from source; a fixed version keeps runtime numbers comparable.
LLAMA_CPP_VERSION ?= 0.3.36

.PHONY: lab dashboard test test-fast setup setup-test demo browser bench lint clean llama-cpp

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Install torch only when the environment has none (a GPU user's own torch is kept), then the package with
# a constraint that pins whatever torch is present so pip never swaps it.
$(VENV)/.installed: $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)
	@$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-pin.txt
	$(PIP) install -q -c $(VENV)/torch-pin.txt -e '.[quant,dashboard,deploy]'
	@$(MAKE) --no-print-directory llama-cpp
	@touch $@

# llama.cpp, the CPU runtime variants are exported to (GGUF), through llama-cpp-python: PyPI has only its source,
# so pip builds llama.cpp with cmake once (several minutes on 2 cores) and keeps the wheel in its cache.
# The multimodal library is not needed and not built. AMX tiles are left out: they need the kernel to grant them,
# and where it does not (some VMs and sandboxes) every quantized model crashes; AVX-512/AVX2 kernels run anywhere.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF '-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \
	'-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'
llama-cpp: $(PY)
	@if ! $(PY) -c "import llama_cpp" 2>/dev/null; then \
	  echo "Building llama.cpp (llama-cpp-python) from source: several minutes, once; pip keeps the wheel."; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $$CMAKE_ARGS" $(PIP) install -c $(VENV)/torch-pin.txt \
	    --progress-bar off 'llama-cpp-python==$(LLAMA_CPP_VERSION)' 2>&1 | grep -E --line-buffered "Building|Successfully|ERROR|error:" || true; \
	  $(PY) -c "import llama_cpp" || { echo "llama-cpp-python did not install: GGUF runs in llama.cpp will say so."; exit 1; }; \
	fi

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -c $(VENV)/torch-pin.txt -e '.[quant,dashboard,deploy,test,postgres]'
	@touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

demo: setup
	$(PY) -m workbench.cli prepare-demo

lab: demo
	$(PY) -m workbench.cli lab --port $(PORT) $(LAB_TOKEN)

dashboard: demo
	$(PY) -m workbench.cli lab --dashboard --port $(PORT) $(LAB_TOKEN)

# Debian's Chromium for the browser test (Playwright cannot download its own browser here).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "Chromium missing: install Debian's 'chromium' package for the browser test."; fi; \
	fi

# pytest's exit code 5 means it collected no test: that is a failure too, said plainly. Lint runs first.
test: setup-test demo browser lint
	@$(PY) -m pytest -q --timeout=900 $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc = 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

test-fast: setup-test
	$(PY) -m pytest -q -m "not slow and not browser" $(PYTEST_ARGS)

bench: setup-test demo
	$(PY) bench/eval_throughput.py
	$(PY) bench/quant_quality.py
	$(PY) bench/registry_scale.py
	$(PY) bench/ui_refresh.py
	$(PY) bench/sweep.py

# ruff comes with the test extras; the code is kept in `ruff format` style.
LINTED := workbench widgets tests bench
lint: setup-test
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
