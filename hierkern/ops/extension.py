"""The compiled extension and the Python half of its ops: loading, fake (meta) kernels and autograd.

The extension declares ``torch.ops.hierkern.varlen_fwd`` / ``varlen_bwd`` and registers their CPU (and, when
built with CUDA, CUDA) kernels. It is ``hierkern._C`` when the install compiled it ahead of time; otherwise
(a plain ``pip install``, or a ``hierkern._C`` built against another torch) :mod:`hierkern.ops.toolchain`
compiles the shipped sources on first use. Once loaded, :mod:`hierkern.ops.registration` gives both ops their
fakes and autograd (for every device).

Loading never raises. Importing hierkern only tries ``hierkern._C``; when that is missing, the first call
that needs a kernel runs :func:`ensure_loaded`, which compiles it. When neither can work, one warning (at
import) says why and what to install, and the backends built on the extension report the reason.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from . import toolchain
from .registration import register_varlen_ops

__all__ = ["load_error", "ensure_loaded", "kernel_unavailable_reason", "loaded_from"]

_OPS = ("varlen_fwd", "varlen_bwd")
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_aot() -> tuple[str | None, bool]:
    """``(error, missing)``: why ``hierkern._C`` did not load (``None`` if it did), and whether it is simply
    absent (not built ahead of time) rather than broken."""
    try:
        importlib.import_module("hierkern._C")
    except ModuleNotFoundError as exc:
        if exc.name == "hierkern._C":
            return "hierkern._C was not built at install time", True
        return f"hierkern._C could not be loaded ({type(exc).__name__}: {exc})", False
    except Exception as exc:  # ImportError, OSError (undefined symbol, ABI mismatch), ...: all mean "no kernels"
        return f"hierkern._C could not be loaded ({type(exc).__name__}: {exc})", False
    return _missing_ops("hierkern._C"), False


def _missing_ops(what: str) -> str | None:
    missing = [name for name in _OPS if not hasattr(torch.ops.hierkern, name)]
    if missing:
        return f"{what} does not declare {', '.join(missing)} (a stale build: reinstall hierkern)"
    return None


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside hierkern and the import machinery
    (the user's ``import hierkern``), not at this file."""
    import inspect

    level = 0
    for frame in inspect.stack()[1:]:
        name = frame.filename
        if "importlib" in name and "_bootstrap" in name:
            continue  # warnings.warn skips these frames itself when counting
        level += 1
        if not name.startswith(_PACKAGE):
            return level
    return 1


def _dispatch_reason(dispatch_key: str) -> str | None:
    for name in _OPS:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"hierkern::{name}", dispatch_key):
            return (
                f"the compiled extension has no {dispatch_key} kernels (hierkern::{name} has none): "
                f"`python -m hierkern doctor` says why"
            )
    return None


class _State:
    loaded_from: str | None = None  # "hierkern._C" or "a just-in-time build"; None until loaded
    error: str | None = None  # why the kernels are unavailable; None when loaded or still buildable
    kernel_reasons: dict[str, str | None] = {}


_STATE = _State()


def _on_loaded(source: str) -> None:
    _STATE.loaded_from, _STATE.error = source, None
    # Computed once per load: backends ask on every call, including inside torch.compile tracing, which
    # cannot trace into the dispatcher query.
    _STATE.kernel_reasons = {key: _dispatch_reason(key) for key in ("CPU", "CUDA")}
    register_varlen_ops("hierkern::varlen_fwd", "hierkern::varlen_bwd", "cpu and cuda")


def _load_at_import() -> None:
    error, absent = _import_aot()
    if error is None:
        _on_loaded("hierkern._C")
        return
    problem = toolchain.cxx_problem()
    if problem is None:
        if not absent:  # broken, not merely absent: say so, since the first call will take minutes
            warnings.warn(
                f"{error}; hierkern compiles its kernels for this torch on first use instead",
                RuntimeWarning,
                stacklevel=_user_stacklevel(),
            )
        return  # compiled by ensure_loaded() on first use
    _STATE.error = f"{error}, and cannot be compiled here: {problem}"
    warnings.warn(
        f"hierkern's compiled kernels are unavailable ({_STATE.error}); until then hierkern runs "
        f"its pure-PyTorch reference backend. `python -m hierkern doctor` checks the set-up.",
        RuntimeWarning,
        stacklevel=_user_stacklevel(),
    )


def load_error() -> str | None:
    """Why the extension is unavailable, or ``None`` when it is loaded or can be compiled on first use."""
    return _STATE.error


def loaded_from() -> str | None:
    """``"hierkern._C"`` or ``"a just-in-time build"`` once the extension is loaded, else ``None``."""
    return _STATE.loaded_from


def ensure_loaded() -> str | None:
    """Load the extension, compiling it first if needed: ``None`` once loaded, else why it cannot be.

    A failed build is not retried: its reason stays, and the backends built on the extension report it.
    """
    if _STATE.loaded_from is None and _STATE.error is None:
        try:
            toolchain.build_cpu_kernels()
        except Exception as exc:  # a failed build leaves the compiled backends unavailable, with the reason
            _STATE.error = f"the just-in-time build of hierkern's C++ kernels failed ({type(exc).__name__}: {exc})"
            warnings.warn(
                f"{_STATE.error}; hierkern falls back to its reference backend",
                RuntimeWarning,
                stacklevel=_user_stacklevel(),
            )
        else:
            _STATE.error = _missing_ops("the just-in-time build")
            if _STATE.error is None:
                _on_loaded("a just-in-time build")
    return _STATE.error


def kernel_unavailable_reason(dispatch_key: str) -> str | None:
    """``None`` if both ops have a kernel for ``dispatch_key`` (``"CPU"``/``"CUDA"``) or the extension is still
    to be compiled on first use (:func:`ensure_loaded`), else why not."""
    if _STATE.error is not None:
        return _STATE.error
    if _STATE.loaded_from is None:
        return None
    return _STATE.kernel_reasons[dispatch_key]


_load_at_import()
