"""Dropout on CPU tensors with hierkern's Philox kernel: ``hierkern::dropout`` / ``hierkern::dropout_add``.

torch's CPU dropout draws a Bernoulli mask from its Mersenne Twister one element at a time (``bernoulli_``),
divides it by ``1 - p``, multiplies, and saves the mask for the backward: on the seed model that was about a
fifth of a training step. The extension's ops (``csrc/cpu/dropout_cpu.cpp``) decide each element with
counter-based Philox4x32-10 under ``rng_state = [seed, offset]`` (``csrc/common/philox.h``, the element
layout), in vector code on every thread, in one pass that also adds the residual where there is one. The mask
is a pure function of ``rng_state``, so nothing is stored: the backward is the same op on the gradient.

This module registers the ops' fakes (``torch.compile``, ``opcheck``) and autograd once the extension is
loaded, and offers :func:`dropout` / :func:`dropout_add`, which the nn layers call: they run the kernel in
training with ``0 < p < 1`` on CPU tensors of a floating dtype it supports, and torch's ``F.dropout``
otherwise (other devices, ``p == 1``, an extension that is missing or was built without these ops, or a
``torch.compile`` trace that began before the ops were registered). The masks are not torch's: the same
``torch.manual_seed`` gives different (equally distributed) masks from the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import philox
from . import extension

__all__ = ["dropout", "dropout_add", "apply_dropout", "apply_dropout_add"]

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class _State:
    registered = False


_STATE = _State()


def _dropout_fake(x, p, rng_state):
    return x.new_empty(x.shape)


def _dropout_add_fake(residual, x, p, rng_state):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    *_, p, rng_state = inputs
    ctx.p = p
    ctx.save_for_backward(rng_state)


def _dropout_backward(ctx, grad):
    (rng_state,) = ctx.saved_tensors
    return torch.ops.hierkern.dropout(grad, ctx.p, rng_state), None, None


def _dropout_add_backward(ctx, grad):
    (rng_state,) = ctx.saved_tensors
    return grad, torch.ops.hierkern.dropout(grad, ctx.p, rng_state), None, None


def _register() -> bool:
    """Register the fakes and autograd if the loaded extension declares the ops; whether they are usable."""
    if not _STATE.registered and extension.loaded_from() is not None and hasattr(torch.ops.hierkern, "dropout_add"):
        torch.library.register_fake("hierkern::dropout", _dropout_fake)
        torch.library.register_fake("hierkern::dropout_add", _dropout_add_fake)
        # The backward calls the op itself, so gradients of any order follow.
        torch.library.register_autograd("hierkern::dropout", _dropout_backward, setup_context=_setup_context)
        torch.library.register_autograd("hierkern::dropout_add", _dropout_add_backward, setup_context=_setup_context)
        _STATE.registered = True
    return _STATE.registered


def _use_kernel(x: torch.Tensor, p: float) -> bool:
    if not (0.0 < p < 1.0 and x.device.type == "cpu" and x.dtype in _DTYPES and not x.is_nested):
        return False
    if _STATE.registered:
        return True
    # Loading may compile the extension (the first call of a just-in-time install); a trace cannot do that.
    if torch.compiler.is_compiling() or extension.ensure_loaded() is not None:
        return False
    return _register()


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``: hierkern's kernel where it applies (module docstring), else torch's."""
    if training and _use_kernel(x, p):
        return torch.ops.hierkern.dropout(x, p, philox.rng_state())
    return F.dropout(x, p, training)


def dropout_add(residual: torch.Tensor, x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``residual + F.dropout(x, p, training)`` in one pass where hierkern's kernel applies (same shape and
    dtype), else torch's ops."""
    if (
        training
        and _use_kernel(x, p)
        and residual.shape == x.shape
        and residual.dtype == x.dtype
        and residual.device == x.device
    ):
        return torch.ops.hierkern.dropout_add(residual, x, p, philox.rng_state())
    return residual + F.dropout(x, p, training)


def apply_dropout(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, through :func:`dropout` when ``module`` is a plain ``nn.Dropout`` (its ``p`` and
    ``training`` decide, as they do torch's); any other module (a replaced one) is called."""
    if type(module) is torch.nn.Dropout:
        return dropout(x, module.p, module.training)
    return module(x)


def apply_dropout_add(residual: torch.Tensor, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``residual + module(x)``, in one pass when ``module`` is a plain ``nn.Dropout``."""
    if type(module) is torch.nn.Dropout:
        return dropout_add(residual, x, module.p, module.training)
    return residual + module(x)


_register()
