"""What every benchmark shares: problems, the correctness gate, peak memory, timing and the recorded fields.

A benchmark (1) prepares an implementation on a seeded problem, (2) runs it once untimed and checks its output
(and gradients, for forward+backward) against ``hierkern.reference`` evaluated in float64 on the same inputs,
(3) measures its peak memory in one more untimed call, then (4) hands the call to pytest-benchmark. On CUDA
the timed call ends with ``torch.cuda.synchronize()``, so a round is the time a caller waits for the result.

Every JSON entry carries ``impl``, ``family`` (the report's plot panel), ``floor_bytes`` (the bytes one call
must move at least) and the copy bandwidth measured on its device in the same run, from which the report
derives ``% of floor``: the time the floor's bytes take at that bandwidth over the measured median.
``conftest.py`` fills these in centrally (``complete_entries``), so a benchmark file that does not use
``run_benchmark`` still gets them. A baseline that cannot run an input is recorded as a result too: the
JSON's ``hierkern.failed`` list holds its group, implementation and error (the test itself is skipped with
the same message).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

import hierkern
from hierkern.bench import Workload, make_qkv, workloads
from hierkern.bench.report import family_of
from hierkern.reference import varlen_attention_reference

MODES = ("fwd", "fwd+bwd")
DTYPES = {"cpu": (torch.float32,), "cuda": (torch.bfloat16, torch.float16)}

# The correctness gate guards against timing a wrong answer; it is not a precision test (tests/ is). Relative
# Frobenius error vs the float64 reference, per dtype: (output, gradients). Each is a few times the error
# of an fp32-accumulating kernel with inputs in that dtype.
TOLERANCE = {
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (3e-2, 6e-2),
    torch.float16: (5e-3, 2e-2),
}

# Padded attention computes S * H * max_len**2 scores; past these limits a padded baseline would run for
# minutes (CPU) or exhaust memory, so it is skipped with the numbers in the reason.
PADDED_SCORE_LIMIT = {"cpu": 2**30, "cuda": 2**36}

# torch's per-segment paths (a Python loop over segments; SDPA on jagged nested tensors on the CPU, which
# processes segments one by one) cost milliseconds per segment for forward+backward on a 2-core CPU: past
# these segment counts one call would take minutes, so they are skipped with the count in the reason.
PER_SEGMENT_LIMIT = {"fwd": 8192, "fwd+bwd": 1024}

# Baselines that raised on their input in this session, for the JSON (see ``record_failure``).
FAILED: list[dict] = []

BYTES_DEFINITION = {
    "fwd": "floor: read q, k, v + write out, once each",
    "fwd+bwd": "floor: fwd (q, k, v, out) + bwd (read q, k, v, out, dout; write dq, dk, dv) = 12 tensors",
}


# device -> the fastest copy rate measured in this session (``copy_bandwidth``).
_BANDWIDTH: dict[str, float] = {}


def copy_bandwidth(device: str) -> dict:
    """The fastest device-memory copy rate measured in this session on ``device`` (``"cpu"``, ``"cuda:1"``).

    ``dst.copy_(src)`` of 256 MiB (CPU, torch's intra-op threads) or 1 GiB (CUDA), counting read + write,
    best of 10 after 2 warm-up copies: the rate a bandwidth-bound kernel could reach. Measured when a device
    first runs a benchmark and again at the end of the run (each call measures); the fastest is kept, since
    on a shared machine one measurement can land in a busy moment, which would put the floor too low.

    Returns:
        ``{"copy_bandwidth_Bps": ..., "copy_bandwidth_method": ...}``.
    """
    dev = torch.device(device)
    nbytes = (1 << 30) if dev.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    best = math.inf
    for i in range(12):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        dst.copy_(src)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= 2:
            best = min(best, time.perf_counter() - start)
    _BANDWIDTH[device] = max(_BANDWIDTH.get(device, 0.0), 2 * nbytes / best)
    threads = f", {torch.get_num_threads()} threads" if dev.type == "cpu" else ""
    return {
        "copy_bandwidth_Bps": _BANDWIDTH[device],
        "copy_bandwidth_method": f"torch copy_ of {nbytes >> 20} MiB (read + write){threads}, best of 10, "
        f"at the device's first benchmark and at the end of the run",
    }


def record_failure(group: str, impl: str, device, exc: BaseException, **info) -> str:
    """Keep a baseline's failure as a result (for the JSON) and return the one-line message to skip with."""
    message = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    FAILED.append(
        dict(group=group, impl=impl, device=str(device), error=message, torch_version=torch.__version__, **info)
    )
    return f"{impl} failed on this input (torch {torch.__version__}): {message}"


def complete_entries(benchmarks: list[dict]) -> None:
    """Give every pytest-benchmark JSON entry ``impl``, ``family``, ``floor_bytes`` and the copy bandwidth.

    For entries written by benchmarks that did not set them: ``impl`` falls back to the test's ``impl``
    parameter, else its name; ``family`` to ``family_of(group)``; ``floor_bytes`` to that of another entry
    of the same group (the floor belongs to the problem, not to the implementation), else ``None`` with
    ``bytes_definition`` saying so; the device to ``extra_info["device"]``, else the test's ``device``
    parameter, else the CPU. Adds ``floor_s`` (floor bytes at the copy bandwidth) and ``floor_fraction``
    (``floor_s`` / median) where both are known. Modifies the entries in place.
    """
    group_floor = {}
    for bench in benchmarks:
        extra = bench.get("extra_info") or {}
        if extra.get("floor_bytes") is not None:
            group_floor.setdefault(bench.get("group"), (extra["floor_bytes"], extra.get("bytes_definition")))
    measured = {}  # once per device, at the end of the run
    for bench in benchmarks:
        extra = bench.setdefault("extra_info", {})
        params = bench.get("params") or {}
        extra.setdefault("impl", str(params.get("impl", bench.get("name"))))
        extra.setdefault("family", family_of(bench.get("group") or ""))
        if extra.get("floor_bytes") is None:
            floor, definition = group_floor.get(bench.get("group"), (None, None))
            extra["floor_bytes"] = floor
            extra.setdefault("bytes_definition", definition or "no floor given by this benchmark")
        device = str(extra.get("device") or params.get("device") or "cpu")
        extra.setdefault("device", device)
        if device not in measured:
            measured[device] = copy_bandwidth(device)
        extra.update(measured[device])
        median = (bench.get("stats") or {}).get("median")
        if extra["floor_bytes"] and median:
            extra["floor_s"] = extra["floor_bytes"] / extra["copy_bandwidth_Bps"]
            extra["floor_fraction"] = extra["floor_s"] / median


def devices(config) -> list[str]:
    choice = config.getoption("--hk-device")
    if choice == "auto":
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    return ["cpu", "cuda"] if choice == "all" else [choice]


def cases(config, modes) -> list[tuple]:
    """``(device, workload, mode, dtype)`` for every benchmark group, in a cache-friendly order."""
    out = []
    for device in devices(config):
        for workload in workloads(config.getoption("--hk-size"), device):
            for mode in modes:
                for dtype in DTYPES[device]:
                    if workload.dtypes is None or str(dtype).replace("torch.", "") in workload.dtypes:
                        out.append((device, workload, mode, dtype))
    return out


def case_id(device, workload, mode, dtype) -> str:
    return f"{device}-{workload.name}-{mode}-{str(dtype).replace('torch.', '')}"


@dataclass
class Problem:
    """One benchmark input: a workload's packed tensors on a device, and the upstream gradient."""

    workload: Workload
    mode: str
    dtype: torch.dtype
    device: torch.device
    q: torch.Tensor  # (total, H, D)
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor  # (total, H, D), the gradient of out for fwd+bwd
    seg: hierkern.Segments

    @property
    def backward(self) -> bool:
        return self.mode == "fwd+bwd"

    def leaves(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fresh copies of ``q, k, v``, requiring grad for forward+backward."""
        return tuple(t.detach().clone().requires_grad_(self.backward) for t in (self.q, self.k, self.v))

    def attention_bytes(self) -> int:
        """The memory-traffic floor of the attention core (``BYTES_DEFINITION``)."""
        tensors = 12 if self.backward else 4
        return tensors * self.q.numel() * self.q.element_size()


@dataclass
class Prepared:
    """An implementation ready to time.

    ``run()`` is the timed call; ``result(run())`` gives the packed output ``(total, H, D)`` and, for
    forward+backward, the packed gradients of ``q, k, v``. ``extra`` lands in the JSON's ``extra_info``.
    """

    run: Callable[[], object]
    result: Callable[[object], tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]]
    extra: dict = field(default_factory=dict)


def make_problem(workload: Workload, mode: str, dtype: torch.dtype, device: str) -> Problem:
    device = torch.device(device)
    q, k, v = make_qkv(workload, dtype, device, seed=0)
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(q.shape, generator=gen).to(device=device, dtype=dtype)
    return Problem(workload, mode, dtype, device, q, k, v, dout, workload.segments(device))


# Parametrisation keeps every implementation of one problem together, so two entries are enough; at the
# large CUDA size one entry holds gigabytes.
@functools.lru_cache(maxsize=2)
def reference64(workload: Workload, mode: str, dtype: torch.dtype, device: str):
    """``hierkern.reference`` in float64 on the problem's inputs: ``(out, grads or None)``, packed, on the CPU.

    Evaluated on the problem's device (float64 on a GPU is exact enough and far faster than the CPU at the
    GPU sizes). Cached per problem.
    """
    p = make_problem(workload, mode, dtype, device)
    q, k, v = (t.detach().to(torch.float64).requires_grad_(p.backward) for t in (p.q, p.k, p.v))
    with torch.enable_grad():
        out, _ = varlen_attention_reference(q, k, v, p.seg.offsets, p.seg.offsets)
        grads = None
        if p.backward:
            grads = tuple(g.cpu() for g in torch.autograd.grad(out, (q, k, v), p.dout.to(torch.float64)))
    return out.detach().cpu(), grads


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` in float64 on the CPU; ``inf`` when ``x`` has a NaN."""
    x = x.detach().to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        return math.inf
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff if denom == 0 else diff / denom


def check_against_reference(name: str, got, ref, dtype: torch.dtype) -> dict:
    """Fail the benchmark (``AssertionError``) if ``got`` is not the reference's answer.

    Args:
        name: the implementation, for the message.
        got: ``(out, grads or None)`` packed, as ``Prepared.result`` returns.
        ref: the same from ``reference64``.
        dtype: the inputs' dtype (picks the tolerance).

    Returns:
        ``{"rel_err_out": ..., "rel_err_grad": ...}`` for ``extra_info``.
    """
    tol_out, tol_grad = TOLERANCE[dtype]
    out, grads = got
    ref_out, ref_grads = ref
    assert out.shape == ref_out.shape, f"{name}: output shape {tuple(out.shape)} != {tuple(ref_out.shape)}"
    errors = {"rel_err_out": rel_err(out, ref_out)}
    assert errors["rel_err_out"] <= tol_out, (
        f"{name}: output differs from the float64 reference (rel. error {errors['rel_err_out']:.3g} > "
        f"{tol_out:g}); not timing a wrong answer"
    )
    if ref_grads is not None:
        assert grads is not None, f"{name}: no gradients returned"
        # Jointly over (dq, dk, dv): with length-1 segments dq and dk are exactly zero, and a relative error
        # against a zero tensor would measure rounding noise alone.
        worst = rel_err(
            torch.cat([g.detach().cpu().double().flatten() for g in grads]), torch.cat([r.flatten() for r in ref_grads])
        )
        errors["rel_err_grad"] = worst
        assert worst <= tol_grad, (
            f"{name}: gradients differ from the float64 reference (rel. error {worst:.3g} > {tol_grad:g}); "
            f"not timing a wrong answer"
        )
    return errors


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """Bytes allocated above the starting level at the peak of one call of ``fn``, and how it was measured.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the allocation and free events of torch's
    CPU allocator recorded by ``torch.profiler`` (``profile_memory=True``), summed in time order; it sees
    every tensor (outputs and autograd buffers included) but not memory that C++ code takes outside torch's
    allocator.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del result
        return peak, "torch.cuda.max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak, "torch.profiler CPU allocator events (profile_memory=True)"


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    if device.type != "cuda":
        return fn

    def run():
        result = fn()
        torch.cuda.synchronize(device)
        return result

    return run


def padded_guard(workload: Workload, device: torch.device, what: str) -> None:
    """Skip a baseline that pads to ``max_len`` when the padded score count is over the device's limit."""
    scores = workload.padded_tokens * workload.max_len * workload.num_heads
    limit = PADDED_SCORE_LIMIT[device.type]
    if scores > limit:
        useful = workload.attention_pairs() * workload.num_heads
        pytest.skip(
            f"{what} pads {workload.num_segments} segments to {workload.max_len} tokens: "
            f"{scores:.3g} scores ({scores / max(useful, 1):.0f}x the useful {useful:.3g}), over this "
            f"suite's {device.type} limit of {limit:.3g}"
        )


def per_segment_guard(workload: Workload, mode: str, what: str) -> None:
    """Skip a baseline that works segment by segment when the workload has too many segments."""
    limit = PER_SEGMENT_LIMIT[mode]
    if workload.num_segments > limit:
        pytest.skip(
            f"{what} works segment by segment: {workload.num_segments} segments is over this suite's "
            f"{mode} limit of {limit}"
        )


def run_benchmark(
    benchmark,
    *,
    group: str,
    impl: str,
    prepared: Prepared,
    reference,
    dtype: torch.dtype,
    device: torch.device,
    floor_bytes: int,
    info: dict,
    family: str | None = None,
) -> None:
    """Check, measure memory, time, and record everything in ``benchmark.extra_info``.

    Args:
        benchmark: the pytest-benchmark fixture.
        group: ``"<workload>/<mode>/<dtype>"``.
        impl: ``"hierkern-..."`` for ours, ``"torch-..."`` for torch baselines, else the library's name.
        prepared: the implementation.
        reference: ``(out, grads or None)`` to check ``prepared`` against, or a callable that checks the
            result itself and returns the errors to record.
        dtype, device: of the inputs.
        floor_bytes: the memory-traffic floor of one call (``bytes_per_s`` divides it by the median time).
        info: workload fields (tokens, segments, ...) to record.
        family: the report's plot panel (one of ``hierkern.bench.report.FAMILIES``); default
            ``family_of(group)``.
    """
    benchmark.group = group
    if str(device) not in _BANDWIDTH:
        copy_bandwidth(str(device))  # the first of the run's two measurements (see copy_bandwidth)
    benchmark.extra_info.update(
        impl=impl,
        family=family or family_of(group),
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        **info,
        **prepared.extra,
    )
    run = synchronized(prepared.run, device)
    try:
        result = prepared.result(run())
    except (RuntimeError, NotImplementedError) as exc:
        if impl.startswith("hierkern-"):
            raise
        # A baseline that torch (or another library) cannot run on this input is reported, not ours to fix.
        pytest.skip(record_failure(group, impl, device, exc, **{**info, **prepared.extra}))
    if callable(reference):
        errors = reference(result)
    else:
        errors = check_against_reference(impl, result, reference, dtype)
    del result
    peak, method = peak_memory(run, device)
    benchmark.extra_info.update(errors, floor_bytes=floor_bytes, peak_memory_bytes=peak, peak_memory_method=method)
    benchmark(run)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["bytes_per_s"] = floor_bytes / median if median > 0 else None
        benchmark.extra_info["tokens_per_s"] = info["tokens"] / median if median > 0 else None
