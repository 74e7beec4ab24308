"""The ``"cpu"`` backend: the fused C++ kernel (``csrc/cpu``) behind ``torch.ops.hierkern.varlen_fwd``.

One pass per (segment, kv-head) over packed tokens, spread over threads by cost; no padding, no score
tensor, fp32 accumulation (float64 for float64 inputs). Float32, float64, bfloat16 and float16; causal and
sliding windows (the op's window_left/window_right: FlashAttention's window_size, bottom-right), GQA/MQA, unequal
query/key segments. Dropout draws ``hierkern.philox``'s mask (``csrc/common/philox.h``, eight lanes at a time)
from ``rng_state``, so for the same state every backend drops the same attention weights.
"""

from __future__ import annotations

import torch

from ..backends import Backend, Capabilities, VarlenArgs, register_backend
from . import extension

__all__ = ["CpuBackend"]


# Runs once per trace under torch.compile: a compiled graph neither traces nor breaks on the first-use build.
@torch.compiler.assume_constant_result
def _prepare() -> str | None:
    return extension.ensure_loaded()


class CpuBackend(Backend):
    """The C++ CPU kernel as a backend."""

    name = "cpu"
    priority = 10
    capabilities = Capabilities(devices=("cpu",), dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))

    def unavailable_reason(self) -> str | None:
        return extension.kernel_unavailable_reason("CPU")

    def prepare(self) -> str | None:
        return _prepare()

    def __call__(self, args: VarlenArgs):
        return torch.ops.hierkern.varlen_fwd(*args.op_args())


register_backend(CpuBackend())
