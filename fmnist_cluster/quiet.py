"""Quiet imports of the deep-learning backend.

TensorFlow's C++ core writes log lines on import ("oneDNN custom operations are on", "Could not find
cuda drivers", "failed call to cuInit") before its own log level applies, straight to file
descriptor 2. Unless ``FMC_VERBOSE`` is set (``--verbose``), fmc imports Keras (and umap, which
imports TensorFlow) with that descriptor pointed at /dev/null, and sets ``TF_CPP_MIN_LOG_LEVEL=3``
for what TensorFlow logs later.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys


def verbose() -> bool:
    return bool(os.environ.get("FMC_VERBOSE"))


@contextlib.contextmanager
def _silenced_fd2():
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quiet_import(name: str = "keras"):
    """``import name`` (keras by default) without the backend's import-time log lines; returns the module."""
    if name in sys.modules or verbose():
        return importlib.import_module(name)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _silenced_fd2():
        return importlib.import_module(name)
