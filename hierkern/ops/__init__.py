"""Compiled attention backends, one module per kernel family.

Importing a backend module registers it with ``hierkern.backends``; a module whose toolchain or extension
is missing registers an unavailable backend that says why, so importing never fails.
"""

from . import (
    cpu_attention,  # noqa: F401
    cuda_attention,  # noqa: F401
    triton_attention,  # noqa: F401
)
