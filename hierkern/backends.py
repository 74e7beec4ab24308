"""Attention backends: the record of a call, what each backend declares it supports, and how ``"auto"`` chooses.

``functional`` validates a ``varlen_attention`` call and hands the chosen backend one frozen :class:`VarlenArgs`
(tensors, offsets, max lengths, scale, the mask as a window, dropout and its RNG state). Each backend declares
what it supports as data, a :class:`Capabilities`; every refusal :func:`explain` reports is derived from those
declarations (:func:`refusal`), so adding a mask kind or a backend means editing the record, one declaration and
the kernels. A backend subclasses :class:`Backend`: ``name``, ``priority`` (``"auto"`` takes the
highest-priority backend that accepts the call), ``capabilities``, ``unavailable_reason()`` (``None`` when it
can run on this machine at all; only looks, never builds), an optional ``prepare()`` that readies it (compiles
its kernels on first use) and returns ``None`` or why it could not, and ``__call__(args)``. Backend modules
register themselves on import (``hierkern/ops/__init__.py`` imports them) and never raise at import time: a
backend that cannot load registers with the reason instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .reference import varlen_attention_reference

__all__ = [
    "AttentionCall",
    "VarlenArgs",
    "Capabilities",
    "Backend",
    "WINDOW_KINDS",
    "window_kind",
    "refusal",
    "register_backend",
    "get_backend",
    "backend_names",
    "available_backends",
    "select_backend",
    "explain",
]

# The masks a call can ask for, by what a kernel must do: nothing, a prefix of the keys per row, or a range.
WINDOW_KINDS = ("none", "causal", "sliding")


def window_kind(window_size: tuple[int, int]) -> str:
    """``"none"`` for ``(-1, -1)``, ``"causal"`` for ``(-1, 0)``, else ``"sliding"``."""
    return {(-1, -1): "none", (-1, 0): "causal"}.get(tuple(window_size), "sliding")


@dataclass(frozen=True)
class AttentionCall:
    """What a ``varlen_attention`` call asks of a backend, without tensor data: what declarations are checked
    against. ``window_size`` is ``(left, right)``, -1 unbounded; causal is ``(-1, 0)``."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    num_heads: int
    num_kv_heads: int
    max_seqlen_q: int
    max_seqlen_k: int
    window_size: tuple[int, int] = (-1, -1)
    dropout: bool = False
    requires_grad: bool = False

    @property
    def window_kind(self) -> str:
        return window_kind(self.window_size)

    @property
    def causal(self) -> bool:
        return self.window_kind == "causal"

    @classmethod
    def of(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        max_seqlen_q: int,
        max_seqlen_k: int,
        *,
        causal: bool = False,
        window_size: tuple[int, int] = (-1, -1),
        dropout_p: float = 0.0,
    ) -> AttentionCall:
        """The call's description from its tensors (``causal=True`` is ``window_size=(left, 0)``)."""
        window = (window_size[0], 0) if causal else tuple(window_size)
        return cls(
            device_type=q.device.type,
            dtype=q.dtype,
            head_dim=q.shape[-1],
            num_heads=q.shape[1],
            num_kv_heads=k.shape[1],
            max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
            window_size=window,
            dropout=dropout_p > 0.0,
            requires_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
        )


@dataclass(frozen=True)
class VarlenArgs:
    """One validated ``varlen_attention`` call, as a backend runs it.

    ``q`` ``(total_q, H, D)``, ``k``/``v`` ``(total_k, H_kv, D)``; ``cu_seqlens_q``/``cu_seqlens_k`` int32
    contiguous ``(S + 1,)`` on q's device; host ``max_seqlen_q``/``max_seqlen_k``; ``softmax_scale`` resolved;
    ``window_size`` ``(left, right)`` (-1 unbounded, bottom-right aligned; causal is ``(-1, 0)``);
    ``rng_state`` int64 ``[seed, offset]`` (``hierkern.philox``) when ``dropout_p > 0``, else ``None``.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    softmax_scale: float
    window_size: tuple[int, int]
    dropout_p: float
    rng_state: torch.Tensor | None

    def op_args(self) -> tuple:
        """The arguments of every compiled backend's forward op, in order (``hierkern/ops/registration.py``)."""
        return (
            self.q,
            self.k,
            self.v,
            self.cu_seqlens_q,
            self.cu_seqlens_k,
            self.max_seqlen_q,
            self.max_seqlen_k,
            self.softmax_scale,
            *self.window_size,
            self.dropout_p,
            self.rng_state,
        )


@dataclass(frozen=True)
class Capabilities:
    """What a backend supports, as data: :func:`refusal` derives every refusal in words from it.

    ``head_dims`` lists the only head dims it is compiled for (``None``: any up to ``max_head_dim``, if set).
    ``auto_devices``: where ``"auto"`` may choose it (``None``: every device in ``devices``).
    ``device_notes``: the sentence that refuses a device it does not take, where the generic one would not help.
    ``rng_on_device``: it reads ``rng_state`` on q's device (drawn there, no host sync) rather than the host.
    """

    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[int, ...] | None = None
    max_head_dim: int | None = None
    windows: tuple[str, ...] = WINDOW_KINDS
    dropout: bool = True
    gqa: bool = True
    double_backward: bool = False
    min_cuda_capability: tuple[int, int] | None = None
    auto_devices: tuple[str, ...] | None = None
    device_notes: dict[str, str] = field(default_factory=dict)
    rng_on_device: bool = False


