"""Segments: construction, derived indices, pack/unpack round trips and gradients, validation messages."""

import numpy as np
import pytest
import torch

from hierkern import Segments
from hierkern.layout import check_offsets

from helpers import offsets_of

LENGTHS = [0, 3, 1, 0, 5, 2, 0]


def _expected_ids_positions(lengths):
    ids = [i for i, n in enumerate(lengths) for _ in range(n)]
    pos = [p for n in lengths for p in range(n)]
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(pos, dtype=torch.int64)


# -- construction -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda l: Segments.from_lengths(l),
        lambda l: Segments.from_lengths(torch.tensor(l, dtype=torch.int32)),
        lambda l: Segments.from_lengths(torch.tensor(l, dtype=torch.int64)),
        lambda l: Segments.from_lengths(np.array(l, dtype=np.int64).tolist()),
        lambda l: Segments.from_lengths(list(np.array(l, dtype=np.int32))),  # numpy integer scalars
        lambda l: Segments.from_lengths(tuple(l)),
        lambda l: Segments(offsets_of(l)),
        lambda l: Segments(offsets_of(l).long()),
    ],
    ids=[
        "list",
        "tensor-int32",
        "tensor-int64",
        "numpy-tolist",
        "numpy-scalars",
        "tuple",
        "offsets-int32",
        "offsets-int64",
    ],
)
def test_properties(make):
    seg = make(LENGTHS)
    assert seg.offsets.dtype == torch.int32
    assert seg.offsets.tolist() == [0, 0, 3, 4, 4, 9, 11, 11]
    assert seg.max_len == 5 and type(seg.max_len) is int
    assert seg.total == 11 and type(seg.total) is int
    assert seg.num_segments == 7
    assert seg.lengths.tolist() == LENGTHS
    assert seg.device == torch.device("cpu")
    ids, pos = _expected_ids_positions(LENGTHS)
    assert seg.segment_ids().dtype == torch.int64 and torch.equal(seg.segment_ids(), ids)
    assert seg.positions().dtype == torch.int64 and torch.equal(seg.positions(), pos)
    assert "num_segments=7" in repr(seg) and "total=11" in repr(seg)


@pytest.mark.parametrize("lengths", [[], [0], [0, 0, 0], [1], [7]], ids=str)
def test_degenerate_lengths(lengths):
    seg = Segments.from_lengths(lengths)
    assert seg.num_segments == len(lengths)
    assert seg.total == sum(lengths) and seg.max_len == max(lengths, default=0)
    assert seg.offsets.tolist() == [0] + list(np.cumsum(lengths, dtype=np.int64))
    assert seg.segment_ids().shape == (seg.total,) and seg.positions().shape == (seg.total,)
    x = torch.randn(seg.total, 2)
    padded = seg.unpack(x)
    assert padded.shape == (len(lengths), seg.max_len, 2)
    assert torch.equal(seg.pack(padded), x)
    assert seg.padding_mask().shape == (len(lengths), seg.max_len)


def test_from_lengths_device_argument():
    seg = Segments.from_lengths([2, 3], device="cpu")
    assert seg.device == torch.device("cpu") and seg.offsets.tolist() == [0, 2, 5]


def test_from_mask_prefix_rows():
    mask = torch.tensor(
        [
            [False, False, True, True],
            [False, False, False, False],
            [True, True, True, True],  # all padding: a zero-length segment
            [False, True, True, True],
        ]
    )
    seg = Segments.from_mask(mask)
    assert seg.lengths.tolist() == [2, 4, 0, 1]
    assert seg.max_len == 4 and seg.total == 7
    assert torch.equal(seg.padding_mask(mask.shape[1]), mask)
    # Packing the padded batch keeps exactly the tokens the mask calls valid, in order.
    x = torch.arange(16.0).view(4, 4)
    assert seg.pack(x).tolist() == [0.0, 1.0, 4.0, 5.0, 6.0, 7.0, 12.0]


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (1, 1)])
def test_from_mask_empty_shapes(shape):
    seg = Segments.from_mask(torch.zeros(shape, dtype=torch.bool))
    assert seg.num_segments == shape[0] and seg.total == shape[0] * shape[1]


def test_from_mask_rejects_non_prefix():
    mask = torch.tensor([[False, True, False], [False, False, True]])
    with pytest.raises(ValueError, match="key_padding_mask.*prefix"):
        Segments.from_mask(mask)


def test_from_mask_rejects_bad_types_and_shapes():
    with pytest.raises(TypeError, match="key_padding_mask.*bool"):
        Segments.from_mask(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="key_padding_mask.*bool"):
        Segments.from_mask(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="key_padding_mask.*torch.Tensor"):
        Segments.from_mask([[False, True]])
    with pytest.raises(ValueError, match=r"key_padding_mask.*\(B, L\)"):
        Segments.from_mask(torch.zeros(2, 3, 4, dtype=torch.bool))


