"""Where the compiled kernels come from: the sources, the toolchain, and the just-in-time builds.

hierkern's C++ CPU kernels (``csrc/hierkern.cpp`` + ``csrc/cpu``) and CUDA kernels (``csrc/cuda``) reach a
process one of two ways:

* ahead of time: ``pip install --no-build-isolation .`` (or ``-e .``) with torch importable compiles them into
  ``hierkern._C`` at install time;
* just in time: an install without torch in the build environment (a plain ``pip install .``, whose build
  isolation hides the user's torch) ships the sources inside the package, and the first call that needs a
  kernel compiles them against the torch that is running (``torch.utils.cpp_extension.load``, ninja), once:
  the build is cached per torch version under ``TORCH_EXTENSIONS_DIR`` (default
  ``~/.cache/torch_extensions``). A JIT build matches the running torch by construction, which an
  ahead-of-time binary stops doing when torch is upgraded; a stale ``hierkern._C`` falls back to it.

Nothing here runs at import time except path lookups; the checks that look for compilers are cheap and
cached, and only :func:`build_cpu_kernels` / :func:`build_cuda_kernels` compile.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys

import torch

from . import cuda_flags

__all__ = [
    "CSRC",
    "cpu_sources",
    "cuda_sources",
    "cxx_problem",
    "cuda_toolchain_problem",
    "build_cpu_kernels",
    "build_cuda_kernels",
    "extension_cache_dir",
    "cxx_compiler",
    "compiler_version",
]

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Shipped in the package by setup.py (hierkern/csrc), or the checkout's for an editable install.
CSRC = next(
    (
        path
        for path in (os.path.join(_PACKAGE, "csrc"), os.path.join(os.path.dirname(_PACKAGE), "csrc"))
        if os.path.isfile(os.path.join(path, "hierkern.cpp"))
    ),
    os.path.join(_PACKAGE, "csrc"),
)
CXX_FLAGS = ["-O3", "-fopenmp"]
LD_FLAGS = ["-fopenmp"]


def _listing(folder: str, suffixes: tuple[str, ...]) -> list[str]:
    path = os.path.join(CSRC, folder)
    if not os.path.isdir(path):
        return []
    return sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(suffixes))


def cpu_sources() -> list[str]:
    """The translation units of the CPU extension: the op schemas plus ``csrc/cpu``; empty if not shipped."""
    schema = os.path.join(CSRC, "hierkern.cpp")
    return ([schema] + _listing("cpu", (".cpp",))) if os.path.isfile(schema) else []


def cuda_sources() -> list[str]:
    """The translation units of the CUDA kernels (``csrc/cuda``: the ``.cu`` files and the binding)."""
    return _listing("cuda", (".cu", ".cpp"))


def _torch_tag() -> str:
    """The running torch, as a name component: a JIT build is only valid for the torch it was built against."""
    return re.sub(r"[^0-9A-Za-z]+", "_", torch.__version__)


def extension_cache_dir() -> str:
    """Where torch's JIT builds (and so hierkern's) are cached: ``TORCH_EXTENSIONS_DIR``, or torch's default root
    (which torch subdivides per Python and CUDA version). Creates nothing."""
    from torch.utils.cpp_extension import get_default_build_root

    return os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()


@functools.cache
def cxx_compiler() -> str | None:
    """The C++ compiler torch's builds use (``$CXX`` or ``c++``), as a path, or ``None`` if absent."""
    return shutil.which(os.environ.get("CXX", "c++"))


@functools.cache
def cxx_problem() -> str | None:
    """Why the CPU kernels cannot be compiled here, in one sentence, or ``None`` if they can."""
    from torch.utils.cpp_extension import is_ninja_available

    if os.environ.get("HIERKERN_NO_JIT") == "1":
        return "HIERKERN_NO_JIT=1 forbids compiling kernels on first use"
    if not cpu_sources():
        return (
            f"the C++ sources are not at {CSRC} (a package built without them): reinstall hierkern with "
            f"`pip install hierkern` from a source distribution or a checkout"
        )
    if cxx_compiler() is None:
        return (
            f"no C++ compiler ({os.environ.get('CXX', 'c++')!r} is not on PATH): install one (e.g. "
            f"`apt install g++`), and hierkern compiles its kernels on first use"
        )
    if not is_ninja_available():
        return "ninja is not installed: `pip install ninja`, and hierkern compiles its kernels on first use"
    return None


@functools.cache
def cuda_toolchain_problem() -> str | None:
    """Why the CUDA kernels cannot be compiled here, in one sentence, or ``None`` if they can.

    Checked before any compiler runs, so that a toolchain without headers (an ``nvcc`` wrapper, a CUDA runtime
    without the developer files) is a one-line reason instead of a failed build.
    """
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    if not cuda_sources():
        return f"the CUDA sources are not at {os.path.join(CSRC, 'cuda')}: reinstall hierkern from source"
    if CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    if not os.path.isfile(nvcc):
        return f"CUDA_HOME={CUDA_HOME} has no bin/nvcc"
    if not os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        return (
            f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime.h (a CUDA toolkit without its headers): "
            f"install the CUDA developer files or point CUDA_HOME at a full toolkit"
        )
    return cxx_problem()


def _announce(name: str, what: str) -> None:
    """One line before minutes of silence, so the user knows why the first call is slow; nothing on a cache hit
    (torch's ``load`` then only checks the sources' hash and loads the library)."""
    from torch.utils.cpp_extension import _get_build_directory

    if not os.path.isfile(os.path.join(_get_build_directory(name, verbose=False), f"{name}.so")):
        print(
            f"hierkern: compiling {what} for torch {torch.__version__} (first use only; cached in "
            f"{extension_cache_dir()})",
            file=sys.stderr,
            flush=True,
        )


def build_cpu_kernels(verbose: bool = False) -> None:
    """Compile and load the CPU extension (the op schemas and the CPU kernels) just in time.

    Raises:
        RuntimeError: the toolchain is missing (the message says what to install) or the build failed.
    """
    problem = cxx_problem()
    if problem is not None:
        raise RuntimeError(problem)
    from torch.utils.cpp_extension import load

    name = f"hierkern_cpu_{_torch_tag()}"
    _announce(name, "the C++ CPU kernels")
    load(
        name=name,
        sources=cpu_sources(),
        extra_cflags=CXX_FLAGS,
        extra_ldflags=LD_FLAGS,
        is_python_module=False,
        verbose=verbose,
    )


def build_cuda_kernels(verbose: bool = False) -> None:
    """Compile and load the CUDA kernels just in time; they register with the ops the CPU extension declares.

    Raises:
        RuntimeError: the CUDA toolchain cannot build (the message says why) or the build failed.
    """
    problem = cuda_toolchain_problem()
    if problem is not None:
        raise RuntimeError(problem)
    from torch.utils.cpp_extension import load

    name = f"hierkern_cuda_{_torch_tag()}"
    _announce(name, "the CUDA kernels")
    load(
        name=name,
        sources=cuda_sources(),
        extra_cflags=["-O3"],
        extra_cuda_cflags=cuda_flags.nvcc_flags(),
        extra_include_paths=[os.path.join(CSRC, "cuda")],
        is_python_module=False,
        verbose=verbose,
    )


def compiler_version(path: str | None) -> str | None:
    """First line of ``path --version``, for reports."""
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None
