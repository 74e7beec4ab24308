"""The layer: ``hierkern.MultiheadAttention`` vs ``torch.nn.MultiheadAttention`` (same weights, E=256, H=8).

Groups ``mha-<workload>/<mode>/<dtype>`` call with ``need_weights=False``:

* ``torch-mha``: torch's module on the padded batch ``(S, max_len, E)`` with ``key_padding_mask``
  (``batch_first=True``; in ``fwd`` mode eval + no_grad, so torch may take its native fast path);
* ``hierkern-mha-padded``: ours, called exactly like torch's;
* ``hierkern-mha-packed``: ours on the packed ``(total, E)`` tokens with ``segments=``.

Groups ``mha-weights-<workload>/...`` call with torch's default ``need_weights=True`` (``torch-mha`` vs
``hierkern-mha-padded``). ``fwd+bwd`` runs in train mode (dropout 0) and differentiates the input and every
parameter. Every output and gradient is checked against torch's module in float64 first; padded query rows
are left out of that check (hierkern returns zeros there, as torch's nested fast path does) and carry a zero
upstream gradient.
"""

from __future__ import annotations

import functools

import pytest
import torch

import hierkern

from harness import MODES, Prepared, case_id, cases, check_against_reference, run_benchmark

LAYER_WORKLOADS = ("chars-in-words", "words-in-sentences")
LAYER_BYTES_DEFINITION = {
    "fwd": "floor: read x + parameters, write out",
    "fwd+bwd": "floor: fwd + read dout, x, parameters; write dx, parameter grads",
}
VARIANTS = {  # group prefix -> (need_weights, implementations)
    "mha": (False, ("torch-mha", "hierkern-mha-padded", "hierkern-mha-packed")),
    "mha-weights": (True, ("torch-mha", "hierkern-mha-padded")),
}


def pytest_generate_tests(metafunc):
    if "variant" not in metafunc.fixturenames:
        return
    params, ids = [], []
    for device, workload, mode, dtype in cases(metafunc.config, MODES):
        if workload.name not in LAYER_WORKLOADS:
            continue
        for variant, (_, impls) in VARIANTS.items():
            for impl in impls:
                params.append((device, workload, mode, dtype, variant, impl))
                ids.append(f"{variant}-{case_id(device, workload, mode, dtype)}-{impl}")
    metafunc.parametrize("device,workload,mode,dtype,variant,impl", params, ids=ids)


def torch_module(workload, device, dtype) -> torch.nn.MultiheadAttention:
    torch.manual_seed(0)
    return torch.nn.MultiheadAttention(workload.embed_dim, workload.num_heads, batch_first=True).to(device, dtype)


def inputs(workload, device, dtype):
    """Packed ``x`` and upstream gradient ``dout``, ``(total, E)`` each, seeded."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(workload.total, workload.embed_dim, generator=gen)
    dout = torch.randn(workload.total, workload.embed_dim, generator=gen)
    return x.to(device, dtype), dout.to(device, dtype)


@functools.lru_cache(maxsize=4)
def reference64(workload, mode, dtype, device):
    """torch's module in float64 on the CPU: packed output and (dx, parameter grads) for fwd+bwd."""
    seg = workload.segments()
    module = torch_module(workload, device, dtype).to("cpu", torch.float64)
    x, dout = (t.to("cpu", torch.float64) for t in inputs(workload, device, dtype))
    xp = seg.unpack(x).requires_grad_(mode == "fwd+bwd")
    with torch.enable_grad():
        out, _ = module(xp, xp, xp, key_padding_mask=seg.padding_mask(), need_weights=False)
        grads = None
        if mode == "fwd+bwd":
            params = [p for _, p in sorted(module.named_parameters())]
            dxp, *dparams = torch.autograd.grad(out, [xp] + params, seg.unpack(dout))
            grads = (seg.pack(dxp), *dparams)
    return seg.pack(out.detach()), grads


def prepare(impl, workload, mode, dtype, device, need_weights) -> tuple[Prepared, torch.nn.Module]:
    seg = workload.segments(device)
    base = torch_module(workload, device, dtype)
    if impl.startswith("hierkern-"):
        if not hasattr(hierkern, "MultiheadAttention"):
            pytest.skip("hierkern.MultiheadAttention does not exist yet")
        module = hierkern.MultiheadAttention(
            workload.embed_dim, workload.num_heads, batch_first=True, device=device, dtype=dtype
        )
        module.load_state_dict(base.state_dict())
    else:
        module = base
    backward = mode == "fwd+bwd"
    module.train(backward)
    params = [p for _, p in sorted(module.named_parameters())]
    x, dout = inputs(workload, device, dtype)
    packed = impl == "hierkern-mha-packed"
    if packed:
        leaf, grad_out = x.requires_grad_(backward), dout
        kwargs = dict(segments=seg, need_weights=need_weights)
    else:
        leaf, grad_out = seg.unpack(x).requires_grad_(backward), seg.unpack(dout)
        kwargs = dict(key_padding_mask=seg.padding_mask(), need_weights=need_weights)

    def forward():
        return module(leaf, leaf, leaf, **kwargs)[0]

    if backward:

        def run():
            out = forward()
            return out, torch.autograd.grad(out, [leaf] + params, grad_out)
    else:

        def run():
            with torch.no_grad():
                return forward(), None

    def result(r):
        out, grads = r
        if packed:
            return out.detach(), grads
        return seg.pack(out.detach()), None if grads is None else (seg.pack(grads[0]), *grads[1:])

    num_params = sum(p.numel() for p in params)
    return Prepared(run, result, {"num_parameters": num_params}), module


def test_layer(benchmark, request, skip_without_device, device, workload, mode, dtype, variant, impl):
    skip_without_device(device)
    need_weights = VARIANTS[variant][0]
    prepared, module = prepare(impl, workload, mode, dtype, device, need_weights)
    ref = reference64(workload, mode, dtype, device)

    def check(result):
        errors = check_against_reference(impl, result, ref, dtype)
        if impl.startswith("hierkern-"):
            errors["path"] = module.last_path  # which path ours took: "varlen" or torch's math
        return errors

    # The attention backend "auto" picks inside the layer (shape, dtype and device decide, not the data).
    probe = torch.empty(
        0, workload.num_heads, workload.head_dim, device=device, dtype=dtype, requires_grad=mode == "fwd+bwd"
    )
    with torch.set_grad_enabled(mode == "fwd+bwd"):
        call = hierkern.AttentionCall.of(probe, probe, probe, workload.max_len, workload.max_len)
    element = probe.element_size()
    tokens, params = workload.total * workload.embed_dim, prepared.extra["num_parameters"]
    floor = (2 * tokens + params) if mode == "fwd" else (5 * tokens + 3 * params)
    info = dict(
        workload=workload.name,
        mode=mode,
        tokens=workload.total,
        segments=workload.num_segments,
        mean_len=workload.mean_len,
        max_len=workload.max_len,
        num_heads=workload.num_heads,
        head_dim=workload.head_dim,
        need_weights=need_weights,
        auto_backend=hierkern.backends.select_backend(call).name,
        size=request.config.getoption("--hk-size"),
        bytes_definition=LAYER_BYTES_DEFINITION[mode],
    )
    run_benchmark(
        benchmark,
        group=f"{variant}-{workload.name}/{mode}/{str(dtype).replace('torch.', '')}",
        impl=impl,
        prepared=prepared,
        reference=check,
        dtype=dtype,
        device=torch.device(device),
        floor_bytes=floor * element,
        info=info,
    )
