"""hierkern.TransformerEncoderLayer / TransformerEncoder against torch.nn's with the same weights, and
hierkern.patch_model.

Random configurations come from a seeded generator over every constructor and forward option (not
hand-picked). Outputs and gradients (input and every parameter) must equal torch's at every valid position;
on the varlen path the padded positions must be exactly zero, as documented.
"""

from __future__ import annotations

import copy
import io
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hierkern
from hierkern import TransformerEncoder, TransformerEncoderLayer

TOL = dict(rtol=1e-5, atol=1e-5)
NUM_RANDOM_CONFIGS = 60
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "F.gelu": F.gelu, "tanh": torch.tanh}


@dataclass
class Config:
    layer: dict
    activation: str
    num_layers: int
    final_norm: bool
    batched: bool
    n: int
    length: int
    kpm_kind: str | None  # None | "prefix" | "prefix-float" | "scattered"
    mask_kind: str | None  # None | "causal" | "causal-float" | "random"
    is_causal: bool | None
    training: bool


def draw_config(seed: int) -> Config:
    rng = random.Random(seed)
    nhead = rng.choice([1, 2, 4])
    mask_kind = rng.choice([None, None, None, "causal", "causal-float", "random"])
    return Config(
        layer=dict(
            d_model=nhead * rng.choice([2, 4, 8]),
            nhead=nhead,
            dim_feedforward=rng.choice([4, 16, 24]),
            dropout=0.0,
            layer_norm_eps=rng.choice([1e-5, 1e-3]),
            batch_first=rng.random() < 0.5,
            norm_first=rng.random() < 0.5,
            bias=rng.random() < 0.75,
        ),
        activation=rng.choice(sorted(ACTIVATIONS)),
        num_layers=rng.randint(1, 3),
        final_norm=rng.random() < 0.5,
        batched=rng.random() < 0.85,
        n=rng.randint(1, 4),
        length=rng.randint(1, 7),
        kpm_kind=rng.choice([None, "prefix", "prefix", "prefix", "prefix-float", "scattered"]),
        mask_kind=mask_kind,
        is_causal=rng.choice([None, None, True]) if mask_kind else None,
        training=rng.random() < 0.5,
    )


def make_pair(cfg: Config, seed: int) -> tuple[nn.TransformerEncoder, TransformerEncoder]:
    """torch's encoder with perturbed parameters (so the norms' weights and biases matter) and ours loaded
    from its state_dict."""
    torch.manual_seed(seed)
    kwargs = dict(cfg.layer, activation=ACTIVATIONS[cfg.activation])
    norm = nn.LayerNorm(cfg.layer["d_model"], bias=cfg.layer["bias"]) if cfg.final_norm else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's enable_nested_tensor notices
        ref = nn.TransformerEncoder(nn.TransformerEncoderLayer(**kwargs), cfg.num_layers, norm=norm)
        ours = TransformerEncoder(TransformerEncoderLayer(**kwargs), cfg.num_layers, norm=copy.deepcopy(norm))
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours.load_state_dict(ref.state_dict())
    return ref.train(cfg.training), ours.train(cfg.training)


def make_inputs(cfg: Config, gen: torch.Generator):
    """``src``, ``mask``, ``src_key_padding_mask`` and the (N, L) valid flags. Every row keeps token 0, so
    torch never produces NaN rows."""
    n, length, e = cfg.n, cfg.length, cfg.layer["d_model"]
    src = torch.randn(n, length, e, generator=gen)
    pad = None
    if cfg.kpm_kind in ("prefix", "prefix-float"):
        lengths = torch.randint(1, length + 1, (n,), generator=gen)
        pad = torch.arange(length)[None, :] >= lengths[:, None]
    elif cfg.kpm_kind == "scattered":
        pad = torch.rand(n, length, generator=gen) < 0.4
        pad[:, 0] = False
    mask = None
    if cfg.mask_kind in ("causal", "causal-float"):
        mask = torch.ones(length, length, dtype=torch.bool).triu(1)
    elif cfg.mask_kind == "random":
        mask = torch.rand(length, length, generator=gen) < 0.3
        mask.fill_diagonal_(False)
    # One mask type per call (torch deprecates mixing them).
    as_float = cfg.kpm_kind == "prefix-float" or cfg.mask_kind == "causal-float"
    kpm = pad
    if as_float:
        kpm, mask = (m if m is None else torch.zeros(m.shape).masked_fill(m, float("-inf")) for m in (pad, mask))
    valid = torch.ones(n, length, dtype=torch.bool) if pad is None else ~pad
    if not cfg.batched:
        src, kpm, valid = src[0], (None if kpm is None else kpm[0]), valid[:1]
    elif not cfg.layer["batch_first"]:
        src = src.transpose(0, 1).contiguous()
    return src, mask, kpm, valid


