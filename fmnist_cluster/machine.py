"""The machine a training runs on, as far as it changes the training: the same code and seed train
differently on CPUs whose vector instructions differ (docs/results.md, section 9), so every run
records its CPU and a training carried across machines records which epochs each one trained."""

from __future__ import annotations

import functools
import itertools
import platform
from pathlib import Path


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ({} where there is none), read once per process."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU a trial runs on ('AMD EPYC', 'Intel(R) Xeon(R) Platinum 8370C CPU @ 2.80GHz'): the same
    code and seed train differently on different CPU kinds, so every run records its own."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_id() -> str:
    """The CPU's family, model and stepping and its widest vector instructions ('family 26 model 2
    stepping 1, avx512'): virtual machines often name every AMD CPU 'AMD EPYC', and two generations
    under that name train the same code and seed differently (docs/results.md, section 9)."""
    info = _cpuinfo()
    if not info:
        return platform.machine() or "unknown"
    flags = set(info.get("flags", "").split())
    vector = next((name for name in ("avx512f", "avx2", "avx", "sse4_2") if name in flags), "none").removesuffix("f")
    return (f"family {info.get('cpu family', '?')} model {info.get('model', '?')} "
            f"stepping {info.get('stepping', '?')}, {vector}")


def epoch_spans(cpus: list[str]) -> str:
    """Which epochs each CPU trained, from the CPU of every epoch in order: '1-26 family 23 model 1
    stepping 2, avx2; 27-100 family 26 model 2 stepping 1, avx512' (one span when one CPU trained all)."""
    spans, epoch = [], 1
    for cpu, run in itertools.groupby(cpus):
        n = len(list(run))
        spans.append(f"{epoch}-{epoch + n - 1} {cpu}" if n > 1 else f"{epoch} {cpu}")
        epoch += n
    return "; ".join(spans)
