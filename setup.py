"""Builds hierkern._C: the C++ CPU kernels always, the CUDA kernels when a CUDA toolchain and a CUDA build
of torch are both present.

Environment:
    HIERKERN_CUDA_ARCHS  semicolon-separated SM list for the CUDA kernels (default "80;90a").
    HIERKERN_NO_CUDA=1   build the C++ CPU kernels only, even where CUDA could be built (the CUDA kernels can
                         then be JIT-built: hierkern.ops.cuda_attention.load_jit).
    HIERKERN_NO_EXT=1    skip the extension (pure-Python install; the reference backend still works).
    MAX_JOBS             parallel compile jobs (torch's ninja build honours it).
"""

import glob
import importlib.util
import os

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_flags():
    """hierkern/ops/cuda_flags.py, loaded by path: importing hierkern would import torch-dependent modules
    of a package that is not installed yet."""
    spec = importlib.util.spec_from_file_location("_hierkern_cuda_flags",
                                                  os.path.join(ROOT, "hierkern", "ops", "cuda_flags.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    if os.environ.get("HIERKERN_NO_EXT") == "1":
        return [], {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    import torch

    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # No -std: torch's BuildExtension adds the standard its headers need (torch 2.14's ATen.h requires C++20).
    cxx_flags = ["-O3", "-fopenmp"]
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    with_cuda = os.environ.get("HIERKERN_NO_CUDA") != "1" and CUDA_HOME is not None and torch.version.cuda is not None
    if cuda_sources and with_cuda:
        ext = CUDAExtension("hierkern._C", sources + cuda_sources,
                            extra_compile_args={"cxx": cxx_flags, "nvcc": _cuda_flags().nvcc_flags()},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("hierkern._C", sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


class BuildPyWithCudaSources(build_py):
    """Ships csrc/cuda inside the package (hierkern/csrc/cuda) so that load_jit can compile the CUDA kernels
    where hierkern was installed without them. An editable install compiles the checkout's csrc/cuda."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        target = os.path.join(self.build_lib, "hierkern", "csrc", "cuda")
        self.mkpath(target)
        for source in _sources("csrc/cuda/*"):
            self.copy_file(os.path.join(ROOT, source), target)


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithCudaSources, **cmdclass})
