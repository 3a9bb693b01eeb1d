# fmc: `make sweep` and `make test` each set everything up first (once), then run.
PY ?= python3
UV_VERSION = 0.13.8
DATA = /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: setup sweep test test-fast data
setup: .venv/.fmc-ready

# The environment comes from uv.lock (exact versions); the dataset from Debian's package when apt-get
# is available, else fmc downloads it on first use into Keras' cache.
.venv/.fmc-ready: pyproject.toml uv.lock
	@if [ ! -f $(DATA) ] && command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist; fi
	$(PY) -m uv --version >/dev/null 2>&1 || $(PY) -m pip install -q uv==$(UV_VERSION)
	$(PY) -m uv sync --frozen
	touch $@

sweep: setup
	$(PY) -m uv run fmc sweep sweeps/quick.yaml

test: setup
	$(PY) -m uv run pytest

test-fast: setup
	$(PY) -m uv run pytest -m "not slow" --deselect tests/test_sweep_tracking.py

data: setup
	$(PY) -m uv run fmc data
