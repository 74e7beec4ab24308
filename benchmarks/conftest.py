"""Options of ``pytest benchmarks`` (the parametrisation lives in ``harness.py``).

Options:
    --hk-size=small|default|large   workload size (``hierkern.bench.workloads.SIZES``; default: default).
    --hk-device=auto|cpu|cuda|all   devices to run; auto = the CPU suite, plus the CUDA suite when a GPU is
                                    visible (default: auto).

Unless given on the command line (or in PYTEST_ADDOPTS / addopts), pytest-benchmark runs each benchmark for
at most ``--benchmark-max-time=0.25`` s and at least ``--benchmark-min-rounds=5`` rounds here: fast calls get
as many rounds as fit in 0.25 s, slow ones (the padded baselines, the seed model: up to seconds a call) five,
enough for a median and an interquartile range on a shared machine. The whole default CPU suite fits in a few
minutes on a 2-core machine; pass those options to measure longer.

The JSON (``--benchmark-json``) gets, on every entry, ``impl``, ``family``, ``floor_bytes`` and the copy
bandwidth measured on the entry's device at the end of the run (``harness.complete_entries``), and a top-level
``hierkern`` object with the bandwidths, the baselines that failed on their input, torch's version and the
thread count.
"""

from __future__ import annotations

import os
import shlex
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

BENCHMARK_DEFAULTS = {
    "benchmark_max_time": ("--benchmark-max-time", "0.25"),
    "benchmark_min_rounds": ("--benchmark-min-rounds", 5),
}


def pytest_addoption(parser):
    group = parser.getgroup("hierkern benchmarks")
    group.addoption(
        "--hk-size",
        default="default",
        choices=("small", "default", "large"),
        help="workload size: small (smoke test), default (CPU: ~4k words; CUDA: 64k words), "
        "large (CPU: 16k words; CUDA: 256k words, ~1.2M characters)",
    )
    group.addoption(
        "--hk-device",
        default="auto",
        choices=("auto", "cpu", "cuda", "all"),
        help="devices to benchmark; auto: cpu, plus cuda when available",
    )


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


def pytest_benchmark_update_json(config, benchmarks, output_json):
    import harness

    harness.complete_entries(output_json["benchmarks"])
    bandwidth = {
        str(b["extra_info"]["device"]): {k: b["extra_info"][k] for k in ("copy_bandwidth_Bps", "copy_bandwidth_method")}
        for b in output_json["benchmarks"]
    }
    info = {
        "copy_bandwidth": bandwidth,
        "failed": list(harness.FAILED),
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["cuda_device_name"] = torch.cuda.get_device_name()
    output_json["hierkern"] = info


@pytest.fixture
def skip_without_device():
    def check(device: str):
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("--hk-device asks for cuda but torch.cuda.is_available() is False")

    return check
