"""Fakes and autograd for a compiled backend's pair of varlen ops, written once.

Every compiled backend exposes two ops with one argument list (``csrc/hierkern.cpp`` declares it for the C++
and CUDA kernels; the Triton ops repeat it):

* ``fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
  window_right, dropout_p, rng_state) -> (out, lse)``
* ``bwd(dout, q, k, v, out, lse, <the forward's arguments from cu_seqlens_q on>) -> (dq, dk, dv)``

:func:`register_varlen_ops` gives such a pair what ``torch.compile``, ``opcheck`` and autograd need: fake
kernels (shapes only), autograd on the forward whose backward is the backward op (itself traceable, so
compiled backward graphs call the fused kernel too), and on the backward one that refuses a second
differentiation in words instead of autograd's silent zeros.
"""

from __future__ import annotations

import torch

__all__ = ["register_varlen_ops"]


def _fwd_fake(q, k, v, *args):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _bwd_fake(dout, q, k, v, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def register_varlen_ops(fwd: str, bwd: str, backend: str, *, fakes: bool = True) -> None:
    """Register fakes (unless ``fakes=False``: the op has its own) and autograd for the ops named ``fwd`` and
    ``bwd`` (``"namespace::name"``) of backend ``backend`` (named in the double-backward refusal)."""
    namespace, bwd_name = bwd.split("::")
    bwd_op = getattr(getattr(torch.ops, namespace), bwd_name)
    if fakes:
        torch.library.register_fake(fwd, _fwd_fake)
        torch.library.register_fake(bwd, _bwd_fake)

    def setup_context(ctx, inputs, output):
        q, k, v, cu_seqlens_q, cu_seqlens_k, *params, rng_state = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng_state)
        ctx.params = params  # max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, dropout_p
        # lse is a by-product for callers (and the backward), not a differentiable output.
        ctx.mark_non_differentiable(lse)

    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng_state = ctx.saved_tensors
        dq, dk, dv = bwd_op(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.params, rng_state)
        return (dq, dk, dv) + (None,) * (len(ctx.params) + 3)  # offsets, params, rng_state

    def no_double_backward(ctx, *grads):
        raise NotImplementedError(
            f"the {backend} backend has no double backward ({bwd} is not differentiable): for second-order "
            f"gradients (create_graph=True, then another backward) call varlen_attention with "
            f'backend="reference"'
        )

    torch.library.register_autograd(fwd, backward, setup_context=setup_context)
    torch.library.register_autograd(bwd, no_double_backward)
