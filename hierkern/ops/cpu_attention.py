"""The ``"cpu"`` backend: the fused C++ kernel (``csrc/cpu``) behind ``torch.ops.hierkern.varlen_fwd``.

One pass per (segment, kv-head) over packed tokens, spread over threads by cost; no padding, no score
tensor, fp32 accumulation (float64 for float64 inputs). Float32, float64, bfloat16 and float16; causal and
sliding windows (the op's window_left/window_right: FlashAttention's window_size, bottom-right), GQA/MQA, unequal
query/key segments. Dropout draws the CUDA kernels' Philox mask (``csrc/common/philox.h``) from an
``rng_state`` of ``[seed, offset]``, so for the same state both backends drop the same attention weights.
"""

from __future__ import annotations

import torch

from ..backends import AttentionCall, register_backend
from . import extension

__all__ = ["CpuBackend"]


# Runs once per trace under torch.compile: a compiled graph neither traces nor breaks on the first-use build.
@torch.compiler.assume_constant_result
def _prepare() -> str | None:
    return extension.ensure_loaded()


class CpuBackend:
    """Backend protocol of ``hierkern.backends`` for the C++ CPU kernel."""

    name = "cpu"
    priority = 10
    device_types = ("cpu",)

    def unavailable_reason(self) -> str | None:
        return extension.kernel_unavailable_reason("CPU")

    def prepare(self) -> str | None:
        return _prepare()

    def why_not(self, call: AttentionCall) -> str | None:
        if call.device_type != "cpu":
            return f"the CPU kernel runs on CPU tensors, and these are on {call.device_type}."
        return None

    def __call__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                 causal, dropout_p):
        return torch.ops.hierkern.varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                             softmax_scale, -1, 0 if causal else -1, dropout_p,
                                             extension.dropout_rng_state(dropout_p))


register_backend(CpuBackend())
