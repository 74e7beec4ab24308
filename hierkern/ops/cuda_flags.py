"""nvcc flags of the CUDA kernels in ``csrc/cuda``: the one definition that ``setup.py`` and the JIT build
(:func:`hierkern.ops.cuda_attention.load_jit`) both use.

Imports nothing but the standard library, so that ``setup.py`` can load this file by path before hierkern
(and possibly torch) is importable. The C++ standard is left to torch's extension builder, which adds the
one its headers need (C++20 for torch 2.14; a pinned ``-std=c++17`` breaks its ``ATen.h``).
"""

from __future__ import annotations

import os
import re

__all__ = ["DEFAULT_ARCHS", "nvcc_flags", "ptx_arch"]

DEFAULT_ARCHS = "80;90a"
_ARCH = re.compile(r"(\d+)([a-z]?)")


def _parse(archs: str) -> list[str]:
    parsed = [a.strip() for a in archs.split(";") if a.strip()]
    bad = [a for a in parsed if not _ARCH.fullmatch(a)]
    if not parsed or bad:
        raise ValueError(
            f"HIERKERN_CUDA_ARCHS must be a ';'-separated list of SM versions such as \"80;90a\", got {archs!r}"
        )
    return parsed


def ptx_arch(archs: str) -> str:
    """The virtual architecture whose PTX is embedded next to the SASS, e.g. ``"80"`` for ``"80;90a"``.

    The oldest SM in the list without its arch-specific suffix: a GPU newer than every listed SM (sm_100,
    sm_120, ...) has no SASS to run and JIT-compiles this PTX instead. ``compute_90a`` PTX would not do,
    since arch-specific PTX runs on that architecture only.
    """
    return str(min(int(_ARCH.fullmatch(a).group(1)) for a in _parse(archs)))


def nvcc_flags(archs: str | None = None) -> list[str]:
    """nvcc flags of the CUDA kernels: SASS for every SM in ``archs`` plus PTX for :func:`ptx_arch`.

    Args:
        archs: ';'-separated SM versions (``"80;90a"``); ``None`` reads ``HIERKERN_CUDA_ARCHS``, default
            :data:`DEFAULT_ARCHS`.

    Returns:
        e.g. ``["-O3", "--use_fast_math", "-lineinfo", "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=compute_80"]``.

    Raises:
        ValueError: ``archs`` is empty or not a list of SM versions.
    """
    archs = os.environ.get("HIERKERN_CUDA_ARCHS", DEFAULT_ARCHS) if archs is None else archs
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in _parse(archs)]
    # nvcc compiles each virtual architecture once: the PTX of an SM that also gets SASS costs nothing extra.
    ptx = ptx_arch(archs)
    gencode.append(f"-gencode=arch=compute_{ptx},code=compute_{ptx}")
    return ["-O3", "--use_fast_math", "-lineinfo"] + gencode
