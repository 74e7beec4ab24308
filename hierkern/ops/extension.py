"""The compiled extension ``hierkern._C`` and the Python half of its ops: fake (meta) kernels and autograd.

``hierkern._C`` declares ``torch.ops.hierkern.varlen_fwd`` / ``varlen_bwd`` and registers their CPU (and, when
built with CUDA, CUDA) kernels. This module registers what every device shares:

* ``register_fake`` for both ops, so ``torch.compile`` and ``opcheck`` can trace them without running them;
* autograd on ``varlen_fwd`` whose backward is the ``varlen_bwd`` op (itself traceable, so compiled backward
  graphs call the fused kernel too), and on ``varlen_bwd`` one that refuses a double backward in words.

Loading never raises: when the extension is missing or broken, a warning names the cause, ``LOAD_ERROR``
keeps it, and backends built on the extension report it from ``unavailable_reason``.
"""

from __future__ import annotations

import importlib
import warnings

import torch

__all__ = ["LOAD_ERROR", "kernel_unavailable_reason"]

_OPS = ("varlen_fwd", "varlen_bwd")


def _load() -> str | None:
    try:
        importlib.import_module("hierkern._C")
    except Exception as exc:  # ImportError, OSError (undefined symbol, ABI mismatch), ...: all mean "no kernels"
        return f"hierkern._C could not be loaded ({type(exc).__name__}: {exc})"
    missing = [name for name in _OPS if not hasattr(torch.ops.hierkern, name)]
    if missing:
        return f"hierkern._C does not declare {', '.join(missing)} (a stale build: reinstall hierkern)"
    return None


LOAD_ERROR = _load()
if LOAD_ERROR is not None:
    warnings.warn(f"{LOAD_ERROR}; the compiled backends are unavailable and hierkern falls back to the "
                  f"reference backend", RuntimeWarning, stacklevel=2)


def _kernel_reason(dispatch_key: str) -> str | None:
    if LOAD_ERROR is not None:
        return LOAD_ERROR
    for name in _OPS:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"hierkern::{name}", dispatch_key):
            return (f"hierkern._C was built without {dispatch_key} kernels (hierkern::{name} has none): "
                    f"rebuild with `pip install --no-build-isolation -e .`")
    return None


# Computed once: backends ask on every call, including inside torch.compile tracing, which cannot trace
# into the dispatcher query.
_KERNEL_REASONS = {key: _kernel_reason(key) for key in ("CPU", "CUDA")}


def kernel_unavailable_reason(dispatch_key: str) -> str | None:
    """``None`` if both ops have a kernel for ``dispatch_key`` (``"CPU"``/``"CUDA"``), else why not."""
    return _KERNEL_REASONS[dispatch_key]


def dropout_rng_state(dropout_p: float) -> torch.Tensor | None:
    """The ops' ``rng_state`` for one call: ``[seed, offset]`` int64 on the CPU, as the op schema asks, drawn
    from torch's CPU generator (seeded by ``torch.manual_seed``) with no device sync; ``None`` without dropout.
    Autograd saves it, so the backward regenerates the forward's Philox mask."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64) if dropout_p > 0.0 else None


def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                     dropout_p, rng_state):
    out = q.new_empty(q.shape)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, lse


def _varlen_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     softmax_scale, causal, dropout_p, rng_state):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, dropout_p, \
        rng_state = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng_state)
    ctx.args = (max_seqlen_q, max_seqlen_k, softmax_scale, causal, dropout_p)
    # lse is a by-product for callers (and the backward), not a differentiable output.
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng_state = ctx.saved_tensors
    max_seqlen_q, max_seqlen_k, softmax_scale, causal, dropout_p = ctx.args
    dq, dk, dv = torch.ops.hierkern.varlen_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                               max_seqlen_q, max_seqlen_k, softmax_scale, causal, dropout_p,
                                               rng_state)
    return dq, dk, dv, None, None, None, None, None, None, None, None


def _no_double_backward(ctx, grad_dq, grad_dk, grad_dv):
    raise NotImplementedError(
        "hierkern's cpu and cuda kernels have no double backward (hierkern::varlen_bwd is not "
        "differentiable): for second-order gradients (create_graph=True, then another backward) call "
        "varlen_attention with backend=\"reference\"")


if LOAD_ERROR is None:
    torch.library.register_fake("hierkern::varlen_fwd", _varlen_fwd_fake)
    torch.library.register_fake("hierkern::varlen_bwd", _varlen_bwd_fake)
    torch.library.register_autograd("hierkern::varlen_fwd", _backward, setup_context=_setup_context)
    # Without a formula, autograd would treat the backward's outputs as constants under create_graph=True and
    # a second backward would return zeros for every second-order term: refuse instead.
    torch.library.register_autograd("hierkern::varlen_bwd", _no_double_backward)