def _names(items) -> str:
    words = [str(x).replace("torch.", "") for x in items]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


# Once per trace under torch.compile, which cannot trace the device query.
@torch.compiler.assume_constant_result
def _cuda_capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


def refusal(name: str, caps: Capabilities, call: AttentionCall) -> str | None:
    """Why backend ``name`` with ``caps`` does not take ``call`` (one sentence), or ``None`` if it does."""
    if call.device_type not in caps.devices:
        return caps.device_notes.get(call.device_type) or (
            f"the {name} backend runs on {_names(caps.devices)} tensors, not {call.device_type}"
        )
    if call.dtype not in caps.dtypes:
        return f"the {name} backend takes {_names(caps.dtypes)}, not {_names([call.dtype])}"
    if caps.head_dims is not None and call.head_dim not in caps.head_dims:
        return f"the {name} backend is compiled for head_dim {_names(caps.head_dims)}, not {call.head_dim}"
    if caps.max_head_dim is not None and call.head_dim > caps.max_head_dim:
        return f"the {name} backend supports head_dim up to {caps.max_head_dim}, got {call.head_dim}"
    if call.window_kind not in caps.windows:
        masks = _names([{"none": "unmasked", "causal": "causal", "sliding": "sliding-window"}[w] for w in caps.windows])
        return f"the {name} backend runs {masks} attention, not window_size={call.window_size}"
    if call.dropout and not caps.dropout:
        return f"the {name} backend has no attention dropout"
    if call.num_heads != call.num_kv_heads and not caps.gqa:
        return f"the {name} backend needs as many key/value heads as query heads (no GQA/MQA)"
    if (
        call.device_type == "cuda"
        and caps.min_cuda_capability is not None
        and _cuda_capability() < caps.min_cuda_capability
    ):
        major, minor = caps.min_cuda_capability
        return f"the {name} backend needs a GPU of compute capability {major}.{minor} or newer"
    return None


class Backend:
    """Base of every backend: ``why_not`` is derived from ``capabilities``; subclasses set ``name``,
    ``priority``, ``capabilities`` and implement ``__call__`` (and ``unavailable_reason``/``prepare`` when
    they can be missing or compile on first use)."""

    name: str
    priority: int
    capabilities: Capabilities

    @property
    def device_types(self) -> tuple[str, ...]:
        return self.capabilities.devices

    def unavailable_reason(self) -> str | None:
        return None

    def prepare(self) -> str | None:
        return None

    def why_not(self, call: AttentionCall) -> str | None:
        return refusal(self.name, self.capabilities, call)

    def __call__(self, args: VarlenArgs) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


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


def _by_priority() -> list[Backend]:
    return sorted(_REGISTRY.values(), key=lambda b: -b.priority)


def available_backends(device_type: str | None = None) -> list[str]:
    """Backends that can run on this machine, highest priority first.

    With ``device_type`` (``"cpu"``/``"cuda"``), only those that accept some call on that device.
    """
    return [
        b.name
        for b in _by_priority()
        if b.unavailable_reason() is None and (device_type is None or device_type in b.capabilities.devices)
    ]


def explain(call: AttentionCall) -> dict[str, str | None]:
    """For every registered backend: ``None`` if it would accept ``call``, else the reason it would not."""
    return {b.name: (b.unavailable_reason() or b.why_not(call)) for b in _by_priority()}


def select_backend(call: AttentionCall, name: str = "auto") -> Backend:
    """The backend that runs ``call``: the named one (refusing in words), or the best under ``"auto"``.

    The chosen backend is prepared (its kernels compiled on first use); under ``"auto"`` one that cannot be
    falls through to the next."""
    if name != "auto":
        backend = get_backend(name)
        reason = backend.unavailable_reason() or backend.why_not(call) or backend.prepare()
        if reason is not None:
            raise ValueError(f"backend {name!r} cannot run this call: {reason}")
        return backend
    for backend in _by_priority():
        caps = backend.capabilities
        # A backend may run on a device only when named (Triton's CPU interpreter is for tests).
        if call.device_type not in (caps.auto_devices or caps.devices):
            continue
        if backend.unavailable_reason() is None and backend.why_not(call) is None and backend.prepare() is None:
            return backend
    reasons = "; ".join(f"{n}: {r}" for n, r in explain(call).items())
    raise ValueError(f"no backend supports this call ({reasons})")


class ReferenceBackend(Backend):
    """``hierkern.reference`` as a backend: every dtype, device and option, autograd by torch itself (double
    backward included).

    It reads the offsets on the host (a device sync on CUDA) and pads internally by length bucket, so it is
    the fallback, never the fast path.
    """

    name = "reference"
    priority = 0
    capabilities = Capabilities(
        devices=("cpu", "cuda"),
        dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
        double_backward=True,
    )

    def __call__(self, args: VarlenArgs) -> tuple[torch.Tensor, torch.Tensor]:
        return varlen_attention_reference(
            args.q,
            args.k,
            args.v,
            args.cu_seqlens_q,
            args.cu_seqlens_k,
            softmax_scale=args.softmax_scale,
            window_size=args.window_size,
            dropout_p=args.dropout_p,
            rng_state=args.rng_state,
        )


register_backend(ReferenceBackend())