def to_layout(valid: torch.Tensor, cfg: Config) -> torch.Tensor:
    """(N, L) flags in the output layout, broadcastable over features."""
    if not cfg.batched:
        return valid[0][:, None]
    return (valid if cfg.layer["batch_first"] else valid.t())[..., None]


def forward_backward(module, src, kwargs, out_weight):
    src = src.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = module(src, **kwargs)
    (out * out_weight).sum().backward()
    grads = {"src": src.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out.detach(), grads


def assert_matches_torch(got: dict, want: dict, want64: Callable[[], dict]) -> None:
    """Each of ``got`` equals ``want`` (torch in fp32) to ``TOL``, or, where torch's own fp32 rounding is
    past ``TOL`` (a LayerNorm over a near-constant row amplifies it), is at least as close as torch's to
    ``want64()``, torch's result in float64."""
    exact = None
    for name in want:
        try:
            torch.testing.assert_close(got[name], want[name], **TOL)
        except AssertionError as exc:
            exact = want64() if exact is None else exact
            ours = (got[name].double() - exact[name]).abs().max().item()
            torchs = (want[name].double() - exact[name]).abs().max().item()
            assert ours <= 2 * torchs, f"{name}: ours is {ours:.3g} off float64, torch's fp32 {torchs:.3g}: {exc}"


def expected_path(valid: torch.Tensor, mask: torch.Tensor | None) -> str:
    """varlen for prefix padding (valid flags non-increasing along each row) and a causal or no mask (a
    random mask or scattered padding can happen to be either)."""
    prefix = bool((valid[:, 1:] <= valid[:, :-1]).all())
    blocked = None if mask is None else (mask if mask.dtype == torch.bool else mask == float("-inf"))
    causal_or_none = blocked is None or torch.equal(blocked, torch.ones_like(blocked).triu(1))
    return "varlen" if prefix and causal_or_none else "torch"


@pytest.mark.parametrize("seed", range(NUM_RANDOM_CONFIGS))
def test_encoder_matches_torch_on_random_configs(seed):
    cfg = draw_config(seed)
    ref, ours = make_pair(cfg, seed)
    gen = torch.Generator().manual_seed(seed)
    src, mask, kpm, valid = make_inputs(cfg, gen)
    kwargs = dict(mask=mask, src_key_padding_mask=kpm, is_causal=cfg.is_causal)
    path = expected_path(valid, mask)
    valid = to_layout(valid, cfg).expand(src.shape)
    out_weight = torch.randn(src.shape, generator=gen) * valid

    out_r, g_r = forward_backward(ref, src, kwargs, out_weight)
    out_o, g_o = forward_backward(ours, src, kwargs, out_weight)
    assert ours.last_path == path, ours.last_why_not_fast_path
    assert out_o.shape == out_r.shape
    if ours.last_path == "varlen" and kpm is not None:
        assert bool((out_o[~valid] == 0).all()), "padded positions must be zeros on the varlen path"
    assert g_o.keys() == g_r.keys()

    def float64():
        out, grads = forward_backward(copy.deepcopy(ref).double(), src.double(), kwargs, out_weight.double())
        return dict(grads, out=out[valid])

    assert_matches_torch(dict(g_o, out=out_o[valid]), dict(g_r, out=out_r[valid]), float64)


@pytest.mark.parametrize("seed", range(0, NUM_RANDOM_CONFIGS, 3))
def test_layer_matches_torch_on_random_configs(seed):
    """A layer called on its own plans its own call, as the encoder does for the stack."""
    cfg = draw_config(seed)
    ref, ours = make_pair(cfg, seed)
    ref_layer, layer = ref.layers[0], ours.layers[0]
    gen = torch.Generator().manual_seed(seed)
    src, mask, kpm, valid = make_inputs(cfg, gen)
    kwargs = dict(src_mask=mask, src_key_padding_mask=kpm, is_causal=bool(cfg.is_causal))
    path = expected_path(valid, mask)
    valid = to_layout(valid, cfg).expand(src.shape)
    out_weight = torch.randn(src.shape, generator=gen) * valid
    out_r, g_r = forward_backward(ref_layer, src, kwargs, out_weight)
    out_o, g_o = forward_backward(layer, src, kwargs, out_weight)
    assert layer.last_path == path, layer.last_why_not_fast_path

    def float64():
        out, grads = forward_backward(copy.deepcopy(ref_layer).double(), src.double(), kwargs, out_weight.double())
        return dict(grads, out=out[valid])

    assert_matches_torch(dict(g_o, out=out_o[valid]), dict(g_r, out=out_r[valid]), float64)


def test_random_configs_exercise_both_paths():
    paths = []
    for seed in range(NUM_RANDOM_CONFIGS):
        _, mask, _, valid = make_inputs(draw_config(seed), torch.Generator().manual_seed(seed))
        paths.append(expected_path(valid, mask))
    assert 0.5 * len(paths) <= paths.count("varlen") <= 0.9 * len(paths)


# -- construction, state_dict, inference ---------------------------------------------------------------

LAYER_CTORS = [
    dict(d_model=8, nhead=2),
    dict(d_model=12, nhead=3, dim_feedforward=16, activation="gelu", batch_first=True, norm_first=True),
    dict(d_model=8, nhead=4, dim_feedforward=8, bias=False, layer_norm_eps=1e-3, dropout=0.3),
]


@pytest.mark.parametrize("ctor", LAYER_CTORS)
def test_same_parameters_initialisation_and_state_dict_both_ways(ctor):
    torch.manual_seed(0)
    ref = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(**ctor), 2, norm=nn.LayerNorm(ctor["d_model"]), enable_nested_tensor=False
    )
    torch.manual_seed(0)
    ours = TransformerEncoder(
        TransformerEncoderLayer(**ctor), 2, norm=nn.LayerNorm(ctor["d_model"]), enable_nested_tensor=False
    )
    assert isinstance(ours, nn.TransformerEncoder) and isinstance(ours.layers[1], nn.TransformerEncoderLayer)
    assert isinstance(ours.layers[0].self_attn, hierkern.MultiheadAttention)
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert list(sd_ref) == list(sd_ours)
    for name in sd_ref:  # the same random draws for the same seed
        assert torch.equal(sd_ref[name], sd_ours[name]), name
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p))
    ref.load_state_dict(ours.state_dict())
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    back = TransformerEncoder(
        TransformerEncoderLayer(**ctor), 2, norm=nn.LayerNorm(ctor["d_model"]), enable_nested_tensor=False
    )
    back.load_state_dict(torch.load(buffer))
    for (name, a), b in zip(ref.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_pickles_whole():
    torch.manual_seed(0)
    ours = TransformerEncoder(TransformerEncoderLayer(8, 2, 16, 0.0), 2).eval()
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    back = torch.load(buffer, weights_only=False)
    x, pad = torch.randn(5, 3, 8), torch.tensor([[False] * 5, [False] * 2 + [True] * 3, [False] * 4 + [True]])
    torch.testing.assert_close(back(x, src_key_padding_mask=pad), ours(x, src_key_padding_mask=pad))
    assert back.last_path == "varlen"


def test_inference_matches_torch_nested_fast_path():
    """torch's eval/no_grad encoder takes its nested-tensor path: zeros at padded positions before the final
    norm. Valid positions agree; ours has zeros at padded positions after the norm too."""
    torch.manual_seed(0)
    d = 16
    ref = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 4, 32, batch_first=True), 3, norm=nn.LayerNorm(d)).eval()
    ours = TransformerEncoder(TransformerEncoderLayer(d, 4, 32, batch_first=True), 3, norm=nn.LayerNorm(d)).eval()
    ours.load_state_dict(ref.state_dict())
    lengths = torch.tensor([6, 1, 4, 6])
    pad = torch.arange(6)[None, :] >= lengths[:, None]
    x = torch.randn(4, 6, d)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: nested tensors are a prototype
        out_r = ref(x, src_key_padding_mask=pad)
        out_o = ours(x, src_key_padding_mask=pad)
    torch.testing.assert_close(out_o[~pad], out_r[~pad], **TOL)
    assert bool((out_o[pad] == 0).all())


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    ours = TransformerEncoder(TransformerEncoderLayer(16, 4, 32, dropout=0.5, batch_first=True), 2)
    x = torch.randn(3, 5, 16)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] + [True] * 4])
    ours.eval()
    assert torch.equal(ours(x, src_key_padding_mask=pad), ours(x, src_key_padding_mask=pad))
    ours.train()
    a, b = ours(x, src_key_padding_mask=pad), ours(x, src_key_padding_mask=pad)
    assert ours.last_path == "varlen"
    assert not torch.equal(a[~pad], b[~pad])
    assert bool((a[pad] == 0).all())


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_compiles_torchs_modules_and_leaves_the_eager_model_alone():
    """TorchScript cannot compile hierkern's forward; scripting compiles torch's twins sharing the
    parameters, and the eager encoder keeps hierkern's layers."""
    torch.manual_seed(0)
    ours = TransformerEncoder(TransformerEncoderLayer(8, 2, 16, 0.0, batch_first=True), 2).eval()
    x = torch.randn(3, 5, 8)
    pad = torch.arange(5)[None, :] >= torch.tensor([5, 2, 3])[:, None]
    eager = ours(x, src_key_padding_mask=pad)
    scripted = torch.jit.script(ours)
    torch.testing.assert_close(scripted(x, src_key_padding_mask=pad)[~pad], eager[~pad], **TOL)
    assert all(type(layer) is TransformerEncoderLayer for layer in ours.layers)
    assert type(ours.layers[0].self_attn) is hierkern.MultiheadAttention
    with torch.no_grad():
        ours.layers[0].linear1.weight.add_(1.0)  # shared parameters: the scripted module sees the change
    torch.testing.assert_close(
        scripted(x, src_key_padding_mask=pad)[~pad], ours(x, src_key_padding_mask=pad)[~pad], **TOL
    )


