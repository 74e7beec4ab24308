"""Attention backends: what each supports, why it refuses a call, and how ``"auto"`` chooses.

A backend is an object with a ``name``, a ``priority`` (``"auto"`` takes the highest-priority backend that
accepts the call), ``device_types`` (the tensor devices it can ever accept; an optional ``auto_device_types``
narrows where ``"auto"`` may pick it), ``unavailable_reason()`` (``None`` when it can run on this machine at
all) and
``why_not(call)`` (``None`` when it supports the call, else a sentence saying why not); the last two only look,
never build. An optional ``prepare()`` readies the chosen backend (compiles its kernels on first use) and
returns ``None`` or why it could not. Calling it runs the attention. Backend modules register themselves on import (``hierkern/ops/__init__.py`` imports them) and
must never raise at import time: a backend that cannot load registers with the reason instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .reference import varlen_attention_reference

__all__ = [
    "AttentionCall", "Backend", "register_backend", "get_backend", "backend_names", "available_backends",
    "select_backend", "explain",
]


@dataclass(frozen=True)
class AttentionCall:
    """What a backend needs to know to accept or refuse a ``varlen_attention`` call (no tensor data)."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    num_heads: int
    num_kv_heads: int
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool
    dropout: bool
    requires_grad: bool

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
           causal: bool, dropout_p: float) -> "AttentionCall":
        return cls(
            device_type=q.device.type, dtype=q.dtype, head_dim=q.shape[-1], num_heads=q.shape[1],
            num_kv_heads=k.shape[1], max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, causal=causal,
            dropout=dropout_p > 0.0,
            requires_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
        )


class Backend(Protocol):
    name: str
    priority: int
    device_types: tuple[str, ...]

    def unavailable_reason(self) -> str | None: ...

    def why_not(self, call: AttentionCall) -> str | None: ...

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                 causal: bool, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]: ...


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    if backend.name in _REGISTRY:
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend
    return backend


def backend_names() -> list[str]:
    """Every registered backend name, available here or not."""
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {sorted(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def available_backends(device_type: str | None = None) -> list[str]:
    """Backends that can run on this machine, highest priority first.

    With ``device_type`` (``"cpu"``/``"cuda"``), only those that accept some call on that device.
    """
    names = []
    for backend in sorted(_REGISTRY.values(), key=lambda b: -b.priority):
        if backend.unavailable_reason() is not None:
            continue
        if device_type is not None and device_type not in backend.device_types:
            continue
        names.append(backend.name)
    return names


def explain(call: AttentionCall) -> dict[str, str | None]:
    """For every registered backend: ``None`` if it would accept ``call``, else the reason it would not."""
    return {b.name: (b.unavailable_reason() or b.why_not(call))
            for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority)}


def _prepared(backend: Backend) -> str | None:
    prepare = getattr(backend, "prepare", None)
    return None if prepare is None else prepare()


def select_backend(call: AttentionCall, name: str = "auto") -> Backend:
    """The backend that runs ``call``: the named one (refusing in words), or the best under ``"auto"``.

    The chosen backend is prepared (its kernels compiled on first use); under ``"auto"`` one that cannot be
    falls through to the next."""
    if name != "auto":
        backend = get_backend(name)
        reason = backend.unavailable_reason() or backend.why_not(call) or _prepared(backend)
        if reason is not None:
            raise ValueError(f"backend {name!r} cannot run this call: {reason}")
        return backend
    for backend in sorted(_REGISTRY.values(), key=lambda b: -b.priority):
        # A backend may run on a device only when named (Triton's CPU interpreter is for tests).
        if call.device_type not in getattr(backend, "auto_device_types", backend.device_types):
            continue
        if backend.unavailable_reason() is None and backend.why_not(call) is None and _prepared(backend) is None:
            return backend
    reasons = "; ".join(f"{n}: {r}" for n, r in explain(call).items())
    raise ValueError(f"no backend supports this call ({reasons})")


class ReferenceBackend:
    """``hierkern.reference`` as a backend: every dtype, device and option, autograd by torch itself.

    It reads the offsets on the host (a device sync on CUDA) and pads internally by length bucket, so it is
    the fallback, never the fast path.
    """

    name = "reference"
    priority = 0
    device_types = ("cpu", "cuda")

    def unavailable_reason(self) -> str | None:
        return None

    def why_not(self, call: AttentionCall) -> str | None:
        return None

    def __call__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                 causal, dropout_p):
        return varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=softmax_scale,
                                          causal=causal, dropout_p=dropout_p)


register_backend(ReferenceBackend())
