"""hierkern.MultiheadAttention against torch.nn.MultiheadAttention with the same weights.

The random configurations are drawn from a seeded generator (not hand-picked) over every constructor and
forward option. The documented difference is checked, not masked: on the varlen path, in self-attention
with a prefix key_padding_mask, the padded query positions must be exactly zero.
"""

from __future__ import annotations

import io
import random
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import hierkern
from hierkern import MultiheadAttention, Segments

TOL = dict(rtol=1e-5, atol=1e-5)
NUM_RANDOM_CONFIGS = 200


@dataclass
class Config:
    ctor: dict
    self_attention: bool
    batched: bool
    n: int
    tgt_len: int
    src_len: int
    kpm_kind: str | None  # None | "prefix" | "scattered" | "float"
    mask_kind: str | None  # None | "causal" | "random" | "float"
    mask_3d: bool
    bool_masks: bool
    is_causal: bool
    need_weights: bool
    average_attn_weights: bool
    training: bool


def draw_config(seed: int) -> Config:
    rng = random.Random(seed)
    num_heads = rng.choice([1, 2, 3, 4])
    embed_dim = num_heads * rng.choice([1, 2, 3, 4, 8])
    self_attention = rng.random() < 0.5
    kdim = vdim = None
    if not self_attention and rng.random() < 0.4:
        kdim, vdim = rng.choice([embed_dim, 3, 5]), rng.choice([None, 2, 7])
    ctor = dict(
        embed_dim=embed_dim,
        num_heads=num_heads,
        bias=rng.random() < 0.75,
        add_bias_kv=rng.random() < 0.1,
        add_zero_attn=rng.random() < 0.1,
        kdim=kdim,
        vdim=vdim,
        batch_first=rng.random() < 0.5,
    )
    tgt_len = rng.randint(1, 7)
    src_len = tgt_len if (self_attention or rng.random() < 0.3) else rng.randint(1, 7)
    # Weighted so that about half the calls qualify for the varlen path.
    mask_kind = rng.choice([None, None, None, None, "causal", "causal", "causal", "random", "float"])
    return Config(
        ctor=ctor,
        self_attention=self_attention,
        batched=rng.random() < 0.8,
        n=rng.randint(1, 3),
        tgt_len=tgt_len,
        src_len=src_len,
        kpm_kind=rng.choice([None, "prefix", "prefix", "prefix", "scattered", "float"]),
        mask_kind=mask_kind,
        mask_3d=rng.random() < 0.3,
        bool_masks=rng.random() < 0.6,
        is_causal=mask_kind is not None and rng.random() < 0.5,
        need_weights=rng.random() < 0.2,
        average_attn_weights=rng.random() < 0.5,
        training=rng.random() < 0.5,
    )


def make_pair(ctor: dict, seed: int) -> tuple[nn.MultiheadAttention, MultiheadAttention]:
    """A torch module with non-trivial parameters (biases included) and ours loaded from its state_dict."""
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(**ctor)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = MultiheadAttention(**ctor)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def make_inputs(cfg: Config, gen: torch.Generator):
    """Inputs and masks for ``cfg``. Every query keeps at least one visible key (key 0), so torch never
    produces NaN rows."""
    e, kdim, vdim = cfg.ctor["embed_dim"], cfg.ctor["kdim"], cfg.ctor["vdim"]
    kdim, vdim = kdim or e, vdim or e
    n, lq, ls = cfg.n, cfg.tgt_len, cfg.src_len

    def seq(length, features):
        t = torch.randn(n, length, features, generator=gen)
        if not cfg.batched:
            return t[0]
        return t if cfg.ctor["batch_first"] else t.transpose(0, 1).contiguous()

    query = seq(lq, e)
    if cfg.self_attention:
        key = value = query
    else:
        key = seq(ls, kdim)
        value = key if (vdim == kdim and torch.rand((), generator=gen) < 0.5) else seq(ls, vdim)

    kpm = None
    if cfg.kpm_kind == "prefix":
        lengths = torch.randint(1, ls + 1, (n,), generator=gen)
        kpm = torch.arange(ls)[None, :] >= lengths[:, None]
    elif cfg.kpm_kind == "scattered":
        kpm = torch.rand(n, ls, generator=gen) < 0.4
        kpm[:, 0] = False
    elif cfg.kpm_kind == "float":
        kpm = torch.randn(n, ls, generator=gen)

    attn_mask = None
    heads = cfg.ctor["num_heads"]
    if cfg.mask_kind == "causal":
        attn_mask = torch.ones(lq, ls, dtype=torch.bool).triu(1)
    elif cfg.mask_kind == "random":
        attn_mask = torch.rand(lq, ls, generator=gen) < 0.4
        attn_mask[:, 0] = False
    elif cfg.mask_kind == "float":
        attn_mask = torch.randn(lq, ls, generator=gen)
    if attn_mask is not None:
        if cfg.mask_3d:
            attn_mask = attn_mask.expand((n if cfg.batched else 1) * heads, lq, ls).clone()
    # One mask type per call (torch deprecates mixing them): bool only if every mask given is bool.
    all_bool = cfg.bool_masks and all(m is None or m.dtype == torch.bool for m in (kpm, attn_mask))
    if not all_bool:
        kpm, attn_mask = (
            m if (m is None or m.is_floating_point()) else torch.zeros(m.shape).masked_fill(m, float("-inf"))
            for m in (kpm, attn_mask)
        )
    if kpm is not None and not cfg.batched:
        kpm = kpm[0]
    return query, key, value, kpm, attn_mask


