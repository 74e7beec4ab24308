"""Packed encoder layers, positional encodings, pooling and HierarchicalEncoder.

Equivalence tests run in float64 against torch's padded modules (or per-segment loops) with copied weights.
"""

import math

import pytest
import torch
from torch import nn

import hierkern
from hierkern import CharVocab, Segments, TextBatch
from hierkern.nn.layers import (
    AttentionPooling,
    LearnedPositionalEncoding,
    PackedTransformerEncoder,
    PackedTransformerEncoderLayer,
    SegmentPooling,
    SinusoidalPositionalEncoding,
    prepend_token,
    segment_max,
    segment_mean,
)

DIM, HEADS = 16, 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tensors are tiny: on a shared 2-core machine intra-op threads cost far more than they save.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "Hello, world!",
    "a",
    "Pack my box with five dozen liquor jugs",
    "Zebras? Yes: zebras, quite unexpectedly.",
]


def _padded_input(lengths, generator, dtype=torch.float64):
    seg = Segments.from_lengths(lengths)
    x = torch.randn(seg.total, DIM, generator=generator, dtype=dtype)
    return seg, x, seg.unpack(x), seg.padding_mask()


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_layer_matches_torch_encoder_layer(norm_first, activation):
    g = torch.Generator().manual_seed(0)
    torch_layer = nn.TransformerEncoderLayer(
        DIM,
        HEADS,
        dim_feedforward=24,
        dropout=0.0,
        activation=activation,
        norm_first=norm_first,
        batch_first=True,
        dtype=torch.float64,
    )
    layer = PackedTransformerEncoderLayer(
        DIM, HEADS, dim_feedforward=24, dropout=0.0, activation=activation, norm_first=norm_first, dtype=torch.float64
    )
    layer.load_state_dict(torch_layer.state_dict())  # same parameter names and shapes
    seg, x, padded, mask = _padded_input([5, 1, 9, 3, 17, 2], g)
    expected = seg.pack(torch_layer(padded, src_key_padding_mask=mask))
    torch.testing.assert_close(layer(x, seg), expected, rtol=1e-10, atol=1e-10)


def test_stack_matches_torch_encoder_outputs_and_gradients():
    g = torch.Generator().manual_seed(1)
    torch_layer = nn.TransformerEncoderLayer(
        DIM, HEADS, dim_feedforward=32, dropout=0.0, batch_first=True, norm_first=True, dtype=torch.float64
    )
    reference = nn.TransformerEncoder(
        torch_layer, 3, norm=nn.LayerNorm(DIM, dtype=torch.float64), enable_nested_tensor=False
    )
    packed = PackedTransformerEncoder(
        PackedTransformerEncoderLayer(DIM, HEADS, 32, 0.0, norm_first=True, dtype=torch.float64),
        3,
        norm=nn.LayerNorm(DIM, dtype=torch.float64),
    )
    packed.load_state_dict(reference.state_dict())
    seg, x, _, mask = _padded_input([4, 7, 1, 12, 3], g)
    x_ref = x.clone().requires_grad_()
    x_packed = x.clone().requires_grad_()
    out_ref = seg.pack(reference(seg.unpack(x_ref), src_key_padding_mask=mask))
    out = packed(x_packed, seg)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out_ref * weights).sum().backward()
    (out * weights).sum().backward()
    torch.testing.assert_close(x_packed.grad, x_ref.grad, rtol=1e-9, atol=1e-9)
    for (name, p_ref), p in zip(reference.named_parameters(), packed.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-9, msg=name)


def test_zero_length_segments_pass_through_layers():
    layer = PackedTransformerEncoderLayer(DIM, HEADS, 32, dropout=0.0)
    seg = Segments.from_lengths([0, 3, 0, 0, 2, 0])
    out = layer(torch.randn(seg.total, DIM), seg)
    assert out.shape == (5, DIM) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="segments covers"):
        layer(torch.randn(4, DIM), seg)
    with pytest.raises(TypeError, match="segments"):
        layer(torch.randn(5, DIM), [3, 2])


