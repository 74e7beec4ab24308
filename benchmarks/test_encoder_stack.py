"""The encoder stack: ``hierkern.TransformerEncoder`` vs ``torch.nn.TransformerEncoder`` with the same weights.

Four post-norm layers (E=256, H=8, feed-forward 4E, ReLU, dropout 0.1, ``batch_first``), both called the way a
user calls torch's: a padded ``(N, L, E)`` batch plus ``src_key_padding_mask``. The batch is the leading
segments of a ``hierkern.bench`` workload (``chars-in-words``: characters of English words;
``words-in-sentences``: the words of its sentences), ``ENCODER_TOKENS`` real tokens at the chosen size, so
that the padded baseline's training step stays around a second on a 2-core CPU.

Groups ``encoder-stack/<mode>/<dtype>/<workload>``:

* ``train``: one training step, forward + backward into the input and every parameter (grads set to None
  first, as an optimizer loop does), train mode, dropout 0.1;
* ``infer``: forward in eval mode under ``torch.no_grad``; torch's module is built with
  ``enable_nested_tensor=True``, so its nested-tensor fast path runs (``extra_info["torch_fast_path"]`` says
  whether it did).

Before timing, both modules run in eval mode (dropout off) on the same batch: their outputs at the valid
positions, and for ``train`` the gradients of the input and of every parameter under the same upstream gradient
(zero at padded positions), must agree within the harness's tolerance. The timed calls then run with dropout,
which draws different masks in the two modules, so the check cannot be made on the timed calls themselves.
"""

from __future__ import annotations

import itertools
import warnings

import torch
from torch import nn

import hierkern
from hierkern.bench import workloads

from harness import DTYPES, TOLERANCE, Prepared, devices, rel_err, run_benchmark

WORKLOADS = ("chars-in-words", "words-in-sentences")
MODES = ("train", "infer")
IMPLS = ("hierkern-encoder", "torch-encoder")
ENCODER_TOKENS = {"small": 300, "default": 1500, "large": 6000}
NUM_LAYERS, DROPOUT = 4, 0.1
BYTES_DEFINITION = {
    "train": "floor: read x, parameters twice (fwd, bwd) and dout; write out, dx and parameter grads",
    "infer": "floor: read x and parameters, write out",
}


def pytest_generate_tests(metafunc):
    if "impl" not in metafunc.fixturenames:
        return
    params, ids = [], []
    for device in devices(metafunc.config):
        for workload in WORKLOADS:
            for mode in MODES:
                for dtype in DTYPES[device]:
                    for impl in IMPLS:
                        params.append((device, workload, mode, dtype, impl))
                        ids.append(f"{device}-{workload}-{mode}-{str(dtype).replace('torch.', '')}-{impl}")
    metafunc.parametrize("device,workload_name,mode,dtype,impl", params, ids=ids)


def batch(workload_name: str, size: str, device: str) -> hierkern.Segments:
    """The leading segments of the workload holding at least ``ENCODER_TOKENS[size]`` tokens."""
    workload = next(w for w in workloads(size, "cpu") if w.name == workload_name)
    totals = itertools.accumulate(workload.lengths)
    count = next((i + 1 for i, total in enumerate(totals) if total >= ENCODER_TOKENS[size]), len(workload.lengths))
    return hierkern.Segments.from_lengths(list(workload.lengths[:count]), device=device)


def modules(workload_name: str, dtype: torch.dtype, device: str):
    """torch's encoder (seeded initialisation) and ours loaded with its ``state_dict``."""
    torch.manual_seed(0)
    e = 256
    layer = dict(d_model=e, nhead=8, dim_feedforward=4 * e, dropout=DROPOUT, batch_first=True)
    ref = nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer), NUM_LAYERS, enable_nested_tensor=True)
    ours = hierkern.TransformerEncoder(hierkern.TransformerEncoderLayer(**layer), NUM_LAYERS)
    ours.load_state_dict(ref.state_dict())
    return ours.to(device, dtype), ref.to(device, dtype)


def inputs(seg: hierkern.Segments, dtype, device):
    """Padded ``x`` ``(N, L, E)``, its padding mask, and an upstream gradient that is zero where padded."""
    gen = torch.Generator().manual_seed(0)
    x = seg.unpack(torch.randn(seg.total, 256, generator=gen).to(device, dtype))
    dout = seg.unpack(torch.randn(seg.total, 256, generator=gen).to(device, dtype))
    return x, seg.padding_mask(), dout


