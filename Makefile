# Foredeck — `make help` lists the targets.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# uv comes from PyPI; `make setup` installs it when it is missing.
UV ?= $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
RUN := $(UV) run --frozen --all-packages
PY_PATHS := libs/kit libs/client libs/stack libs/testing libs/embeddings $(wildcard services/*/) tests scripts bench deploy/docker
PYTEST_ARGS ?=

.PHONY: help
help: ## List the targets.
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: setup
setup: ## Install uv if missing and sync every package of the workspace (one lock file).
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen --all-packages
	@bash services/toolrunner/scripts/install-bubblewrap.sh

.PHONY: proto
proto: setup ## Regenerate libs/contracts from proto/.
	$(RUN) buf format -w proto --path proto/foredeck
	$(RUN) python scripts/gen_protos.py

.PHONY: check-gen
check-gen: setup ## Fail when the committed generated code is stale.
	$(RUN) python scripts/gen_protos.py --check

.PHONY: lint
lint: setup ## ruff (check + format), buf lint and buf format (our protos, not vendored google/).
	$(RUN) ruff check $(PY_PATHS)
	$(RUN) ruff format --check $(PY_PATHS)
	$(RUN) buf lint proto
	$(RUN) buf format -d --exit-code proto --path proto/foredeck

.PHONY: breaking
breaking: setup ## buf breaking against the latest release tag (none before v0.1.0).
	RUN="$(RUN)" scripts/buf_breaking.sh

.PHONY: protoc-deps
protoc-deps: ## Install Debian's protoc and protobuf headers when missing (as root; else say what).
	scripts/ensure_protoc.sh

.PHONY: check-stubs
check-stubs: protoc-deps ## Generate C++ from every proto under proto/ and compile it with g++.
	scripts/check_stubs.sh

.PHONY: typecheck
typecheck: setup ## mypy --strict over libraries, services, tests and the generated stubs.
	$(RUN) mypy $(PY_PATHS)
	cd libs/contracts/src && $(RUN) mypy --config-file ../pyproject.toml foredeck

.PHONY: test-only
test-only: setup ## Run the test suites only (PYTEST_ARGS=... to narrow).
	$(RUN) pytest $(PYTEST_ARGS)

.PHONY: check-deploy
check-deploy: setup ## Images, compose, every Kubernetes overlay and the telemetry of the services, offline.
	$(RUN) pytest tests/deploy -q

.PHONY: test
test: setup lint typecheck check-gen breaking check-stubs test-only ## Everything CI runs: lint, types, generated code, buf checks, C++ stubs, all tests.

.PHONY: run
run: setup ## Start the whole platform locally on embedded defaults (Ctrl-C stops it).
	$(RUN) foredeck up

.PHONY: bench
# Outside the repository, so linters and type checks never walk into it.
LITELLM_VENV ?= $(HOME)/.cache/foredeck-bench/litellm-venv
MEM0_VENV ?= $(HOME)/.cache/foredeck-bench/mem0-venv
LANGGRAPH_VENV ?= $(HOME)/.cache/foredeck-bench/langgraph-venv

bench: setup ## Run the benchmarks; each prints its figures and the ratio to its baseline.
	@# The LiteLLM proxy (peer of the llmrouter) lives in its own environment, never in the lock.
	test -x $(LITELLM_VENV)/bin/litellm || ($(UV) venv -q --python 3.11 $(LITELLM_VENV) \
		&& $(UV) pip install -q --python $(LITELLM_VENV)/bin/python 'litellm[proxy]')
	@# mem0 (peer of the memory service) likewise.
	test -x $(MEM0_VENV)/bin/python || ($(UV) venv -q --python 3.11 $(MEM0_VENV) \
		&& $(UV) pip install -q --python $(MEM0_VENV)/bin/python mem0ai faiss-cpu)
	@# LangGraph with its SQLite checkpointer (peer of the orchestrator) likewise.
	test -x $(LANGGRAPH_VENV)/bin/python || ($(UV) venv -q --python 3.11 $(LANGGRAPH_VENV) \
		&& $(UV) pip install -q --python $(LANGGRAPH_VENV)/bin/python langgraph langgraph-checkpoint-sqlite grpcio)
	LITELLM_VENV=$(LITELLM_VENV) MEM0_PYTHON=$(MEM0_VENV)/bin/python \
		LANGGRAPH_PYTHON=$(LANGGRAPH_VENV)/bin/python $(RUN) python -m bench

.PHONY: clean
clean: ## Remove caches, build output and the local stack's data directory.
	rm -rf .foredeck .mypy_cache .ruff_cache .pytest_cache dist build
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