# -- packed entry point ----------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_packed_entry_point_equals_padded_call(causal):
    torch.manual_seed(0)
    ours = TransformerEncoder(
        TransformerEncoderLayer(8, 2, 16, 0.0, batch_first=True, norm_first=True), 2, norm=nn.LayerNorm(8)
    )
    segments = hierkern.Segments.from_lengths([3, 1, 5, 2])
    packed = torch.randn(segments.total, 8, requires_grad=True)
    padded = segments.unpack(packed.detach()).requires_grad_()
    mask = nn.Transformer.generate_square_subsequent_mask(5) if causal else None
    out_packed = ours(packed, segments=segments, is_causal=causal)
    out_padded = ours(padded, mask=mask, src_key_padding_mask=segments.padding_mask(), is_causal=causal or None)
    assert ours.last_path == "varlen"
    torch.testing.assert_close(out_packed, segments.pack(out_padded), **TOL)
    dout = torch.randn_like(out_packed)
    (dpacked,) = torch.autograd.grad(out_packed, packed, dout)
    (dpadded,) = torch.autograd.grad(out_padded, padded, segments.unpack(dout))
    torch.testing.assert_close(dpacked, segments.pack(dpadded), **TOL)
    layer_out = ours.layers[0](packed, is_causal=causal, segments=segments)
    padded_out = ours.layers[0](padded, src_mask=mask, src_key_padding_mask=segments.padding_mask(), is_causal=causal)
    torch.testing.assert_close(layer_out, segments.pack(padded_out), **TOL)