def agreement(ours, ref, x, pad, dout, train: bool, dtype) -> dict:
    """Both modules in eval mode compute the same function at the valid positions (and gradients for train)."""
    tol_out, tol_grad = TOLERANCE[dtype]
    results = []
    for module in (ours, ref):
        module.eval()
        leaf = x.detach().clone().requires_grad_(train)
        with torch.set_grad_enabled(train), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch: nested tensors are a prototype
            out = module(leaf, src_key_padding_mask=pad)
            grads = None
            if train:
                params = [p for _, p in sorted(module.named_parameters())]
                grads = torch.autograd.grad(out, [leaf] + params, dout)
                grads = torch.cat([grads[0][~pad].flatten()] + [g.flatten() for g in grads[1:]])
        results.append((out.detach()[~pad], grads))
    (out_o, grads_o), (out_r, grads_r) = results
    errors = {"rel_err_out": rel_err(out_o, out_r.double().cpu())}
    assert errors["rel_err_out"] <= tol_out, (
        f"hierkern.TransformerEncoder and torch's disagree at valid positions (rel. error "
        f"{errors['rel_err_out']:.3g} > {tol_out:g}); not timing different functions"
    )
    assert ours.last_path == "varlen", ours.last_why_not_fast_path
    if train:
        errors["rel_err_grad"] = rel_err(grads_o, grads_r.double().cpu())
        assert errors["rel_err_grad"] <= tol_grad, (
            f"input/parameter gradients disagree (rel. error {errors['rel_err_grad']:.3g} > {tol_grad:g})"
        )
    return errors


def uses_fast_path(ref, x, pad) -> bool:
    """Whether torch's encoder ran its fused nested-tensor kernel on this call (seen in a profile)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), warnings.catch_warnings(), profile(activities=[ProfilerActivity.CPU]) as prof:
        warnings.simplefilter("ignore")
        ref.eval()(x, src_key_padding_mask=pad)
    return any(e.name == "aten::_transformer_encoder_layer_fwd" for e in prof.events())


def prepare(module, x, pad, dout, train: bool) -> Prepared:
    params = list(module.parameters())
    module.train(train)
    if train:
        leaf = x.detach().clone().requires_grad_()

        def run():
            leaf.grad = None
            for p in params:
                p.grad = None
            out = module(leaf, src_key_padding_mask=pad)
            out.backward(dout)
            return out.detach()
    else:

        def run():
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return module(x, src_key_padding_mask=pad)

    return Prepared(run, lambda out: out)


def test_encoder_stack(benchmark, request, skip_without_device, device, workload_name, mode, dtype, impl):
    skip_without_device(device)
    train = mode == "train"
    size = request.config.getoption("--hk-size")
    seg = batch(workload_name, size, device)
    ours, ref = modules(workload_name, dtype, device)
    x, pad, dout = inputs(seg, dtype, device)
    errors = agreement(ours, ref, x, pad, dout, train, dtype)
    module = ours if impl.startswith("hierkern-") else ref
    prepared = prepare(module, x, pad, dout, train)
    if module is ref and not train:
        prepared.extra["torch_fast_path"] = uses_fast_path(ref, x, pad)

    def check(out):
        assert torch.isfinite(out).all(), f"{impl}: non-finite output"
        if module is ours:
            assert ours.last_path == "varlen", ours.last_why_not_fast_path
        return errors

    num_params = sum(p.numel() for p in ours.parameters())
    element = torch.empty(0, dtype=dtype).element_size()
    tokens = seg.total * 256 * element
    floor = 2 * tokens + num_params * element if not train else 5 * tokens + 3 * num_params * element
    info = dict(
        workload=workload_name,
        mode=mode,
        tokens=seg.total,
        segments=seg.num_segments,
        mean_len=seg.total / seg.num_segments,
        max_len=seg.max_len,
        padded_tokens=seg.num_segments * seg.max_len,
        num_layers=NUM_LAYERS,
        num_heads=8,
        head_dim=32,
        num_parameters=num_params,
        dropout=DROPOUT if train else 0.0,
        size=size,
        bytes_definition=BYTES_DEFINITION[mode],
    )
    run_benchmark(
        benchmark,
        group=f"encoder-stack/{mode}/{str(dtype).replace('torch.', '')}/{workload_name}",
        impl=impl,
        prepared=prepared,
        reference=check,
        dtype=dtype,
        device=torch.device(device),
        floor_bytes=floor,
        info=info,
        family="encoder stack",
    )