# -- pack / unpack ------------------------------------------------------------------------------------


@pytest.mark.parametrize("trailing", [(), (3,), (2, 5), (2, 1, 3)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.bool])
def test_pack_unpack_round_trip(trailing, dtype):
    seg = Segments.from_lengths(LENGTHS)
    packed = torch.randn(seg.total, *trailing).mul(10).to(dtype)
    padded = seg.unpack(packed)
    assert padded.shape == (seg.num_segments, seg.max_len, *trailing) and padded.dtype == dtype
    # Valid slots hold the tokens in order; padded slots hold zeros.
    for i, (start, n) in enumerate(zip(seg.offsets.tolist(), LENGTHS)):
        assert torch.equal(padded[i, :n], packed[start : start + n])
        assert not padded[i, n:].any()
    assert torch.equal(seg.pack(padded), packed)


def test_unpack_padded_len_and_pack_of_wider_batch():
    seg = Segments.from_lengths([2, 0, 3])
    packed = torch.randn(5, 4)
    padded = seg.unpack(packed, padded_len=6)
    assert padded.shape == (3, 6, 4)
    assert torch.equal(padded[:, :3], seg.unpack(packed)) and not padded[:, 3:].any()
    assert torch.equal(seg.pack(padded), packed)
    assert torch.equal(seg.padding_mask(6), torch.arange(6)[None, :] >= torch.tensor([2, 0, 3])[:, None])
    # pack ignores whatever sits in padded slots.
    assert torch.equal(seg.pack(padded + seg.padding_mask(6)[..., None] * 100.0), packed)


def test_pack_unpack_non_contiguous_inputs():
    seg = Segments.from_lengths([3, 1, 2])
    packed = torch.randn(4, 6).t()  # (6, 4), non-contiguous
    assert torch.equal(seg.pack(seg.unpack(packed)), packed)
    padded = torch.randn(3, 5, 3).transpose(1, 2)  # (3, 3, 5), non-contiguous
    assert torch.equal(seg.unpack(seg.pack(padded)), padded * ~seg.padding_mask()[..., None])


def test_pack_unpack_gradcheck():
    seg = Segments.from_lengths([2, 0, 3, 1])
    packed = torch.randn(seg.total, 2, dtype=torch.float64, requires_grad=True)
    padded = torch.randn(seg.num_segments, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(seg.unpack, (packed,))
    assert torch.autograd.gradcheck(lambda x: seg.unpack(x, padded_len=5), (packed,))
    assert torch.autograd.gradcheck(seg.pack, (padded,))
    # pack's gradient is zero exactly at the padded slots.
    seg.pack(padded).sum().backward()
    assert torch.equal(padded.grad, (~seg.padding_mask(4))[..., None].double().expand(-1, -1, 2))


def test_to_keeps_metadata_and_caches_are_fresh():
    seg = Segments.from_lengths([3, 0, 2])
    ids = seg.segment_ids()
    assert seg.segment_ids() is ids  # cached
    moved = seg.to("cpu")
    assert isinstance(moved, Segments) and moved is not seg
    assert torch.equal(moved.offsets, seg.offsets) and moved.offsets.dtype == torch.int32
    assert (moved.max_len, moved.total, moved.num_segments) == (3, 5, 3)
    assert torch.equal(moved.segment_ids(), ids)


# -- validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lengths, error, match",
    [
        ([1, -2, 3], ValueError, r"lengths must be non-negative, got -2 at index 1"),
        (torch.tensor([1, -1]), ValueError, r"lengths must be non-negative"),
        ([1.0, 2.0], TypeError, r"lengths must contain ints, got float"),
        ([1, True], TypeError, r"lengths must contain ints, got bool"),
        (torch.tensor([1.0, 2.0]), TypeError, r"lengths must be an integer tensor, got torch.float32"),
        (torch.tensor([True]), TypeError, r"lengths must be an integer tensor"),
        (torch.tensor([[1, 2]]), ValueError, r"lengths must be 1-D"),
        (3, TypeError, r"lengths must be a list of ints or a 1-D integer tensor, got int"),
        ([2**31, 1], ValueError, r"total length does not fit in int32"),
    ],
    ids=["negative", "negative-tensor", "float", "bool", "float-tensor", "bool-tensor", "2d", "scalar", "overflow"],
)
def test_from_lengths_errors(lengths, error, match):
    with pytest.raises(error, match=match):
        Segments.from_lengths(lengths)