def to_output_layout(mask_nl: torch.Tensor, cfg: Config) -> torch.Tensor:
    """An (N, L) per-query flag in the output's layout, broadcastable over features."""
    if not cfg.batched:
        return mask_nl[0][:, None]
    return (mask_nl if cfg.ctor["batch_first"] else mask_nl.t())[..., None]


def run_and_grad(module, inputs, kwargs, out_weight, weights_seed):
    """Forward, then backward of a fixed random linear function of the outputs (and weights)."""
    query, key, value = inputs
    leaves = list({id(t): t for t in inputs}.values())
    for t in leaves:
        t.grad = None
    module.zero_grad(set_to_none=True)
    out, weights = module(query, key, value, **kwargs)
    loss = (out * out_weight).sum()
    if weights is not None:
        gen = torch.Generator().manual_seed(weights_seed)
        loss = loss + (weights * torch.randn(weights.shape, generator=gen)).sum()
    loss.backward()
    grads = {f"input{i}": t.grad for i, t in enumerate(leaves)}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out.detach(), (None if weights is None else weights.detach()), grads


@pytest.mark.parametrize("seed", range(NUM_RANDOM_CONFIGS))
def test_matches_torch_on_random_configs(seed):
    check_random_config(seed)


@pytest.fixture
def masks_not_host_readable(monkeypatch):
    """Plan every call as for a CUDA mask or under torch.compile: without reading a mask's values."""
    monkeypatch.setattr(hierkern.nn.masks, "host_readable", lambda t: False)


@pytest.mark.parametrize("seed", range(0, NUM_RANDOM_CONFIGS, 2))
def test_sync_free_path_matches_torch_on_random_configs(seed, masks_not_host_readable):
    """The same sweep through the plan that never reads a mask on the host: bool key padding masks of any
    pattern (scattered too) take the varlen path, packed by a device-side sort."""
    check_random_config(seed)


def test_sync_free_path_takes_any_bool_padding_and_refuses_what_it_cannot_check(masks_not_host_readable):
    mha = MultiheadAttention(8, 2)
    x = torch.randn(5, 3, 8)
    scattered = torch.tensor([[False, True, False, True, False]] * 3)
    assert mha.why_not_fast_path(x, x, x, scattered, need_weights=False) is None
    float_mask = torch.zeros(3, 5).masked_fill(scattered, float("-inf"))
    assert "float key_padding_mask" in mha.why_not_fast_path(x, x, x, float_mask, need_weights=False)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert "is_causal=True" in mha.why_not_fast_path(x, x, x, need_weights=False, attn_mask=causal)
    # torch documents is_causal as the caller's promise that attn_mask is the causal mask.
    assert mha.why_not_fast_path(x, x, x, scattered, need_weights=False, attn_mask=causal, is_causal=True) is None


