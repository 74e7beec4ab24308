"""hierkern::dropout / hierkern::dropout_add (csrc/cpu/dropout_*.{h,cpp}, hierkern/ops/dropout.py): the mask is
hierkern.philox's element layout bit for bit, the keep rate is 1 - p, the backward regenerates the forward's
mask, and the nn layers use the ops in training only."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import hierkern
from hierkern.ops import dropout as hk_dropout
from hierkern.ops import extension
from hierkern.philox import element_keep

pytestmark = pytest.mark.skipif(
    not hk_dropout._use_kernel(torch.zeros(1), 0.5),
    reason=f"hierkern's C++ dropout is unavailable: {extension.load_error()}",
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# seed and offset with their high words set, so the key's seed_hi ^ offset_hi and offset_lo both matter.
STATE = torch.tensor([0x1234_5678_9ABC_DEF0 >> 2, (7 << 32) + 12345], dtype=torch.int64)


def dropout_op(x, p, state):
    return torch.ops.hierkern.dropout(x, p, state)


def expected(x, p, state, residual=None):
    """What the ops compute: x * factor (+ residual), factor = 1 / (1 - p) where kept, else 0, in x's
    precision for float64 and in float32 otherwise, rounded once."""
    keep = element_keep(state, x.numel(), p).view(x.shape)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = torch.tensor(1.0 / (1.0 - p), dtype=compute)
    out = x.to(compute) * torch.where(keep, scale, torch.zeros((), dtype=compute))
    if residual is not None:
        out = residual.to(compute) + out
    return out.to(x.dtype), keep


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [1, 31, 32, 33, 1000, 70_001])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_is_the_element_layout(dtype, numel, p):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel)).to(dtype)
    want, keep = expected(x, p, STATE)
    got = dropout_op(x, p, STATE)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, want)
    assert torch.equal(got != 0, keep & (x != 0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_add_is_residual_plus_dropout(dtype):
    gen = torch.Generator().manual_seed(1)
    x, residual = (torch.randn(37, 50, generator=gen).to(dtype) for _ in range(2))
    want, _ = expected(x, 0.3, STATE, residual)
    got = torch.ops.hierkern.dropout_add(residual, x, 0.3, STATE)
    # The AVX2 build may fuse the multiply and the add (one rounding instead of two).
    tol = {torch.float64: 1e-15, torch.float32: 1e-6}.get(dtype, 1e-2)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.97])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keep_rate_is_one_minus_p(p, seed):
    """Kept count within 6 standard deviations of a Binomial(n, 1 - p): a fixed state, so no flakiness, and
    a bound a biased generator (or a threshold off by a bit) would exceed."""
    n = 1 << 20
    state = torch.tensor([seed, 99], dtype=torch.int64)
    kept = int((dropout_op(torch.ones(n), p, state) != 0).sum())
    assert abs(kept - n * (1 - p)) <= 6 * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True])
def test_backward_is_grad_times_the_forward_mask(dtype, fused):
    p = 0.4
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 77, generator=gen).to(dtype).requires_grad_()
    residual = torch.randn(8, 77, generator=gen).to(dtype).requires_grad_()
    grad = torch.randn(8, 77, generator=gen).to(dtype)
    out = torch.ops.hierkern.dropout_add(residual, x, p, STATE) if fused else dropout_op(x, p, STATE)
    out.backward(grad)
    want, _ = expected(grad, p, STATE)
    assert torch.equal(x.grad, want)
    if fused:
        assert torch.equal(residual.grad, grad)


def test_gradcheck_and_gradgradcheck():
    gen = torch.Generator().manual_seed(3)
    x, residual = (torch.randn(5, 9, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(2))
    fn = lambda r, t: torch.ops.hierkern.dropout_add(r, dropout_op(t, 0.3, STATE), 0.6, STATE + 1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (residual, x))
    assert torch.autograd.gradgradcheck(fn, (residual, x))


def test_same_state_same_mask_and_other_states_other_masks():
    x = torch.ones(4096)
    first = dropout_op(x, 0.5, STATE)
    assert torch.equal(first, dropout_op(x, 0.5, STATE.clone()))
    for other in ([STATE[0], STATE[1] + 1], [STATE[0], STATE[1] + (1 << 32)], [STATE[0] + 1, STATE[1]]):
        assert not torch.equal(first, dropout_op(x, 0.5, torch.tensor(other)))


def test_element_draws_never_repeat_attention_draws():
    """The tag in counter word 2 is no head: even where the other counter words coincide (element block b at
    query b, key 0, offset_lo), the words differ."""
    from hierkern.philox import ELEMENT_TAG, philox4x32_10_words

    block = torch.arange(64)
    zero = torch.zeros((), dtype=torch.int64)
    element = philox4x32_10_words(block, zero, torch.tensor(ELEMENT_TAG), zero, 5, 6)[0]
    for head in range(8):
        attention = philox4x32_10_words(block, zero, torch.tensor(head), zero, 5, 6)[0]
        assert not torch.equal(element, attention)


@pytest.mark.parametrize("fused", [False, True])
def test_strided_inputs_count_elements_in_row_major_order(fused):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(40, 24, generator=gen).t()  # (24, 40), transposed strides
    residual = torch.randn(24, 80, generator=gen)[:, ::2]  # every other column
    if fused:
        got = torch.ops.hierkern.dropout_add(residual, x, 0.5, STATE)
        want = torch.ops.hierkern.dropout_add(residual.contiguous(), x.contiguous(), 0.5, STATE)
    else:
        got, want = dropout_op(x, 0.5, STATE), dropout_op(x.contiguous(), 0.5, STATE)
    assert got.is_contiguous() and torch.equal(got, want)


def test_empty_tensors():
    x = torch.empty(0, 16, requires_grad=True)
    out = torch.ops.hierkern.dropout_add(torch.empty(0, 16), x, 0.5, STATE)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert x.grad.shape == (0, 16)


def test_p_zero_keeps_everything():
    x = torch.randn(100)
    assert torch.equal(dropout_op(x, 0.0, STATE), x)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x: dropout_op(x, 1.0, STATE), ValueError, r"p must be in \[0, 1\), got 1"),
        (lambda x: dropout_op(x, -0.1, STATE), ValueError, r"p must be in \[0, 1\), got -0.1"),
        (lambda x: dropout_op(x, float("nan"), STATE), ValueError, r"p must be in \[0, 1\), got nan"),
        (lambda x: dropout_op(x.long(), 0.5, STATE), TypeError, "x must be float32, float64, bfloat16 or float16"),
        (lambda x: dropout_op(x, 0.5, STATE.int()), ValueError, "rng_state must be an int64 CPU tensor"),
        (lambda x: dropout_op(x, 0.5, STATE[:1]), ValueError, "rng_state must be an int64 CPU tensor"),
        (lambda x: torch.ops.hierkern.dropout_add(x[:2], x, 0.5, STATE), ValueError, "residual must have x's shape"),
        (
            lambda x: torch.ops.hierkern.dropout_add(x.double(), x, 0.5, STATE),
            TypeError,
            "residual must have x's dtype",
        ),
    ],
)
def test_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 40, generator=gen).to(dtype).requires_grad_()
    residual = torch.randn(6, 40, generator=gen).to(dtype).requires_grad_()
    torch.library.opcheck(torch.ops.hierkern.dropout.default, (x, 0.25, STATE))
    torch.library.opcheck(torch.ops.hierkern.dropout_add.default, (residual, x, 0.25, STATE))


def test_fullgraph_compile_matches_eager():
    """The ops trace (fakes registered), and rng_state is drawn inside the graph: fresh masks each call,
    the same ones as eager for the same torch seed."""
    torch._dynamo.reset()

    def step(residual, x):
        return hk_dropout.dropout_add(residual, hk_dropout.dropout(x, 0.3), 0.5)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(6)
    residual, x = (torch.randn(10, 33, generator=gen) for _ in range(2))
    results = []
    for fn in (step, compiled):
        torch.manual_seed(0)
        leaf = x.clone().requires_grad_()
        out = fn(residual, leaf)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), leaf.grad, fn(residual, x)))
    (eager, eager_grad, eager_again), (got, got_grad, got_again) = results
    assert torch.equal(got, eager) and torch.equal(got_grad, eager_grad)
    assert not torch.equal(got, got_again)


def test_fullgraph_compile_of_an_encoder_in_training_traces_the_ops():
    torch._dynamo.reset()
    torch.manual_seed(0)
    encoder = hierkern.TransformerEncoder(
        hierkern.TransformerEncoderLayer(8, 2, 16, 0.3, batch_first=True), 2, enable_nested_tensor=False
    ).train()
    x = torch.randn(3, 5, 8)
    pad = torch.arange(5)[None, :] >= torch.tensor([5, 2, 3])[:, None]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda src: encoder(src, src_key_padding_mask=pad), fullgraph=True, backend=backend)
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(compiled(x))
    targets = [str(node.target) for node in graphs[0].graph.nodes]
    assert sum(t.startswith("hierkern.dropout_add") for t in targets) == 4
    assert sum(t in ("hierkern.dropout", "hierkern.dropout.default") for t in targets) == 2
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_falls_back_to_torch_where_the_kernel_does_not_apply():
    x = torch.randn(64)
    assert torch.equal(hk_dropout.dropout(x, 1.0), torch.zeros(64))
    assert hk_dropout.dropout(x, 0.5, training=False) is x
    with pytest.raises(ValueError, match="dropout probability"):
        hk_dropout.dropout(x, 1.5)
    assert torch.equal(hk_dropout.dropout(x.long(), 0.0), x.long())


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_uses_the_ops_in_training_only(norm_first):
    torch.manual_seed(0)
    layer = hierkern.TransformerEncoderLayer(16, 4, 32, dropout=0.2, batch_first=True, norm_first=norm_first)
    reference = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.2, batch_first=True, norm_first=norm_first)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5, 16)
    pad = torch.arange(5)[None, :] >= torch.tensor([5, 2, 4])[:, None]
    for training in (True, False):
        layer.train(training)
        with _OpNames() as ops:
            out = layer(x, src_key_padding_mask=pad)
        assert layer.last_path == "varlen"
        assert ops.names.count("hierkern.dropout_add") == 2 * training
        assert ops.names.count("hierkern.dropout") == 1 * training
        assert "aten.bernoulli_" not in ops.names
    with torch.no_grad():
        torch.testing.assert_close(out[~pad], reference.eval()(x, src_key_padding_mask=pad)[~pad])


def test_a_replaced_dropout_module_is_called():
    layer = hierkern.TransformerEncoderLayer(16, 4, 32, dropout=0.2, batch_first=True).train()
    layer.dropout2 = nn.Identity()
    x = torch.randn(2, 5, 16)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    with _OpNames() as ops:
        layer(x, src_key_padding_mask=pad)
    assert ops.names.count("hierkern.dropout_add") == 1


def test_hierarchical_encoder_embedding_dropout_uses_the_op():
    sentences = ["the cat sat", "on the mat today"]
    vocab = hierkern.CharVocab.from_texts(sentences)
    model = hierkern.HierarchicalEncoder(len(vocab), 16, 2, 1, 1, pooling="mean", dropout=0.1).train()
    with _OpNames() as ops:
        model(hierkern.TextBatch.from_sentences(sentences, vocab))
    assert ops.names.count("hierkern.dropout") == 2 + 2  # the embeddings of both stages, one per layer
    assert "aten.bernoulli_" not in ops.names
