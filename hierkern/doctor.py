"""``python -m hierkern doctor``: what this installation can run, why each backend is (un)available, the
toolchain that compiles the kernels, and the versions, in one screen to paste into a bug report."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

import torch

from . import __version__
from .backends import _REGISTRY, Backend
from .ops import cuda_attention, extension, toolchain

__all__ = ["report", "build_parser", "main"]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _kernels_line() -> str:
    if extension.loaded_from() is not None:
        return f"loaded from {extension.loaded_from()}"
    if extension.load_error() is not None:
        return f"unavailable: {extension.load_error()}"
    return "not compiled yet: compiled on first use (`python -m hierkern doctor --build` does it now)"


def _backend_line(backend) -> str:
    reason = backend.unavailable_reason()
    if reason is not None:
        return f"unavailable: {reason}"
    # Only a backend with its own prepare() compiles anything (Backend.prepare does nothing).
    if type(backend).prepare is not Backend.prepare and extension.loaded_from() is None:
        return "available (its kernels compile on first use)"
    return "available"


def report() -> str:
    """The doctor's report. Compiles nothing: every check only looks."""
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    cxx = toolchain.cxx_compiler()
    cuda_problem = toolchain.cuda_toolchain_problem()
    if torch.cuda.is_available():
        gpu = ", ".join(
            f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
            for i in range(torch.cuda.device_count())
        )
    else:
        gpu = "none visible"
    rows = [
        ("versions", ""),
        ("  hierkern", __version__),
        ("  python", f"{platform.python_version()} ({sys.executable})"),
        (
            "  torch",
            f"{torch.__version__} (CUDA {torch.version.cuda})"
            if torch.version.cuda
            else f"{torch.__version__} (CPU-only build)",
        ),
        ("  triton", _version("triton")),
        ("  numpy", _version("numpy")),
        ("  platform", f"{platform.platform()}, {platform.machine()}"),
        ("compiled kernels", _kernels_line()),
        ("  sources", toolchain.CSRC),
        ("  JIT cache", toolchain.extension_cache_dir()),
        ("toolchain", ""),
        ("  C++ compiler", f"{cxx} ({toolchain.compiler_version(cxx)})" if cxx else "none found"),
        ("  ninja", "yes" if is_ninja_available() else "no (pip install ninja)"),
        (
            "  CPU kernels",
            "can be compiled here"
            if toolchain.cxx_problem() is None
            else f"cannot be compiled here: {toolchain.cxx_problem()}",
        ),
        ("  CUDA toolkit", CUDA_HOME or "none found"),
        (
            "  CUDA kernels",
            "can be compiled here" if cuda_problem is None else f"cannot be compiled here: {cuda_problem}",
        ),
        ("GPU", gpu),
        ("backends", '("auto" takes the first available one that accepts a call)'),
    ]
    for backend in sorted(_REGISTRY.values(), key=lambda b: -b.priority):
        rows.append((f"  {backend.name}", _backend_line(backend)))
    width = max(len(name) for name, _ in rows) + 2
    return "\n".join(f"{name:<{width}}{value}".rstrip() for name, value in rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hierkern doctor",
        description="Print the backends and why each is (un)available, the toolchain that compiles the kernels, "
        "and the versions. Exits 0 when the compiled CPU kernels can run (now or after their "
        "first-use build), 1 otherwise.",
    )
    parser.add_argument(
        "--build",
        action="store_true",
        help="compile the kernels that are compiled on first use now (the CPU kernels, and the "
        "CUDA kernels when a GPU is visible), then report (default: off, compile nothing)",
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.build:
        extension.ensure_loaded()
        if torch.cuda.is_available() and cuda_attention.CudaBackend().unavailable_reason() is None:
            cuda_attention.CudaBackend().prepare()
    print(report())
    return 0 if _REGISTRY["cpu"].unavailable_reason() is None else 1
