"""The seed model end to end: ``hierkern.HierarchicalEncoder`` vs the padded PyTorch model a user writes today.

The character-level model of words: a character transformer per word, mean-pooled into a word vector, then a
word transformer per sentence (E=256, H=8, 2 + 2 layers, GELU, feed-forward 4E, restarting sinusoidal
positions), on a batch of synthetic English (``hierkern.bench.seed_model_batch``: ~1k words, mean ~15 words
per sentence, at the default size). The padded twin is ``seed_model.PaddedHierarchicalEncoder``: two
``nn.TransformerEncoder`` stacks with key padding masks, loaded with the same ``state_dict``.

Groups:

* ``seed-model/train/<dtype>``: one training step, forward + backward into every parameter's ``.grad``
  (grads set to None first, as an optimizer loop does), train mode, dropout 0.1, pre-norm stacks;
* ``seed-model/infer/<dtype>``: forward in eval mode under ``torch.inference_mode``, post-norm stacks, so
  torch's nested-tensor fast path (``_transformer_encoder_layer_fwd``) may run; ``extra_info["torch_fast_path"]``
  says whether it did.

Before timing, both models run in eval mode (dropout off) in float32 on the same batch and device: their
outputs, and for train their parameter gradients under the same upstream gradient, must agree (rel. error
within the harness's float32 tolerance), so they compute the same function; they are then converted to the
timed dtype. Two bfloat16 models would each be ~1e-2 off the exact answer, too loose a check. The timed calls
run with dropout, which draws different masks in the two models, so the check cannot be made on them.
"""

from __future__ import annotations

import torch

import hierkern
from hierkern.bench import SEED_MODEL_VOCAB, seed_model_batch

from harness import DTYPES, TOLERANCE, Prepared, devices, rel_err, run_benchmark
from seed_model import PaddedBatch, PaddedHierarchicalEncoder

MODES = {"train": True, "infer": False}  # mode -> pre-norm (training recipe) or post-norm (fast path)
SHAPE = dict(dim=256, num_heads=8, char_layers=2, word_layers=2)
DROPOUT = 0.1
IMPLS = ("hierkern-encoder", "torch-encoder-padded")
BYTES_DEFINITION = {
    "train": "floor: read char ids, parameters twice (fwd, bwd) and dout; write out and parameter grads",
    "infer": "floor: read char ids and parameters, write out",
}


def pytest_generate_tests(metafunc):
    if "impl" not in metafunc.fixturenames:
        return
    params, ids = [], []
    for device in devices(metafunc.config):
        for mode in MODES:
            for dtype in DTYPES[device]:
                for impl in IMPLS:
                    params.append((device, mode, dtype, impl))
                    ids.append(f"{device}-seed-model-{mode}-{str(dtype).replace('torch.', '')}-{impl}")
    metafunc.parametrize("device,mode,dtype,impl", params, ids=ids)


def models(mode: str, dtype: torch.dtype, device: str):
    """The two models with one set of weights (hierkern's initialisation, seeded)."""
    torch.manual_seed(0)
    norm_first = MODES[mode]
    ours = hierkern.HierarchicalEncoder(
        SEED_MODEL_VOCAB, pooling="mean", dropout=DROPOUT, norm_first=norm_first, **SHAPE
    )
    twin = PaddedHierarchicalEncoder(
        SEED_MODEL_VOCAB,
        SHAPE["dim"],
        SHAPE["num_heads"],
        SHAPE["char_layers"],
        SHAPE["word_layers"],
        dropout=DROPOUT,
        norm_first=norm_first,
    )
    twin.load_state_dict(ours.state_dict())
    return ours.to(device, dtype), twin.to(device, dtype)


def upstream_gradient(batch: hierkern.TextBatch, dtype, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch.sentences.total, SHAPE["dim"], generator=gen).to(device, dtype)


def packed_forward(model, batch, padded: PaddedBatch) -> torch.Tensor:
    """``(total_words, E)`` from either model."""
    if isinstance(model, PaddedHierarchicalEncoder):
        return padded.pack_words(model(padded))
    return model(batch)


