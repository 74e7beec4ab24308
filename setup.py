"""Builds hierkern: the Python package with the kernels' C++/CUDA sources inside it, and, when torch is importable
at build time, ``hierkern._C`` compiled ahead of time (the C++ CPU kernels always, the CUDA kernels when a CUDA
build of torch and a complete CUDA toolkit are both present).

A plain ``pip install .`` builds in an isolated environment without torch (pyproject.toml does not ask for one:
fetching a second torch, several GB for the CUDA build, to compile against a version the user may not run is
what this avoids). That wheel is pure Python, and the kernels compile against the user's torch on first use
(``hierkern/ops/toolchain.py``). ``pip install --no-build-isolation .`` with torch installed compiles them now.

Environment:
    HIERKERN_CUDA_ARCHS  semicolon-separated SM list for the CUDA kernels (default "80;90a").
    HIERKERN_NO_CUDA=1   compile the C++ CPU kernels only, even where CUDA could be built (the CUDA kernels are
                         then compiled on first use on a CUDA machine).
    HIERKERN_NO_EXT=1    compile nothing at install time (the kernels are compiled on first use).
    MAX_JOBS             parallel compile jobs (torch's ninja build honours it).
"""

import glob
import importlib.util
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_flags():
    """hierkern/ops/cuda_flags.py, loaded by path: importing hierkern would import torch-dependent modules
    of a package that is not installed yet."""
    spec = importlib.util.spec_from_file_location(
        "_hierkern_cuda_flags", os.path.join(ROOT, "hierkern", "ops", "cuda_flags.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _say(message: str) -> None:
    # pip shows a build's output only with -v or on failure; stderr reaches the log either way.
    print(f"hierkern: {message}", file=sys.stderr, flush=True)


def _extensions():
    if os.environ.get("HIERKERN_NO_EXT") == "1":
        _say("HIERKERN_NO_EXT=1: no compiled extension; the kernels compile on first use")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _say(
            "torch is not importable at build time (pip's build isolation): building the pure-Python package; "
            "the kernels compile on first use (pip install --no-build-isolation . compiles them now)"
        )
        return [], {}

    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # No -std: torch's BuildExtension adds the standard its headers need (torch 2.14's ATen.h requires C++20).
    cxx_flags = ["-O3", "-fopenmp"]
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    cuda_problem = _cuda_problem(torch, CUDA_HOME)
    if cuda_problem is None:
        ext = CUDAExtension(
            "hierkern._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": _cuda_flags().nvcc_flags()},
            extra_link_args=["-fopenmp"],
        )
    else:
        _say(f"compiling the C++ CPU kernels only: {cuda_problem}")
        ext = CppExtension("hierkern._C", sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _cuda_problem(torch, cuda_home):
    """Why the CUDA kernels are not compiled now, in one line, or None. Checked before any compiler runs: an
    nvcc wrapper without the toolkit's headers would otherwise fail deep in the build."""
    if os.environ.get("HIERKERN_NO_CUDA") == "1":
        return "HIERKERN_NO_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if cuda_home is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    for needed in ("bin/nvcc", "include/cuda_runtime.h"):
        if not os.path.isfile(os.path.join(cuda_home, needed)):
            return f"CUDA_HOME={cuda_home} has no {needed}"
    return None


class BuildPyWithSources(build_py):
    """Ships csrc inside the package (hierkern/csrc) so that the kernels can be compiled on first use where they
    were not compiled at install time. An editable install compiles the checkout's csrc."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        for folder in ("csrc/*", "csrc/common/*", "csrc/cpu/*", "csrc/cuda/*"):
            for source in _sources(folder):
                if os.path.isfile(source):
                    target = os.path.join(self.build_lib, "hierkern", os.path.dirname(source))
                    self.mkpath(target)
                    self.copy_file(os.path.join(ROOT, source), target)


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
