# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Set-up is idempotent: .venv/.installed is rebuilt only when pyproject.toml or constraints.txt changes.
# constraints.txt holds the versions installed: a fresh resolve of the ranges alone is too deep for pip.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
AXOLOTL_VENV := .venv-axolotl
UNSLOTH_VENV := .venv-unsloth
# llama-cpp-python has no binary wheel on PyPI: set-up compiles it once per version and flags into the cache
# (pip's own wheel cache would hand back a wheel built with other flags). Runtime CPU dispatch: one kernel
# library per x86 feature level, and chat/llama_runtime.py loads the best one this CPU runs. Of llama.cpp's
# 14 x86 levels five are built (x64, haswell = AVX2, skylakex = AVX-512, icelake = + VNNI, zen4 = + BF16: every
# CPU runs one of them, AVX-512 machines at full speed) to keep the compile short; the sapphirerapids one, the
# only one with AMX kernels, is never built: they segfault on AMX Xeons for batches > 1 token (llama.cpp#20824).
# The native build (-march=native) is not used: it would take the AMX path on those Xeons.
LLAMA_CPP_PYTHON := 0.3.36
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DCMAKE_INSTALL_BINDIR=llama_cpp/lib
export FORCE_CMAKE := 1
LLAMA_SKIPPED_VARIANTS := sse42|sandybridge|ivybridge|piledriver|cannonlake|cascadelake|cooperlake|alderlake|sapphirerapids
TUNEBOOK_CACHE ?= $(HOME)/.cache/tunebook
LLAMA_WHEELS := $(TUNEBOOK_CACHE)/wheels/llama-cpp-python-$(LLAMA_CPP_PYTHON)-$(shell printf '%s %s' '$(CMAKE_ARGS)' '$(LLAMA_SKIPPED_VARIANTS)' | sha1sum | cut -c1-12)
LLAMA_AMX_VARIANT := libggml-cpu-sapphirerapids.so

.PHONY: demo test setup clean-venv

# The quickstart end to end (a rerun skips what is finished), then the command that opens its chat.
demo: $(STAMP)
	$(BIN)/tunebook train recipes/quickstart.yaml
	@echo
	@echo "report: runs/quickstart/report.md"
	@echo "open the chat on the trained model:"
	@echo "  $(BIN)/tunebook chat runs/quickstart"

# The tests of backend: axolotl run axolotl in its own environment: `make test` makes it (~2 min, ~4.3 GB).
# lint-imports first: the import contracts of pyproject.toml ([tool.importlinter]) keep the layers.
test: $(STAMP) browser $(AXOLOTL_VENV)/.installed
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(PYTEST_ARGS)

setup: $(STAMP)

# The benchmarks of bench/README.md, one after the other (15-30 min on an idle 2-core machine); they read the
# quickstart run, so `make demo` first. Each writes bench/results/<name>.json and prints its table.
BENCHES := train_throughput packing eval_throughput gguf_inference export
.PHONY: bench
bench: $(STAMP)
	@test -f runs/quickstart/quickstart-q8_0.gguf || { echo "run \`make demo\` first: the benchmarks use runs/quickstart"; exit 2; }
	for b in $(BENCHES); do $(BIN)/python -m bench.$$b || exit 1; done

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, from its CPU wheel, so nothing later pulls a multi-GB CUDA build.
# Elsewhere: TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" make setup
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet "torch==2.13.0" $(TORCH_PIP_ARGS)
	$(MAKE) --no-print-directory llama-wheel
	$(BIN)/pip install --quiet --force-reinstall --no-deps $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl
	$(BIN)/pip install --quiet -e ".[test]" -c constraints.txt
	rm -f "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')/llama_cpp/lib/$(LLAMA_AMX_VARIANT)"
	touch $(STAMP)

# The llama-cpp-python wheel for these CMAKE_ARGS and CPU levels (compiled once, then from the cache).
.PHONY: llama-wheel
llama-wheel: | $(BIN)/python
	@ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl >/dev/null 2>&1 || { \
	  echo "compiling llama-cpp-python $(LLAMA_CPP_PYTHON) with CMAKE_ARGS=$(CMAKE_ARGS) (once)"; \
	  rm -rf $(LLAMA_WHEELS).partial $(LLAMA_WHEELS) $(LLAMA_WHEELS).src; \
	  $(BIN)/pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$(LLAMA_CPP_PYTHON)" -d $(LLAMA_WHEELS).src \
	  && tar -xzf $(LLAMA_WHEELS).src/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_WHEELS).src \
	  && sed -i -E '/ggml_add_cpu_backend_variant\(($(LLAMA_SKIPPED_VARIANTS))[ )]/d' \
	       $(LLAMA_WHEELS).src/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/ggml/src/CMakeLists.txt \
	  && $(BIN)/pip wheel --quiet --no-cache-dir --no-deps $(LLAMA_WHEELS).src/llama_cpp_python-$(LLAMA_CPP_PYTHON) \
	       -w $(LLAMA_WHEELS).partial \
	  && mv $(LLAMA_WHEELS).partial $(LLAMA_WHEELS) && rm -rf $(LLAMA_WHEELS).src; }

# Debian's chromium for the browser tests (never `playwright install`).
.PHONY: browser
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

clean-venv:
	rm -rf $(VENV)

# Optional training backends, each in its own environment (their pins clash with the main set).
# A stamp is rebuilt when its requirements file changes. torch 2.13.0 goes in first, from the index
# TORCH_PIP_ARGS names (as for .venv), so the backend's own requirements never swap it for another build.
.PHONY: env-axolotl env-unsloth
env-axolotl: $(AXOLOTL_VENV)/.installed
env-unsloth: $(UNSLOTH_VENV)/.installed

$(AXOLOTL_VENV)/.installed: runner/train/requirements-axolotl.txt
	$(PY) -m venv $(AXOLOTL_VENV)
	$(AXOLOTL_VENV)/bin/pip install --quiet --upgrade pip
	$(AXOLOTL_VENV)/bin/pip install --quiet "torch==2.13.0" $(TORCH_PIP_ARGS)
	$(AXOLOTL_VENV)/bin/pip install --quiet -r $< $(TORCH_PIP_ARGS)
	touch $@

$(UNSLOTH_VENV)/.installed: runner/train/requirements-unsloth.txt
	$(PY) -m venv $(UNSLOTH_VENV)
	$(UNSLOTH_VENV)/bin/pip install --quiet --upgrade pip
	$(UNSLOTH_VENV)/bin/pip install --quiet "torch==2.13.0" $(TORCH_PIP_ARGS)
	$(UNSLOTH_VENV)/bin/pip install --quiet -r $< $(TORCH_PIP_ARGS)
	# PyPI's torchvision is built for CUDA torch: its operators fail to load on the CPU wheel and
	# `import unsloth` refuses it. Nothing here needs torchvision.
	$(UNSLOTH_VENV)/bin/pip uninstall --quiet -y torchvision || true
	touch $@
