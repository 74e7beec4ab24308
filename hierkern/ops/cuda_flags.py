"""nvcc flags of the CUDA kernels in ``csrc/cuda``: the one definition that ``setup.py`` and the JIT build
(:func:`hierkern.ops.cuda_attention.load_jit`) both use.

Imports nothing but the standard library, so that ``setup.py`` can load this file by path before hierkern
(and possibly torch) is importable. The C++ standard is left to torch's extension builder, which adds the
one its headers need (C++20 for torch 2.14; a pinned ``-std=c++17`` breaks its ``ATen.h``).
"""

from __future__ import annotations

import os
import re

__all__ = ["DEFAULT_ARCHS", "nvcc_flags"]

DEFAULT_ARCHS = "80;90a"
_ARCH = re.compile(r"(\d+)([a-z]?)")


def _parse(archs: str) -> list[str]:
    parsed = [a.strip() for a in archs.split(";") if a.strip()]
    bad = [a for a in parsed if not _ARCH.fullmatch(a)]
    if not parsed or bad:
        raise ValueError(f"HIERKERN_CUDA_ARCHS must be a ';'-separated list of SM versions such as "
                         f"\"80;90a\", got {archs!r}")
    return parsed


def nvcc_flags(archs: str | None = None) -> list[str]:
    """nvcc flags of the CUDA kernels: SASS for every SM in ``archs``.

    Args:
        archs: ';'-separated SM versions (``"80;90a"``); ``None`` reads ``HIERKERN_CUDA_ARCHS``, default
            :data:`DEFAULT_ARCHS`.

    Returns:
        e.g. ``["-O3", "--use_fast_math", "-lineinfo", "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a"]``.

    Raises:
        ValueError: ``archs`` is empty or not a list of SM versions.
    """
    archs = os.environ.get("HIERKERN_CUDA_ARCHS", DEFAULT_ARCHS) if archs is None else archs
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in _parse(archs)]
    return ["-O3", "--use_fast_math", "-lineinfo"] + gencode