@pytest.mark.parametrize(
    "offsets, kwargs, error, match",
    [
        (
            torch.tensor([0, 3, 2, 5], dtype=torch.int32),
            {},
            ValueError,
            r"offsets must be non-decreasing, but offsets\[2\]=2 < offsets\[1\]=3",
        ),
        (torch.tensor([1, 3, 5], dtype=torch.int32), {}, ValueError, r"offsets\[0\] must be 0, got 1"),
        (
            torch.tensor([0, 3, 5], dtype=torch.int32),
            {"total": 6},
            ValueError,
            r"offsets\[-1\] must equal the number of packed tokens \(6\), got 5",
        ),
        (torch.tensor([0.0, 3.0]), {}, TypeError, r"offsets must be an int32 or int64 tensor, got torch.float32"),
        ([0, 3], {}, TypeError, r"offsets must be a torch.Tensor, got list"),
        (torch.zeros(0, dtype=torch.int32), {}, ValueError, r"offsets must be 1-D with at least one element"),
        (torch.zeros(2, 2, dtype=torch.int32), {}, ValueError, r"offsets must be 1-D"),
        (
            torch.tensor([0, 2**31], dtype=torch.int64),
            {},
            ValueError,
            r"offsets\[-1\]=2147483648 does not fit in int32",
        ),
        (
            torch.tensor([0, 3, 5], dtype=torch.int32),
            {"max_len": 2},
            ValueError,
            r"max_len=2 is smaller than the longest segment \(3\)",
        ),
        (torch.tensor([0, 3, 5], dtype=torch.int32), {"max_len": -1}, ValueError, r"max_len must be non-negative"),
        (torch.tensor([0, 3, 5], dtype=torch.int32), {"max_len": 3.0}, TypeError, r"max_len must be a Python int"),
        (torch.tensor([0, 3, 5], dtype=torch.int32), {"max_len": True}, TypeError, r"max_len must be a Python int"),
    ],
    ids=[
        "decreasing",
        "nonzero-start",
        "last-vs-total",
        "float",
        "list",
        "empty",
        "2d",
        "int32-overflow",
        "max_len-small",
        "max_len-negative",
        "max_len-float",
        "max_len-bool",
    ],
)
def test_segments_constructor_errors(offsets, kwargs, error, match):
    with pytest.raises(error, match=match):
        Segments(offsets, **kwargs)


def test_check_offsets_names_the_argument():
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[0\] must be 0"):
        check_offsets(torch.tensor([2, 3]), "cu_seqlens_k")
    check_offsets(torch.tensor([0, 0, 4], dtype=torch.int64), "cu_seqlens_k", total=4)


def test_pack_unpack_errors():
    seg = Segments.from_lengths([2, 3])
    with pytest.raises(TypeError, match="padded must be a torch.Tensor"):
        seg.pack([[1.0]])
    with pytest.raises(ValueError, match=r"padded must have shape \(S=2, L, ...\), got \(3, 3\)"):
        seg.pack(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"padded must have shape"):
        seg.pack(torch.zeros(2))
    with pytest.raises(ValueError, match="padded has L=2 positions but the longest segment has 3"):
        seg.pack(torch.zeros(2, 2))
    with pytest.raises(TypeError, match="packed must be a torch.Tensor"):
        seg.unpack(None)
    with pytest.raises(ValueError, match=r"packed must have shape \(total=5, ...\), got \(4, 2\)"):
        seg.unpack(torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"padded_len=2 is smaller than the longest segment \(3\)"):
        seg.unpack(torch.zeros(5), padded_len=2)
    with pytest.raises(ValueError, match=r"padded_len must be non-negative"):
        Segments.from_lengths([0, 0]).unpack(torch.zeros(0), padded_len=-1)
    with pytest.raises(TypeError, match=r"padded_len must be a Python int, got float"):
        seg.unpack(torch.zeros(5), padded_len=4.0)
    with pytest.raises(ValueError, match=r"padded_len=1 is smaller than the longest segment"):
        seg.padding_mask(1)


# -- CUDA -----------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_segments_are_sync_free_after_construction():
    seg = Segments.from_lengths(torch.tensor(LENGTHS, device="cuda"))
    assert seg.device.type == "cuda" and (seg.max_len, seg.total) == (5, 11)
    assert torch.equal(Segments.from_lengths(LENGTHS).to("cuda").offsets, seg.offsets)
    packed = torch.randn(seg.total, 3, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        padded = seg.unpack(packed, padded_len=7)
        repacked = seg.pack(padded)
        mask = seg.padding_mask()
        ids, pos = seg.segment_ids(), seg.positions()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(repacked, packed) and padded.shape == (7, 7, 3)
    expected_ids, expected_pos = _expected_ids_positions(LENGTHS)
    assert torch.equal(ids.cpu(), expected_ids) and torch.equal(pos.cpu(), expected_pos)
    assert torch.equal(mask.cpu(), Segments.from_lengths(LENGTHS).padding_mask())
    repacked.sum().backward()
    assert torch.equal(packed.grad, torch.ones_like(packed))
    with pytest.raises(ValueError, match="packed is on cpu but the segments are on cuda"):
        seg.unpack(packed.detach().cpu())