def test_positional_encodings_restart_in_every_segment():
    seg = Segments.from_lengths([3, 0, 1, 4])
    positions = [0, 1, 2, 0, 0, 1, 2, 3]
    sinus = SinusoidalPositionalEncoding(6)(seg)
    expected = torch.tensor(
        [[f(p / 10000 ** (2 * (i // 2) / 6)) for i, f in zip(range(6), [math.sin, math.cos] * 3)] for p in positions]
    )
    torch.testing.assert_close(sinus, expected.float())
    learned = LearnedPositionalEncoding(4, 6)
    torch.testing.assert_close(learned(seg), learned.embedding.weight[positions])
    with pytest.raises(ValueError, match="max_len=3"):
        LearnedPositionalEncoding(3, 6)(seg)
    with pytest.raises(ValueError, match="even"):
        SinusoidalPositionalEncoding(5)


def _loop_attention_pool(pool: AttentionPooling, x, seg):
    """Per-segment, per-head softmax in float64: the obvious definition."""
    out = []
    for s in range(seg.num_segments):
        a, b = seg.offsets[s].item(), seg.offsets[s + 1].item()
        k, v = pool.kv_proj(x[a:b]).view(b - a, 2, pool.num_heads, pool.head_dim).unbind(1)
        heads = []
        for h in range(pool.num_heads):
            if b == a:
                heads.append(x.new_zeros(pool.head_dim))
                continue
            weights = torch.softmax(k[:, h] @ pool.query[h] / math.sqrt(pool.head_dim), dim=0)
            heads.append(weights @ v[:, h])
        out.append(torch.cat(heads))
    return pool.out_proj(torch.stack(out))


def test_pooling_matches_per_segment_loops_and_empty_segments_give_zeros():
    g = torch.Generator().manual_seed(2)
    seg = Segments.from_lengths([3, 0, 1, 6, 0, 2])
    x = torch.randn(seg.total, DIM, generator=g, dtype=torch.float64, requires_grad=True)
    pieces = [x[a:b] for a, b in zip(seg.offsets[:-1].tolist(), seg.offsets[1:].tolist())]
    zeros = x.new_zeros(DIM)
    mean = torch.stack([p.mean(0) if len(p) else zeros for p in pieces])
    largest = torch.stack([p.amax(0) if len(p) else zeros for p in pieces])
    torch.testing.assert_close(segment_mean(x, seg), mean)
    torch.testing.assert_close(segment_max(x, seg), largest)
    torch.testing.assert_close(SegmentPooling("mean")(x, seg), mean)
    pool = AttentionPooling(DIM, HEADS).double()
    out = pool(x, seg)
    torch.testing.assert_close(out, _loop_attention_pool(pool, x, seg))
    torch.testing.assert_close(out[[1, 4]], pool.out_proj.bias.expand(2, -1))
    loss = segment_mean(x, seg).sum() + segment_max(x, seg).sum() + out.sum()
    loss.backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="mode"):
        SegmentPooling("cls")


def test_prepend_token():
    seg = Segments.from_lengths([2, 0, 3])
    ids, grown = prepend_token(torch.tensor([5, 6, 7, 8, 9]), seg, 2)
    assert ids.tolist() == [2, 5, 6, 2, 2, 7, 8, 9]
    assert grown.offsets.tolist() == [0, 3, 4, 8] and grown.max_len == 4 and grown.total == 8


def _encoder(vocab, pooling, positional="sinusoidal", dropout=0.0):
    torch.manual_seed(0)
    return (
        hierkern.HierarchicalEncoder(
            len(vocab),
            DIM,
            HEADS,
            char_layers=2,
            word_layers=2,
            pooling=pooling,
            positional=positional,
            dropout=dropout,
            max_word_len=24,
            max_sentence_len=32,
        )
        .double()
        .eval()
    )


@pytest.mark.parametrize("pooling", hierkern.nn.layers.POOLING_MODES)
def test_sentence_output_independent_of_other_sentences(pooling):
    vocab = CharVocab.from_texts(SENTENCES)
    encoder = _encoder(vocab, pooling)
    full = encoder(TextBatch.from_sentences(SENTENCES, vocab))
    offsets = TextBatch.from_sentences(SENTENCES, vocab).sentences.offsets.tolist()
    for i, sentence in enumerate(SENTENCES):
        alone = encoder(TextBatch.from_sentences([sentence], vocab))
        torch.testing.assert_close(full[offsets[i] : offsets[i + 1]], alone, rtol=1e-10, atol=1e-10)
    swapped = encoder(TextBatch.from_sentences(SENTENCES[::-1], vocab))
    torch.testing.assert_close(swapped[: offsets[-1] - offsets[-2]], full[offsets[-2] :], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pooling", hierkern.nn.layers.POOLING_MODES)
def test_word_vector_independent_of_other_words(pooling):
    vocab = CharVocab.from_texts(SENTENCES)
    encoder = _encoder(vocab, pooling, positional="learned")
    batch = TextBatch.from_sentences(SENTENCES, vocab)
    words = [w for sentence in batch.sentence_words(vocab) for w in sentence]
    vectors = encoder.embed_words(batch)
    # Every word as a one-word sentence of its own, in reverse order.
    alone = encoder.embed_words(TextBatch.from_sentences(words[::-1], vocab)).flip(0)
    torch.testing.assert_close(vectors, alone, rtol=1e-10, atol=1e-10)
    context = encoder(batch)
    assert context.shape == vectors.shape == (batch.num_words, DIM)
    # ... while the word stage does mix words: "the" differs in two contexts.
    the = [i for i, w in enumerate(words) if w == "the"]
    assert torch.allclose(vectors[the[0]], vectors[the[1]]) and not torch.allclose(context[the[0]], context[the[1]])


@pytest.mark.parametrize("pooling", hierkern.nn.layers.POOLING_MODES)
@pytest.mark.parametrize("positional", ["sinusoidal", "learned"])
def test_gradients_reach_every_parameter(pooling, positional):
    vocab = CharVocab.from_texts(SENTENCES)
    encoder = _encoder(vocab, pooling, positional, dropout=0.1).train()
    batch = TextBatch.from_sentences(SENTENCES, vocab)
    out = encoder(batch)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("pooling", hierkern.nn.layers.POOLING_MODES)
def test_empty_words_do_not_nan(pooling):
    vocab = CharVocab.from_texts(SENTENCES)
    encoder = _encoder(vocab, pooling)
    batch = TextBatch(
        torch.tensor(vocab.encode("abcd")), Segments.from_lengths([2, 0, 2, 0]), Segments.from_lengths([3, 1])
    )
    out = encoder(batch)
    assert out.shape == (4, DIM) and torch.isfinite(out).all()


def test_encoder_rejects_bad_arguments():
    vocab = CharVocab.from_texts(SENTENCES)
    with pytest.raises(ValueError, match="pooling"):
        hierkern.HierarchicalEncoder(len(vocab), DIM, HEADS, 1, 1, pooling="sum")
    with pytest.raises(ValueError, match="positional"):
        hierkern.HierarchicalEncoder(len(vocab), DIM, HEADS, 1, 1, positional="rotary")
    with pytest.raises(ValueError, match="multiple of nhead"):
        hierkern.HierarchicalEncoder(len(vocab), DIM, 5, 1, 1)
    encoder = _encoder(vocab, "mean")
    with pytest.raises(TypeError, match="TextBatch"):
        encoder(["The quick brown fox."])
    with pytest.raises(ValueError, match="max_len=25"):
        _encoder(vocab, "cls", positional="learned").embed_words(
            TextBatch.from_sentences(["x" * 30], vocab, max_word_len=30)
        )