def check_random_config(seed):
    cfg = draw_config(seed)
    ref, ours = make_pair(cfg.ctor, seed)
    ref.train(cfg.training)
    ours.train(cfg.training)
    gen = torch.Generator().manual_seed(seed)
    query, key, value, kpm, attn_mask = make_inputs(cfg, gen)
    for t in {id(t): t for t in (query, key, value)}.values():
        t.requires_grad_(True)
    kwargs = dict(
        key_padding_mask=kpm,
        need_weights=cfg.need_weights,
        attn_mask=attn_mask,
        average_attn_weights=cfg.average_attn_weights,
        is_causal=cfg.is_causal,
    )
    reason = ours.why_not_fast_path(query, key, value, kpm, cfg.need_weights, attn_mask, cfg.is_causal)

    # The documented rule: varlen path + self-attention + key padding -> padded queries are zeros.
    zero_queries = reason is None and cfg.self_attention and kpm is not None
    valid = torch.ones(cfg.n if cfg.batched else 1, cfg.tgt_len, dtype=torch.bool)
    if zero_queries:
        valid = ~(kpm if kpm.dtype == torch.bool else kpm == float("-inf")).reshape(valid.shape)
    out_shape = query.shape[:-1] + (cfg.ctor["embed_dim"],)
    valid = to_output_layout(valid, cfg).expand(out_shape)
    out_weight = torch.randn(out_shape, generator=gen) * valid

    out_r, w_r, g_r = run_and_grad(ref, (query, key, value), kwargs, out_weight, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one mask type per call: nothing to warn about
        out_o, w_o, g_o = run_and_grad(ours, (query, key, value), kwargs, out_weight, seed)
    assert ours.last_why_not_fast_path == reason
    assert ours.last_path == ("varlen" if reason is None else "torch")

    assert out_o.shape == out_r.shape
    torch.testing.assert_close(out_o[valid], out_r[valid], **TOL)
    if zero_queries:
        assert bool((out_o[~valid] == 0).all()), "padded query positions must be zeros on the varlen path"
    if cfg.need_weights:
        torch.testing.assert_close(w_o, w_r, **TOL)
    else:
        assert w_o is None and w_r is None
    assert g_o.keys() == g_r.keys()
    for name in g_r:
        if g_r[name] is None:
            assert g_o[name] is None, name
        else:
            torch.testing.assert_close(g_o[name], g_r[name], **TOL, msg=lambda m: f"grad of {name}: {m}")


def test_random_configs_exercise_both_paths():
    """The random sweep above is only meaningful if many of its calls leave torch's path."""
    paths = []
    for seed in range(NUM_RANDOM_CONFIGS):
        cfg = draw_config(seed)
        _, ours = make_pair(cfg.ctor, seed)
        ours.train(cfg.training)
        query, key, value, kpm, attn_mask = make_inputs(cfg, torch.Generator().manual_seed(seed))
        paths.append(ours.why_not_fast_path(query, key, value, kpm, cfg.need_weights, attn_mask, cfg.is_causal))
    varlen = sum(reason is None for reason in paths)
    assert 0.25 * len(paths) <= varlen <= 0.75 * len(paths), varlen


# -- construction and state_dict --------------------------------------------------------------------

CTORS = [
    dict(embed_dim=8, num_heads=2),
    dict(embed_dim=6, num_heads=3, bias=False, batch_first=True),
    dict(embed_dim=8, num_heads=4, kdim=5, vdim=3, add_bias_kv=True),
    dict(embed_dim=4, num_heads=1, kdim=4, vdim=7, add_zero_attn=True, dropout=0.25),
]


@pytest.mark.parametrize("ctor", CTORS)
def test_same_parameters_and_initialisation(ctor):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(**ctor)
    torch.manual_seed(0)
    ours = MultiheadAttention(**ctor)
    assert isinstance(ours, nn.MultiheadAttention)
    assert type(ours.out_proj) is type(ref.out_proj)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name
    for attr in (
        "embed_dim",
        "kdim",
        "vdim",
        "num_heads",
        "head_dim",
        "dropout",
        "batch_first",
        "add_zero_attn",
        "_qkv_same_embed_dim",
    ):
        assert getattr(ours, attr) == getattr(ref, attr), attr


@pytest.mark.parametrize("ctor", CTORS)
def test_state_dict_loads_both_ways(ctor):
    ref, ours = make_pair(ctor, seed=1)
    back = nn.MultiheadAttention(**ctor)
    back.load_state_dict(ours.state_dict(), strict=True)
    for (name, a), b in zip(back.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name
    ref.eval()
    ours.eval()
    e, kdim, vdim = ctor["embed_dim"], ctor.get("kdim") or ctor["embed_dim"], ctor.get("vdim") or ctor["embed_dim"]
    q, k, v = torch.randn(4, 2, e), torch.randn(5, 2, kdim), torch.randn(5, 2, vdim)
    if ctor.get("batch_first"):
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    torch.testing.assert_close(ours(q, k, v)[0], ref(q, k, v)[0], **TOL)


def test_constructor_errors_match_torch():
    for args, error in (((0, 2), ValueError), ((8, 0), ValueError), ((8, 3), AssertionError)):
        with pytest.raises(error):
            nn.MultiheadAttention(*args)
        with pytest.raises(error):
            MultiheadAttention(*args)


# -- path selection and the documented semantics ------------------------------------------------------


def _prefix_mask(lengths, total_len):
    return torch.arange(total_len)[None, :] >= torch.tensor(lengths)[:, None]


@pytest.mark.parametrize(
    "call, expected",
    [
        (dict(need_weights=False), None),
        (dict(need_weights=False, kpm=True), None),
        (dict(need_weights=False, kpm=True, causal_mask=True), None),
        (dict(need_weights=False, causal_mask=True, is_causal=True), None),
        (dict(need_weights=True), "need_weights"),
        (dict(need_weights=False, random_mask=True), "attn_mask"),
        (dict(need_weights=False, scattered=True), "prefix"),
        (dict(need_weights=False, kpm=True, causal_mask=True, cross=True), "cross-attention"),
    ],
)
def test_path_selection(call, expected):
    _, ours = make_pair(dict(embed_dim=8, num_heads=2, batch_first=True), seed=2)
    x = torch.randn(3, 5, 8)
    y = torch.randn(3, 5, 8) if call.get("cross") else x
    kpm = _prefix_mask([5, 2, 3], 5) if call.get("kpm") else None
    if call.get("scattered"):
        kpm = torch.tensor([[False, True, False, False, False]] * 3)
    mask = torch.ones(5, 5, dtype=torch.bool).triu(1) if call.get("causal_mask") else None
    if call.get("random_mask"):
        mask = torch.rand(5, 5) < 0.3
    kwargs = dict(
        key_padding_mask=kpm, need_weights=call["need_weights"], attn_mask=mask, is_causal=call.get("is_causal", False)
    )
    reason = ours.why_not_fast_path(x, y, y, **kwargs)
    ours(x, y, y, **kwargs)
    assert ours.last_why_not_fast_path == reason
    assert ours.last_path == ("varlen" if expected is None else "torch")
    if expected is None:
        assert reason is None
    else:
        assert expected in reason


@pytest.mark.parametrize("ctor", [dict(add_bias_kv=True), dict(add_zero_attn=True)])
def test_module_options_take_torch_path(ctor):
    _, ours = make_pair(dict(embed_dim=8, num_heads=2, **ctor), seed=3)
    x = torch.randn(5, 2, 8)
    assert "add_" in ours.why_not_fast_path(x, x, x, need_weights=False)


def test_fully_padded_rows_give_zeros_and_finite_gradients():
    """A batch entry with no valid token: zeros in self-attention (no query is real), torch's result
    (attention over nothing is zero, so the output bias) in cross-attention; never NaN."""
    ref, ours = make_pair(dict(embed_dim=8, num_heads=2, batch_first=True), seed=4)
    kpm = _prefix_mask([3, 0, 5], 5)
    x = torch.randn(3, 5, 8, requires_grad=True)
    out, _ = ours(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert ours.last_path == "varlen"
    assert bool((out[1] == 0).all())
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())
    q = torch.randn(3, 4, 8)
    ours_out, _ = ours(q, x, x, key_padding_mask=kpm, need_weights=False)
    ref_out, _ = ref(q, x, x, key_padding_mask=kpm, need_weights=False)
    torch.testing.assert_close(ours_out, ref_out, **TOL)


def test_nested_tensor_inputs_take_torch_path():
    ref, ours = make_pair(dict(embed_dim=8, num_heads=2, batch_first=True), seed=13)
    ref.eval()
    ours.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "nested tensors are a prototype" notice
        x = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(2, 8)])
        with torch.no_grad():
            out_r, _ = ref(x, x, x, need_weights=False)
            out_o, _ = ours(x, x, x, need_weights=False)
    assert ours.last_path == "torch" and "nested" in ours.last_why_not_fast_path
    torch.testing.assert_close(out_o.to_padded_tensor(0.0), out_r.to_padded_tensor(0.0), **TOL)


