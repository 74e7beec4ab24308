"""Options of ``pytest benchmarks`` (the parametrisation lives in ``harness.py``).

Options:
    --hk-size=small|default|large   workload size (``hierkern.bench.workloads.SIZES``; default: default).
    --hk-device=auto|cpu|cuda|all   devices to run; auto = the CPU suite, plus the CUDA suite when a GPU is
                                    visible (default: auto).

Unless given on the command line (or in PYTEST_ADDOPTS / addopts), pytest-benchmark runs each benchmark for
at most ``--benchmark-max-time=0.25`` s and at least ``--benchmark-min-rounds=3`` rounds here, so the whole
default CPU suite fits in a few minutes on a 2-core machine; pass those options to measure longer.
"""

from __future__ import annotations

import os
import shlex
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

BENCHMARK_DEFAULTS = {"benchmark_max_time": ("--benchmark-max-time", "0.25"),
                      "benchmark_min_rounds": ("--benchmark-min-rounds", 3)}


def pytest_addoption(parser):
    group = parser.getgroup("hierkern benchmarks")
    group.addoption("--hk-size", default="default", choices=("small", "default", "large"),
                    help="workload size: small (smoke test), default (CPU: ~4k words; CUDA: 64k words), "
                         "large (CPU: 16k words; CUDA: 256k words, ~1.2M characters)")
    group.addoption("--hk-device", default="auto", choices=("auto", "cpu", "cuda", "all"),
                    help="devices to benchmark; auto: cpu, plus cuda when available")


def _given(config, flag: str) -> bool:
    args = list(config.invocation_params.args)
    args += shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))
    args += config.getini("addopts")
    return any(a == flag or a.startswith(flag + "=") for a in args)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Runs before pytest-benchmark reads its options into the session.
    if not hasattr(config.option, "benchmark_max_time"):
        return
    from pytest_benchmark.utils import parse_seconds
    for dest, (flag, value) in BENCHMARK_DEFAULTS.items():
        if not _given(config, flag):
            setattr(config.option, dest, parse_seconds(value) if isinstance(value, str) else value)


@pytest.fixture
def skip_without_device():
    def check(device: str):
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("--hk-device asks for cuda but torch.cuda.is_available() is False")
    return check