def test_zero_length_rows_give_zeros_and_finite_gradients():
    torch.manual_seed(0)
    ours = TransformerEncoder(TransformerEncoderLayer(8, 2, 16, 0.0, batch_first=True), 2)
    x = torch.randn(3, 4, 8, requires_grad=True)
    pad = torch.tensor([[False, False, True, True], [True] * 4, [False] * 4])
    out = ours(x, src_key_padding_mask=pad)
    assert ours.last_path == "varlen" and bool((out[1] == 0).all())
    out.sum().backward()
    assert bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("norm_first", [False, True])
def test_fullgraph_compile_keeps_rows_padded_and_matches_eager(norm_first):
    """Under torch.compile packing would need the token count on the host; the encoder keeps the rows padded
    and every attention takes MultiheadAttention's sync-free path, with no graph break."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    ours = TransformerEncoder(
        TransformerEncoderLayer(8, 2, 16, 0.0, norm_first=norm_first),
        2,
        norm=nn.LayerNorm(8),
        enable_nested_tensor=False,
    )
    x = torch.randn(5, 3, 8)  # (L, N, E): batch_first=False
    pad = torch.arange(5)[None, :] >= torch.tensor([5, 2, 3])[:, None]
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.bool)

    def run(src):
        return ours(src, mask=causal, src_key_padding_mask=pad, is_causal=True)

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (run, compiled):
        leaf = x.clone().requires_grad_()
        out = fn(leaf)
        assert ours.last_path == "varlen"
        grads = torch.autograd.grad(out, [leaf] + list(ours.parameters()), torch.ones_like(out))
        results.append((out.detach(), grads))
    (eager, eager_grads), (got, got_grads) = results
    torch.testing.assert_close(got, eager, **TOL)  # padded positions are zeros on both paths
    for a, b in zip(got_grads, eager_grads):
        torch.testing.assert_close(a, b, **TOL)


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: TransformerEncoderLayer(10, 3), ValueError, "multiple of nhead"),
        (lambda: TransformerEncoderLayer(0, 1), ValueError, "d_model"),
        (lambda: TransformerEncoderLayer(8, 2, activation="swish"), ValueError, "activation"),
        (lambda: TransformerEncoderLayer(8, 2, activation=3), TypeError, "activation"),
        (lambda: TransformerEncoder(TransformerEncoderLayer(8, 2), -1), ValueError, "num_layers"),
        (lambda: TransformerEncoder("layer", 2), TypeError, "encoder_layer"),
    ],
)
def test_constructor_errors_name_the_argument(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda m, x: m(x, src_key_padding_mask=torch.zeros(2, 3, dtype=torch.bool)),
            ValueError,
            "src_key_padding_mask must have shape",
        ),
        (
            lambda m, x: m(x, src_key_padding_mask=torch.zeros(3, 5, dtype=torch.long)),
            TypeError,
            "src_key_padding_mask must be a bool or floating-point",
        ),
        (lambda m, x: m(x, mask=torch.zeros(4, 4, dtype=torch.bool)), ValueError, "mask must have shape"),
        (lambda m, x: m(x, is_causal="yes"), TypeError, "is_causal"),
        (lambda m, x: m(x[0], segments=hierkern.Segments.from_lengths([2, 2])), ValueError, "segments covers"),
        (lambda m, x: m(x[0], segments=[3, 2]), TypeError, "segments must be a hierkern.Segments"),
        (
            lambda m, x: m(
                x.flatten(0, 1),
                src_key_padding_mask=torch.zeros(15, dtype=torch.bool),
                segments=hierkern.Segments.from_lengths([15]),
            ),
            ValueError,
            "must be None",
        ),
        (lambda m, x: m(torch.randn(1, 2, 3, 8)), ValueError, "src must be"),
    ],
)
def test_bad_input_raises(call, error, match):
    ours = TransformerEncoder(TransformerEncoderLayer(8, 2, 16, batch_first=True), 1)
    with pytest.raises(error, match=match):
        call(ours, torch.randn(3, 5, 8))


# -- patch_model ------------------------------------------------------------------------------------


def _transformer_pair(batch_first: bool, norm_first: bool):
    torch.manual_seed(0)
    ref = nn.Transformer(16, 4, 2, 2, 32, 0.0, batch_first=batch_first, norm_first=norm_first)
    model = copy.deepcopy(ref)
    return ref, model


@pytest.mark.parametrize(
    "batch_first, norm_first, training", [(True, False, True), (False, True, False), (True, True, False)]
)
def test_patch_model_leaves_nn_transformer_outputs_unchanged(batch_first, norm_first, training):
    ref, model = _transformer_pair(batch_first, norm_first)
    params_before = [id(p) for p in model.parameters()]
    report = hierkern.patch_model(model)
    assert [id(p) for p in model.parameters()] == params_before  # an optimiser keeps training them
    assert isinstance(model.encoder, TransformerEncoder)
    assert all(
        isinstance(m, hierkern.MultiheadAttention) for m in model.modules() if isinstance(m, nn.MultiheadAttention)
    )
    assert len(report.swapped) == 1 + 2 * 2 + 2 * 2  # encoder, 2 layers + their self_attn, 2 x 2 decoder MHAs
    ref.train(training), model.train(training)
    gen = torch.Generator().manual_seed(1)
    src_pad = torch.arange(6)[None, :] >= torch.tensor([6, 2, 4])[:, None]
    tgt_pad = torch.arange(5)[None, :] >= torch.tensor([3, 5, 1])[:, None]
    src, tgt = torch.randn(3, 6, 16, generator=gen), torch.randn(3, 5, 16, generator=gen)
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    kwargs = dict(
        tgt_mask=nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.bool),
        src_key_padding_mask=src_pad,
        tgt_key_padding_mask=tgt_pad,
        memory_key_padding_mask=src_pad,
    )
    valid = ~tgt_pad if batch_first else ~tgt_pad.t()
    dout = torch.randn(tgt.shape, generator=gen) * valid[..., None]
    results = []
    for m in (ref, model):
        s, t = src.clone().requires_grad_(), tgt.clone().requires_grad_()
        out = m(s, t, **kwargs)
        grads = torch.autograd.grad(out, [s, t] + list(m.parameters()), dout)
        results.append((out.detach(), grads))
    (out_r, g_r), (out_o, g_o) = results
    assert model.encoder.last_path == "varlen"
    assert model.decoder.layers[0].self_attn.last_path == "varlen"
    assert model.decoder.layers[0].multihead_attn.last_path == "varlen"
    torch.testing.assert_close(out_o[valid], out_r[valid], **TOL)
    for a, b in zip(g_o, g_r):
        torch.testing.assert_close(a, b, **TOL)


class _CustomAttention(nn.MultiheadAttention):
    """A user subclass: its forward may do anything, so patch_model must leave it."""


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(
            [
                nn.TransformerEncoderLayer(8, 2, 16, 0.0, batch_first=True),
                nn.Sequential(
                    nn.TransformerEncoder(
                        nn.TransformerEncoderLayer(8, 2, 16, 0.0, batch_first=True), 2, enable_nested_tensor=False
                    )
                ),
            ]
        )
        self.pool = nn.MultiheadAttention(8, 2, batch_first=True)
        self.custom = _CustomAttention(8, 2, batch_first=True)

    def forward(self, x, pad):
        x = self.blocks[0](self.embed(x), src_key_padding_mask=pad)
        x = self.blocks[1][0](x, src_key_padding_mask=pad)
        query = x[:, :1]
        return (
            self.pool(query, x, x, key_padding_mask=pad, need_weights=False)[0]
            + self.custom(query, x, x, key_padding_mask=pad, need_weights=False)[0]
        )


def test_patch_model_on_a_nested_model_reports_what_it_left():
    torch.manual_seed(0)
    ref = _Model()
    model = copy.deepcopy(ref)
    report = hierkern.patch_model(model)
    swapped = {name for name, *_ in report.swapped}
    assert swapped == {
        "blocks.0",
        "blocks.0.self_attn",
        "blocks.1.0",
        "blocks.1.0.layers.0",
        "blocks.1.0.layers.0.self_attn",
        "blocks.1.0.layers.1",
        "blocks.1.0.layers.1.self_attn",
        "pool",
    }
    assert [
        (name, reason.startswith("a subclass of torch.nn.MultiheadAttention")) for name, _, reason in report.left
    ] == [("custom", True)]
    assert type(model.custom) is _CustomAttention
    text = str(report)
    assert "swapped 8 module(s), left 1" in text and "custom" in text and "blocks.1.0.layers.1" in text
    x = torch.randn(3, 5, 4)
    pad = torch.arange(5)[None, :] >= torch.tensor([5, 2, 3])[:, None]
    torch.testing.assert_close(model(x, pad), ref(x, pad), **TOL)
    assert model.blocks[1][0].last_path == "varlen" and model.pool.last_path == "varlen"
    again = hierkern.patch_model(model)
    assert not again.swapped and all(
        reason == "already hierkern's" for name, _, reason in again.left if name != "custom"
    )


def test_patch_model_rejects_a_non_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        hierkern.patch_model("model")


def test_adopt_refuses_subclasses():
    with pytest.raises(TypeError, match="not a subclass"):
        hierkern.MultiheadAttention.adopt(_CustomAttention(8, 2))
    with pytest.raises(TypeError, match="not a subclass"):
        TransformerEncoderLayer.adopt(TransformerEncoderLayer(8, 2))