@pytest.mark.parametrize("ctor", [dict(), dict(add_bias_kv=True)])
@pytest.mark.parametrize("lengths", [[], [0, 0]])
def test_packed_empty_inputs(ctor, lengths):
    ours = MultiheadAttention(8, 2, **ctor)
    seg = Segments.from_lengths(lengths)
    x = torch.randn(0, 8)
    out, _ = ours(x, x, x, segments=seg, need_weights=False)
    assert out.shape == (0, 8)


def test_inference_matches_torch_native_fast_path():
    """In eval under no_grad torch takes its own fused kernel; valid positions must still agree."""
    ref, ours = make_pair(dict(embed_dim=8, num_heads=2, batch_first=True), seed=5)
    ref.eval()
    ours.eval()
    kpm = _prefix_mask([5, 2, 4], 5)
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        out_r, _ = ref(x, x, x, key_padding_mask=kpm, need_weights=False)
        out_o, _ = ours(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert ours.last_path == "varlen"
    torch.testing.assert_close(out_o[~kpm], out_r[~kpm], **TOL)
    assert bool((out_o[kpm] == 0).all())


def test_is_causal_follows_torch():
    """is_causal without attn_mask raises torch's RuntimeError; with a mask and no padding it means causal
    (the mask itself is ignored, as in torch), with padding the mask is what masks."""
    ref, ours = make_pair(dict(embed_dim=8, num_heads=2), seed=6)
    x = torch.randn(4, 2, 8)
    with pytest.raises(RuntimeError, match="Need attn_mask") as torch_error:
        ref(x, x, x, is_causal=True, need_weights=False)
    with pytest.raises(RuntimeError, match="Need attn_mask") as our_error:
        ours(x, x, x, is_causal=True, need_weights=False)
    assert str(our_error.value) == str(torch_error.value)
    wrong_hint = torch.zeros(4, 4, dtype=torch.bool)
    out_r, _ = ref(x, x, x, attn_mask=wrong_hint, is_causal=True, need_weights=False)
    out_o, _ = ours(x, x, x, attn_mask=wrong_hint, is_causal=True, need_weights=False)
    assert ours.last_path == "varlen"
    torch.testing.assert_close(out_o, out_r, **TOL)
    kpm = _prefix_mask([4, 4], 4)
    out_r, _ = ref(x, x, x, attn_mask=wrong_hint, key_padding_mask=kpm, is_causal=True, need_weights=False)
    out_o, _ = ours(x, x, x, attn_mask=wrong_hint, key_padding_mask=kpm, is_causal=True, need_weights=False)
    torch.testing.assert_close(out_o, out_r, **TOL)


def test_mismatched_mask_types_warn_like_torch():
    ref, ours = make_pair(dict(embed_dim=8, num_heads=2), seed=7)
    x = torch.randn(4, 2, 8)
    kpm = _prefix_mask([4, 2], 4)
    causal = torch.zeros(4, 4).masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf"))
    for module in (ref, ours):
        with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
            module(x, x, x, key_padding_mask=kpm, attn_mask=causal, need_weights=False)
    assert ours.last_path == "varlen"


# -- packed inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("ctor", [dict(), dict(bias=False), dict(add_bias_kv=True), dict(add_zero_attn=True)])
def test_packed_self_attention_matches_padded(ctor, causal):
    lengths = [3, 0, 7, 1, 5]
    seg = Segments.from_lengths(lengths)
    _, ours = make_pair(dict(embed_dim=12, num_heads=3, batch_first=True, **ctor), seed=8)
    padded = torch.randn(len(lengths), seg.max_len, 12)
    kpm = seg.padding_mask()
    packed = seg.pack(padded).requires_grad_(True)
    out, weights = ours(packed, packed, packed, segments=seg, need_weights=False, is_causal=causal)
    assert weights is None and out.shape == (seg.total, 12)
    expected = torch.cat(
        [
            _torch_math(ours, padded[i : i + 1, :n], padded[i : i + 1, :n], padded[i : i + 1, :n], causal)[0]
            for i, n in enumerate(lengths)
        ]
    )
    torch.testing.assert_close(out, expected, **TOL)
    if ours.last_path == "varlen":
        mask = torch.ones(seg.max_len, seg.max_len, dtype=torch.bool).triu(1) if causal else None
        via_padding, _ = ours(padded, padded, padded, key_padding_mask=kpm, attn_mask=mask, need_weights=False)
        torch.testing.assert_close(out, seg.pack(via_padding), **TOL)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    grad_packed = packed.grad
    padded_leaf = padded.clone().requires_grad_(True)
    expected = torch.cat(
        [
            _torch_math(
                ours, padded_leaf[i : i + 1, :n], padded_leaf[i : i + 1, :n], padded_leaf[i : i + 1, :n], causal
            )[0]
            for i, n in enumerate(lengths)
        ]
    )
    ours_grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    (expected * g).sum().backward()
    torch.testing.assert_close(grad_packed, seg.pack(padded_leaf.grad), **TOL)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(ours_grads[name], p.grad, **TOL)


def _torch_math(module, q, k, v, causal):
    """torch's MultiheadAttention on one unpadded (1, L, E) sequence (batch_first); causal is bottom-right
    aligned. need_weights=False: torch's SDPA gives a query that sees no key zero attention, as varlen does."""
    mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).triu(k.shape[1] - q.shape[1] + 1) if causal else None
    if q.shape[1] == 0:
        return q.new_zeros(0, module.embed_dim), None
    out, _ = nn.MultiheadAttention.forward(module, q, k, v, attn_mask=mask, need_weights=False)
    return out[0], None


