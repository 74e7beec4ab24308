"""The ``"cuda"`` backend: hand-written CUDA C++ kernels (``csrc/cuda``) behind ``torch.ops.hierkern.varlen_fwd``.

The kernels are built for word-length segments: a CTA owns consecutive query rows of one head, finds their
segments on the device (binary search over ``cu_seqlens``), stages the union of the rows' keys in shared memory and
runs each row's online softmax over that row's own keys only, so a 5-character word costs 5 keys per query,
not a masked tile; longer segments stream block by block. The backward is a dq pass over query tiles and a
dk/dv pass over key tiles: deterministic, no atomics, no scratch that grows with the number of segments;
the dq pass forms delta = rowsum(dout * out) in fp32 from the recomputed P and dout . v (``out`` is not read:
its rounding to half precision would swamp dS under a peaky softmax). float16, bfloat16 (fp32 accumulation)
and float32; head_dim 32, 64 or 128; sliding windows and causal (bottom-right), GQA, separate query/key
offsets, Philox dropout reproducible from ``rng_state``.

Where the kernels come from: ``hierkern._C`` when ``setup.py`` built it with a CUDA toolchain and a CUDA
build of torch; otherwise the first call that needs them runs :func:`load_jit`, which compiles ``csrc/cuda``
with ninja and adds its CUDA kernels to the loaded CPU extension (:mod:`hierkern.ops.toolchain`).

Priority: below ``"triton"``, so ``"auto"`` keeps choosing Triton on GPUs until benchmarks on a GPU show
these kernels faster for a class of calls (none has been measured yet); ``backend="cuda"`` runs them.
"""

from __future__ import annotations

import torch

from ..backends import Backend, Capabilities, VarlenArgs, register_backend
from . import cuda_flags, extension, toolchain

__all__ = ["CudaBackend", "SUPPORTED_HEAD_DIMS", "load_jit", "jit_build_flags"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (32, 64, 128)
_jit_error: str | None = None
_jit_loaded = False


def jit_build_flags(archs: str | None = None) -> list[str]:
    """nvcc flags of the CUDA kernels, the same as ``setup.py``'s (both come from
    :func:`hierkern.ops.cuda_flags.nvcc_flags`), for the SMs in ``archs`` (``HIERKERN_CUDA_ARCHS``, default
    ``"80;90a"``), e.g. ``["-O3", ..., "-gencode=arch=compute_80,code=sm_80", ...]``."""
    return cuda_flags.nvcc_flags(archs)


def load_jit(verbose: bool = False) -> None:
    """Compile ``csrc/cuda`` with ninja (``torch.utils.cpp_extension.load``) and register its CUDA kernels.

    For installs without compiled CUDA kernels, and run by the first call that ``"auto"`` or
    ``backend="cuda"`` sends here: the build adds ``TORCH_LIBRARY_IMPL(hierkern, CUDA)`` to the ops that the
    loaded extension declares. Takes minutes the first time (torch caches the build under
    ``TORCH_EXTENSIONS_DIR``). Does nothing when CUDA kernels are already registered.

    Args:
        verbose: print the build's commands and compiler output.

    Raises:
        RuntimeError: the extension the kernels extend is unavailable, the toolchain cannot build (the message
            says why), or the build failed.
    """
    global _jit_loaded
    reason = extension.ensure_loaded()
    if reason is not None:
        raise RuntimeError(f"the CUDA kernels extend hierkern's C++ extension, which is unavailable: {reason}")
    if _jit_loaded or extension.kernel_unavailable_reason("CUDA") is None:
        return
    toolchain.build_cuda_kernels(verbose)
    # extension.kernel_unavailable_reason was computed when the extension loaded, before this library
    # registered anything: ask the dispatcher itself whether the kernels arrived.
    missing = [
        op
        for op in ("varlen_fwd", "varlen_bwd")
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"hierkern::{op}", "CUDA")
    ]
    if missing:
        raise RuntimeError(
            f"the JIT build of csrc/cuda loaded but registered no CUDA kernel for "
            f"{', '.join('hierkern::' + op for op in missing)}"
        )
    _jit_loaded = True


def _kernels_unavailable() -> str | None:
    """Why there are no CUDA kernels and none can be compiled; ``None`` when they are there or buildable.
    Compiles nothing (``explain`` asks this): :func:`_prepare` builds."""
    if extension.load_error() is not None:
        return extension.load_error()
    if _jit_loaded or _jit_error is not None:
        return _jit_error
    if extension.loaded_from() is not None and extension.kernel_unavailable_reason("CUDA") is None:
        return None
    problem = toolchain.cuda_toolchain_problem()
    if problem is not None:
        return f"hierkern was installed without CUDA kernels, and they cannot be compiled here: {problem}"
    return None


@torch.compiler.assume_constant_result
def _prepare() -> str | None:
    global _jit_error
    if _jit_error is None:
        try:
            load_jit()
        except Exception as exc:  # a failed build leaves the backend unavailable, with the reason
            _jit_error = f"the JIT build of csrc/cuda failed ({type(exc).__name__}: {exc})"
    return _jit_error


# Runs once per trace under torch.compile (assume_constant_result), so a compiled graph calling
# backend="cuda" neither traces the dispatcher queries nor breaks on them.
@torch.compiler.assume_constant_result
def _unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return _kernels_unavailable()


class CudaBackend(Backend):
    """The CUDA C++ kernels as a backend."""

    name = "cuda"
    # Below "triton" (20) until GPU benchmarks say otherwise; above "reference" (0).
    priority = 15
    capabilities = Capabilities(
        devices=("cuda",), dtypes=SUPPORTED_DTYPES, head_dims=SUPPORTED_HEAD_DIMS, min_cuda_capability=(8, 0)
    )

    def unavailable_reason(self) -> str | None:
        return _unavailable_reason()

    def prepare(self) -> str | None:
        return _prepare()

    def __call__(self, args: VarlenArgs):
        return torch.ops.hierkern.varlen_fwd(*args.op_args())


register_backend(CudaBackend())
