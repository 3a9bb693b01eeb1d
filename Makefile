# fmc: `make sweep` and `make test` each set everything up first (once), then run.
PY ?= python3
UV_VERSION = 0.13.8
UV_SYNC_FLAGS ?=
# Debian packages the tests use: PostgreSQL (the deployment's store, run natively), docker-compose
# (validates docker-compose.yml), and for the engine test Docker's engine and mmdebstrap (the base
# images from Debian's packages: no image registry is reachable).
TEST_DEBS = postgresql docker-compose docker.io mmdebstrap
DATA = /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: setup sweep test test-deps test-fast test-engine data
setup: .venv/.fmc-ready

# The environment comes from uv.lock (exact versions); the dataset from Debian's package when apt-get
# is available, else fmc downloads it on first use into Keras' cache.
.venv/.fmc-ready: pyproject.toml uv.lock
	@if [ ! -f $(DATA) ] && command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist; fi
	$(PY) -m uv --version >/dev/null 2>&1 || $(PY) -m pip install -q uv==$(UV_VERSION)
	$(PY) -m uv sync --frozen $(UV_SYNC_FLAGS)
	touch $@

sweep: setup
	$(PY) -m uv run fmc sweep sweeps/quick.yaml

test: setup test-deps
	$(PY) -m uv run pytest

test-deps:
	@if ! { ls /usr/lib/postgresql/*/bin/initdb && command -v docker-compose && command -v dockerd \
	        && command -v mmdebstrap; } >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(TEST_DEBS); fi

test-fast: setup test-deps
	$(PY) -m uv run pytest -m "not slow"

# The stack on a real Docker engine (root), alone; `make test` runs it with the rest.
test-engine: setup test-deps
	$(PY) -m uv run pytest -m engine -n 0 tests/test_deploy_engine.py

data: setup
	$(PY) -m uv run fmc data