def test_packed_cross_attention_with_key_segments():
    seg_q, seg_k = Segments.from_lengths([2, 4, 1, 3]), Segments.from_lengths([5, 1, 3, 3])
    ref, ours = make_pair(dict(embed_dim=8, num_heads=2, kdim=6, vdim=5, batch_first=True), seed=9)
    q = torch.randn(seg_q.total, 8)
    k, v = torch.randn(seg_k.total, 6), torch.randn(seg_k.total, 5)
    for causal in (False, True):
        out, _ = ours(q, k, v, segments=seg_q, key_segments=seg_k, need_weights=False, is_causal=causal)
        assert ours.last_path == "varlen"
        oq, ok = seg_q.offsets.tolist(), seg_k.offsets.tolist()
        expected = torch.cat(
            [
                _torch_math(
                    ref, q[None, oq[i] : oq[i + 1]], k[None, ok[i] : ok[i + 1]], v[None, ok[i] : ok[i + 1]], causal
                )[0]
                for i in range(seg_q.num_segments)
            ]
        )
        torch.testing.assert_close(out, expected, **TOL)


def test_varlen_path_projects_only_real_tokens(monkeypatch):
    """Only real tokens are projected: the input projection sees total rows, not N * max_len."""
    _, ours = make_pair(dict(embed_dim=8, num_heads=2, batch_first=True), seed=10)
    seen = []
    original = torch.nn.functional.linear

    def spy(x, w, b=None):
        seen.append(x.shape[0])
        return original(x, w, b)

    kpm = _prefix_mask([1, 6, 2], 6)
    x = torch.randn(3, 6, 8)
    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    ours(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert ours.last_path == "varlen"
    assert seen == [9, 9]  # the fused q/k/v projection and the output projection


# -- dropout ------------------------------------------------------------------------------------------


def test_dropout_on_torch_path_is_seed_equivalent():
    ref, ours = make_pair(dict(embed_dim=8, num_heads=2, dropout=0.3), seed=11)
    x = torch.randn(5, 2, 8)
    torch.manual_seed(123)
    out_r, w_r = ref(x, x, x)
    torch.manual_seed(123)
    out_o, w_o = ours(x, x, x)
    assert ours.last_path == "torch"
    torch.testing.assert_close(out_o, out_r, **TOL)
    torch.testing.assert_close(w_o, w_r, **TOL)


def test_dropout_on_varlen_path_is_unbiased_and_off_in_eval():
    torch.manual_seed(12)
    ours = MultiheadAttention(8, 2, dropout=0.5, batch_first=True)
    x = torch.randn(2, 6, 8)
    kpm = _prefix_mask([6, 4], 6)
    ours.eval()
    clean, _ = ours(x, x, x, key_padding_mask=kpm, need_weights=False)
    again, _ = ours(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert torch.equal(clean, again)
    ours.train()
    # 300 independent draws in one call: the same two sequences repeated along the batch.
    with torch.no_grad():
        draws, _ = ours(
            x.repeat(150, 1, 1),
            x.repeat(150, 1, 1),
            x.repeat(150, 1, 1),
            key_padding_mask=kpm.repeat(150, 1),
            need_weights=False,
        )
    assert ours.last_path == "varlen"
    draws = draws.view(150, 2, 6, 8)
    assert not torch.equal(draws[0], draws[1])
    # Dropout on the weights is unbiased, and the output is linear in them: the mean converges to eval.
    spread = draws.std(0) / 150**0.5
    valid = ~kpm[..., None].expand_as(clean)
    assert bool(((draws.mean(0) - clean).abs() <= 5 * spread + 1e-6)[valid].all())


# -- mask dtypes --------------------------------------------------------------------------------------

# bf16 on the varlen path rounds differently from torch's SDPA; fp16 keeps 3 more mantissa bits.
DTYPE_TOL = {torch.float32: TOL, torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=4e-3, atol=4e-3)}


def _additive(blocked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(blocked.shape, dtype=dtype).masked_fill(blocked, float("-inf"))


@pytest.mark.parametrize("self_attention", [True, False])
@pytest.mark.parametrize("kind", ["bool", "float32", "query_dtype", "float32_additive", "query_dtype_additive"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_key_padding_mask_of_any_dtype_torch_takes(dtype, batch_first, kind, self_attention):
    """A float key_padding_mask need not have the query's dtype (torch hands it to SDPA, which takes float32
    too). 0/-inf prefix padding runs varlen; any other values are added to the scores, so torch's path."""
    ref, ours = make_pair(dict(embed_dim=8, num_heads=2, batch_first=batch_first), seed=14)
    ref.to(dtype)
    ours.to(dtype)
    gen = torch.Generator().manual_seed(14)
    pad = _prefix_mask([5, 2, 4], 5)
    mask_dtype = dtype if kind.startswith("query_dtype") else torch.float32
    if kind == "bool":
        kpm = pad
    elif kind.endswith("_additive"):
        kpm = torch.randn(pad.shape, generator=gen).masked_fill(pad, float("-inf")).to(mask_dtype)
    else:
        kpm = _additive(pad, mask_dtype)

    def layout(t):
        return (t if batch_first else t.transpose(0, 1)).to(dtype)

    key = layout(torch.randn(3, 5, 8, generator=gen))
    query = key if self_attention else layout(torch.randn(3, 4, 8, generator=gen))
    out_r, _ = ref(query, key, key, key_padding_mask=kpm, need_weights=False)
    out_o, _ = ours(query, key, key, key_padding_mask=kpm, need_weights=False)
    if kind.endswith("_additive"):
        assert ours.last_path == "torch"
        assert torch.equal(out_o, out_r)
        return
    assert ours.last_path == "varlen"
    valid = ~pad if self_attention else torch.ones(3, 4, dtype=torch.bool)
    if not batch_first:
        out_o, out_r = out_o.transpose(0, 1), out_r.transpose(0, 1)
    torch.testing.assert_close(out_o[valid], out_r[valid], **DTYPE_TOL[dtype])
    assert bool((out_o[~valid] == 0).all())


MASK_DTYPES = [None, torch.bool, torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mask_dtypes_accepted_exactly_where_torch_accepts_them(dtype):
    """Every combination of mask dtypes, need_weights and is_causal: ours raises where torch raises (torch
    adds the masks and gives SDPA their sum, or baddbmm with need_weights), otherwise the results agree."""
    ref, ours = make_pair(dict(embed_dim=8, num_heads=2, batch_first=True), seed=15)
    ref.to(dtype)
    ours.to(dtype)
    x = torch.randn(2, 4, 8).to(dtype)
    pad = _prefix_mask([4, 3], 4)
    causal = torch.ones(4, 4, dtype=torch.bool).triu(1)
    refused = foreign_on_varlen = 0
    for kpm_dtype in MASK_DTYPES:
        for mask_dtype in MASK_DTYPES:
            for need_weights in (False, True):
                for is_causal in (False, True) if mask_dtype is not None else (False,):
                    kwargs = dict(
                        need_weights=need_weights,
                        is_causal=is_causal,
                        key_padding_mask=None
                        if kpm_dtype is None
                        else pad
                        if kpm_dtype is torch.bool
                        else _additive(pad, kpm_dtype),
                        attn_mask=None
                        if mask_dtype is None
                        else causal
                        if mask_dtype is torch.bool
                        else _additive(causal, mask_dtype),
                    )
                    call = f"{dtype} query, key_padding_mask {kpm_dtype}, attn_mask {mask_dtype}, {kwargs}"
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # torch deprecates mixing mask types; both warn
                        try:
                            out_r, w_r = ref(x, x, x, **kwargs)
                        except RuntimeError:
                            with pytest.raises((TypeError, RuntimeError), match="mask|dtype"):
                                ours(x, x, x, **kwargs)
                            refused += 1
                            continue
                        out_o, w_o = ours(x, x, x, **kwargs)
                    foreign_on_varlen += ours.last_path == "varlen" and any(
                        d not in (None, torch.bool, dtype) for d in (kpm_dtype, mask_dtype)
                    )
                    valid = ~pad if (ours.last_path == "varlen" and kpm_dtype is not None) else torch.ones_like(pad)
                    torch.testing.assert_close(out_o[valid], out_r[valid], **DTYPE_TOL[dtype], msg=call)
                    if need_weights:
                        torch.testing.assert_close(w_o, w_r, **DTYPE_TOL[dtype], msg=call)
    assert refused and foreign_on_varlen, (refused, foreign_on_varlen)


# -- TorchScript --------------------------------------------------------------------------------------

# torch 2.13 deprecates TorchScript (torch.jit.script/save/load warn); it still works, and so must we.
torchscript = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


@torchscript
@pytest.mark.parametrize("ctor", CTORS)
def test_torchscript_scripts_torchs_module_with_the_same_parameters(ctor):
    ref, ours = make_pair(ctor, seed=16)
    ref.eval()
    ours.eval()
    if not ctor.get("bias", True):
        # torch's own forward does not script with in_proj_bias None (it reads the Optional attribute's
        # dtype), so neither does ours; a failed compile cannot be retried in-process to compare the two.
        with pytest.raises(RuntimeError, match="in_proj_bias"):
            torch.jit.script(ours)
        return
    scripted = torch.jit.script(ours)
    assert not scripted.training
    own = dict(ours.named_parameters())
    assert dict(scripted.named_parameters()).keys() == own.keys()
    assert all(p is own[name] for name, p in scripted.named_parameters()), "parameters are shared"
    e, kdim, vdim = ctor["embed_dim"], ctor.get("kdim") or ctor["embed_dim"], ctor.get("vdim") or ctor["embed_dim"]
    q, k, v = torch.randn(4, 3, e), torch.randn(5, 3, kdim), torch.randn(5, 3, vdim)
    if ctor.get("batch_first"):
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    kpm = _prefix_mask([5, 2, 4], 5)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    for need_weights in (False, True):
        out_r, w_r = ref(q, k, v, key_padding_mask=kpm, need_weights=need_weights)
        for module in (scripted, loaded):
            out_s, w_s = module(q, k, v, key_padding_mask=kpm, need_weights=need_weights)
            torch.testing.assert_close(out_s, out_r, **TOL)
            if need_weights:
                torch.testing.assert_close(w_s, w_r, **TOL)


@torchscript
@pytest.mark.parametrize("batch_first", [False, True])
def test_torchscript_of_a_model_holding_one(batch_first):
    torch.manual_seed(17)
    layer = dict(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=batch_first)
    ref = nn.TransformerEncoderLayer(**layer)
    model = nn.TransformerEncoderLayer(**layer)
    model.self_attn = MultiheadAttention(8, 2, batch_first=batch_first)
    model.load_state_dict(ref.state_dict())
    ours = model.self_attn
    scripted = torch.jit.script(model)
    src = torch.randn(3, 5, 8)
    if not batch_first:
        src = src.transpose(0, 1)
    pad = _prefix_mask([5, 2, 4], 5)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    for kwargs in (
        dict(src_key_padding_mask=pad),
        dict(src_mask=causal, is_causal=True),
        dict(src_mask=causal, src_key_padding_mask=_additive(pad, torch.float32)),
    ):
        torch.testing.assert_close(scripted(src, **kwargs), ref(src, **kwargs), **TOL)
    # Documented: torch.jit.script puts the torch module it scripts into the eager model as well.
    assert type(model.self_attn) is nn.MultiheadAttention
    assert model.self_attn.in_proj_weight is ours.in_proj_weight
    assert model.self_attn.out_proj is ours.out_proj


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("query_not_tensor", TypeError, "query"),
        ("query_4d", ValueError, "query"),
        ("key_features", ValueError, "key"),
        ("value_dim", ValueError, "value"),
        ("batch_mismatch", ValueError, "batch size"),
        ("query_dtype", TypeError, "query"),
        ("kpm_shape", ValueError, "key_padding_mask"),
        ("kpm_dtype", TypeError, "key_padding_mask"),
        ("mask_shape", ValueError, "attn_mask"),
        ("mask_dtype", TypeError, "attn_mask"),
        ("is_causal_type", TypeError, "is_causal"),
        ("segments_type", TypeError, "segments"),
        ("segments_total", ValueError, "query"),
        ("segments_weights", ValueError, "need_weights"),
        ("segments_mask", ValueError, "key_padding_mask"),
        ("segments_cross_without_keys", ValueError, "key_segments"),
        ("key_segments_count", ValueError, "same number of segments"),
    ],
)
def test_bad_input_raises(case, error, match):
    ours = MultiheadAttention(8, 2, kdim=6)
    plain = MultiheadAttention(8, 2)
    q, k, v = torch.randn(4, 2, 8), torch.randn(5, 2, 6), torch.randn(5, 2, 8)
    seg = Segments.from_lengths([1, 3])
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    calls = {
        "query_not_tensor": lambda: ours(q.tolist(), k, v),
        "query_4d": lambda: ours(q[None], k[None], v[None]),
        "key_features": lambda: ours(q, v, v),
        "value_dim": lambda: ours(q, k, v[:, 0]),
        "batch_mismatch": lambda: ours(q, k[:, :1], v[:, :1]),
        "query_dtype": lambda: ours(q.double(), k, v),
        "kpm_shape": lambda: ours(q, k, v, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)),
        "kpm_dtype": lambda: ours(q, k, v, key_padding_mask=torch.zeros(2, 5, dtype=torch.int64)),
        "mask_shape": lambda: ours(q, k, v, attn_mask=torch.zeros(5, 4, dtype=torch.bool)),
        "mask_dtype": lambda: ours(q, k, v, attn_mask=torch.zeros(4, 5, dtype=torch.int32)),
        "is_causal_type": lambda: ours(q, k, v, attn_mask=torch.zeros(4, 5), is_causal=1),
        "segments_type": lambda: plain(x, x, x, segments=[1, 3], need_weights=False),
        "segments_total": lambda: plain(x[:3], x[:3], x[:3], segments=seg, need_weights=False),
        "segments_weights": lambda: plain(x, x, x, segments=seg),
        "segments_mask": lambda: plain(
            x, x, x, segments=seg, need_weights=False, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool)
        ),
        "segments_cross_without_keys": lambda: plain(x, y, y, segments=seg, need_weights=False),
        "key_segments_count": lambda: plain(
            x, y, y, segments=seg, key_segments=Segments.from_lengths([4]), need_weights=False
        ),
    }
    with pytest.raises(error, match=match):
        calls[case]()


def test_exported_from_package():
    assert hierkern.MultiheadAttention is MultiheadAttention
    assert "MultiheadAttention" in hierkern.__all__


# -- torch.compile ----------------------------------------------------------------------------------


@pytest.mark.parametrize("self_attention, backend", [(True, "inductor"), (False, "aot_eager")])
def test_fullgraph_compile_of_the_varlen_path_reads_no_mask_on_the_host(self_attention, backend, monkeypatch):
    """fullgraph=True fails on any host read of a tensor value (a graph break); a second call with other
    padding must reuse the graph (no value was guarded on) and match eager mode, gradients included."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch.manual_seed(0)
    mha = MultiheadAttention(16, 4, batch_first=True)
    query = torch.randn(3, 6, 16)
    memory = query if self_attention else torch.randn(3, 7, 16)

    def attend(q, kv, kpm):
        return mha(q, kv, kv, key_padding_mask=kpm, need_weights=False)[0]

    compiled = torch.compile(attend, fullgraph=True, backend=backend)
    src_len = memory.shape[1]
    for lengths in ([2, src_len, 1], [src_len, 3, 4]):
        kpm = torch.arange(src_len)[None, :] >= torch.tensor(lengths)[:, None]
        results = []
        for fn in (attend, compiled):
            q = query.clone().requires_grad_()
            kv = q if self_attention else memory.clone().requires_grad_()
            mha.last_path = None
            out = fn(q, kv, kpm)
            assert mha.last_path == "varlen"
            grads = torch.autograd.grad(
                out.square().sum(), [q] + ([] if self_attention else [kv]) + list(mha.parameters())
            )
            results.append((out.detach(), grads))
        (eager_out, eager_grads), (compiled_out, compiled_grads) = results
        torch.testing.assert_close(compiled_out, eager_out, **TOL)
        for got, want in zip(compiled_grads, eager_grads):
            torch.testing.assert_close(got, want, **TOL)


def test_fullgraph_compile_with_dropout_draws_a_fresh_mask_every_call():
    """The dropout seed is a tensor drawn inside the graph (torch's generator, on the inputs' device for the
    GPU backends), not a host constant that tracing would freeze into the graph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    mha = MultiheadAttention(16, 4, dropout=0.5, batch_first=True).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    kpm = torch.arange(5)[None, :] >= torch.tensor([5, 3])[:, None]
    compiled = torch.compile(
        lambda t, m: mha(t, t, t, key_padding_mask=m, need_weights=False)[0], fullgraph=True, backend="aot_eager"
    )
    first, second = compiled(x, kpm), compiled(x, kpm)
    assert mha.last_path == "varlen"
    valid = ~kpm
    assert not torch.equal(first[valid], second[valid])
    (grad,) = torch.autograd.grad((first + second).sum(), x)
    assert bool(torch.isfinite(grad).all())