def agreement(ours, twin, batch, padded, dout, train: bool) -> dict:
    """Run both (float32) models in eval mode and assert they compute the same function (and gradients for
    train)."""
    tol_out, tol_grad = TOLERANCE[torch.float32]
    results = []
    for model in (ours, twin):
        model.eval()
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(train):
            out = packed_forward(model, batch, padded)
            if train:
                out.backward(dout)
        grads = [p.grad.detach().flatten() for _, p in sorted(model.named_parameters())] if train else None
        results.append((out.detach(), grads))
        model.zero_grad(set_to_none=True)
    (out_a, grads_a), (out_b, grads_b) = results
    errors = {"rel_err_out": rel_err(out_a, out_b.double().cpu())}
    assert errors["rel_err_out"] <= tol_out, (
        f"hierkern.HierarchicalEncoder and the padded twin disagree (rel. error {errors['rel_err_out']:.3g} > "
        f"{tol_out:g}); not timing different functions"
    )
    if train:
        errors["rel_err_grad"] = rel_err(torch.cat(grads_a), torch.cat(grads_b).double().cpu())
        assert errors["rel_err_grad"] <= tol_grad, (
            f"parameter gradients disagree (rel. error {errors['rel_err_grad']:.3g} > {tol_grad:g})"
        )
    return errors


def uses_fast_path(twin, padded) -> bool:
    """Whether torch's encoder ran its fused nested-tensor kernel on this call (seen in a profile)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        twin(padded)
    return any(e.name == "aten::_transformer_encoder_layer_fwd" for e in prof.events())


def prepare(model, batch, padded, dout, train: bool) -> Prepared:
    params = list(model.parameters())
    if isinstance(model, PaddedHierarchicalEncoder):
        # The padded user's loss sees the padded output; its gradient is zero on padded slots.
        grad = padded.word_pad.new_zeros(padded.word_pad.numel(), dout.shape[1], dtype=dout.dtype)
        grad = grad.index_copy(0, padded.word_slot, dout).view(*padded.word_pad.shape, -1)

        def forward():
            return model(padded)
    else:
        grad = dout

        def forward():
            return model(batch)

    model.train(train)
    if train:

        def run():
            for p in params:
                p.grad = None
            out = forward()
            out.backward(grad)
            return out.detach()
    else:

        def run():
            with torch.inference_mode():
                return forward()

    return Prepared(run, lambda out: out)


def test_seed_model(benchmark, request, skip_without_device, device, mode, dtype, impl):
    skip_without_device(device)
    train = mode == "train"
    size = request.config.getoption("--hk-size")
    batch = seed_model_batch(size, device, device=device)
    padded = PaddedBatch.of(batch)
    ours, twin = models(mode, torch.float32, device)
    dout = upstream_gradient(batch, torch.float32, device)
    errors = agreement(ours, twin, batch, padded, dout, train)
    model = (ours if impl.startswith("hierkern-") else twin).to(dtype)
    dout = dout.to(dtype)
    extra = {}
    if model is twin and not train:
        extra["torch_fast_path"] = uses_fast_path(twin.eval(), padded)
    prepared = prepare(model, batch, padded, dout, train)
    prepared.extra.update(extra)

    def check(out):
        assert torch.isfinite(out).all(), f"{impl}: non-finite output"
        return errors

    words, sentences = batch.words, batch.sentences
    num_params = sum(p.numel() for p in ours.parameters())
    element = torch.empty(0, dtype=dtype).element_size()
    out_bytes = sentences.total * SHAPE["dim"] * element
    ids_bytes = words.total * batch.char_ids.element_size()
    floor = (
        ids_bytes + num_params * element + out_bytes
        if not train
        else ids_bytes + 3 * num_params * element + 2 * out_bytes
    )
    info = dict(
        workload="seed-model",
        mode=mode,
        tokens=words.total,
        segments=words.num_segments,
        mean_len=words.total / words.num_segments,
        max_len=words.max_len,
        sentences=sentences.num_segments,
        mean_sentence_len=sentences.total / sentences.num_segments,
        max_sentence_len=sentences.max_len,
        padded_chars=words.num_segments * words.max_len,
        padded_words=sentences.num_segments * sentences.max_len,
        num_parameters=num_params,
        num_heads=SHAPE["num_heads"],
        head_dim=SHAPE["dim"] // SHAPE["num_heads"],
        norm_first=MODES[mode],
        dropout=DROPOUT if train else 0.0,
        size=size,
        bytes_definition=BYTES_DEFINITION[mode],
    )
    run_benchmark(
        benchmark,
        group=f"seed-model/{mode}/{str(dtype).replace('torch.', '')}",
        impl=impl,
        prepared=prepared,
        reference=check,
        dtype=dtype,
        device=torch.device(device),
        floor_bytes=floor,
        info=info,
        family="seed model",
    )
