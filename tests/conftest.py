import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton suites run the kernels in Triton's interpreter. triton.jit reads the variable when
# hierkern's kernels are decorated (at import), so it is set here, before any test imports hierkern.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
