"""The benchmark workloads (determinism, statistics, stress layouts) and the report command."""

from __future__ import annotations

import json
import statistics
import sys

import pytest
import torch

from hierkern.bench import english_text, make_qkv, workloads
from hierkern.bench.__main__ import main as bench_main
from hierkern.bench.report import load, summary_table
from hierkern.bench.workloads import ENGLISH_WORD_LENGTH_PERCENT, MAX_SENTENCE_WORDS, SIZES


def table_mean() -> float:
    total = sum(ENGLISH_WORD_LENGTH_PERCENT.values())
    return sum(n * p for n, p in ENGLISH_WORD_LENGTH_PERCENT.items()) / total


def test_english_text_is_deterministic_and_exact():
    a, b = english_text(3000, seed=5), english_text(3000, seed=5)
    assert a == b
    assert english_text(3000, seed=6) != a
    words, sentences = a
    assert len(words) == sum(sentences) == 3000
    assert min(sentences) >= 1


def test_word_lengths_follow_the_table():
    assert 4.5 <= table_mean() <= 4.9     # token-weighted English, ~4.5-4.8 characters
    words, _ = english_text(40000, seed=0)
    assert abs(statistics.fmean(words) - table_mean()) < 0.05
    assert min(words) >= 1 and max(words) <= max(ENGLISH_WORD_LENGTH_PERCENT)
    share_2_3 = sum(n in (2, 3) for n in words) / len(words)
    assert abs(share_2_3 - 0.3816 / 0.9905) < 0.01       # the table's two most common lengths


def test_sentence_lengths_mean_15_with_a_long_tail():
    _, sentences = english_text(60000, seed=0)
    assert 14.0 <= statistics.fmean(sentences) <= 15.5
    assert max(sentences) <= MAX_SENTENCE_WORDS
    tail = sum(n > 60 for n in sentences) / len(sentences)
    assert 0.002 < tail < 0.03
    # The default CPU workload itself reaches the tail.
    _, default = english_text(SIZES["default"]["cpu"], seed=0)
    assert max(default) >= 60


def test_workload_layouts():
    by_name = {w.name: w for w in workloads("small", "cpu")}
    assert list(by_name)[:2] == ["chars-in-words", "words-in-sentences"]
    chars = by_name["chars-in-words"]
    assert chars.num_segments == SIZES["small"]["cpu"] and chars.embed_dim == 256 and chars.num_heads == 8
    assert by_name["words-in-sentences"].total == chars.num_segments
    for length in (1, 5, 16, 17, 32, 33, 64, 65):
        w = by_name[f"uniform-{length}"]
        assert set(w.lengths) == {length}
        assert abs(w.total - chars.total) <= length
    long = by_name["long-among-tiny"]
    assert sum(n > 8 for n in long.lengths) == 1 and long.max_len >= 64
    assert long.lengths.index(long.max_len) not in (0, long.num_segments - 1)
    zero = by_name["zero-length"]
    assert zero.lengths[0] == 0 and zero.lengths[-1] == 0 and 0.2 < zero.lengths.count(0) / zero.num_segments
    assert zero.padded_tokens == zero.num_segments * zero.max_len
    seg = zero.segments()
    assert seg.total == zero.total and seg.num_segments == zero.num_segments
    assert workloads("small", "cpu") == workloads("small", "cpu")


def test_workloads_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        workloads("huge")
    with pytest.raises(ValueError, match="device_type"):
        workloads("small", "tpu")
    with pytest.raises(ValueError, match="num_words"):
        english_text(0)


def test_make_qkv_is_seeded():
    w = workloads("small", "cpu")[2]
    q, k, v = make_qkv(w, torch.float64, seed=3)
    assert q.shape == (w.total, w.num_heads, w.head_dim) and q.dtype == torch.float64
    q2, _, _ = make_qkv(w, torch.float64, seed=3)
    assert torch.equal(q, q2) and not torch.equal(q, k)


def entry(group, impl, median, **extra):
    return {"group": group, "name": f"test[{impl}]", "fullname": f"x::test[{impl}]",
            "stats": {"median": median, "mean": median, "min": median},
            "extra_info": {"impl": impl, "mean_len": 4.8, "tokens": 1000, "bytes_per_s": 2e9, **extra}}


@pytest.fixture
def results(tmp_path):
    data = {"machine_info": {}, "commit_info": {}, "benchmarks": [
        entry("chars/fwd/float32", "torch-sdpa-padded", 0.010),
        entry("chars/fwd/float32", "torch-sdpa-nested", 0.008),
        entry("chars/fwd/float32", "hierkern-cpu", 0.002),
        entry("chars/fwd/float32", "hierkern-reference", 0.016),
        entry("chars/fwd/float32", "flash-attn-varlen", 0.001),    # not torch: never the baseline
        entry("long/fwd/float32", "torch-sdpa-nested", 0.030, mean_len=5.0),
        entry("long/fwd/float32", "hierkern-cpu", 0.060, mean_len=5.0),
        entry("only-ours/fwd/float32", "hierkern-cpu", 0.001),
    ]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    return path


def test_report_speedups(results):
    groups = {g.name: g for g in load(results)}
    chars = groups["chars/fwd/float32"]
    assert chars.best_torch.impl == "torch-sdpa-nested"
    assert chars.best_hierkern.impl == "hierkern-cpu"
    assert chars.speedup(chars.best_hierkern) == pytest.approx(4.0)
    assert groups["long/fwd/float32"].speedup(groups["long/fwd/float32"].best_hierkern) == pytest.approx(0.5)
    assert groups["only-ours/fwd/float32"].best_torch is None
    table = summary_table(list(groups.values()))
    assert "4.00x" in table and "0.50x" in table and "(none ran)" in table


def test_report_command(results, capsys, monkeypatch):
    assert bench_main(["report", str(results), "--detail"]) == 0
    out = capsys.readouterr().out
    assert "hierkern-cpu" in out and "4.00x" in out and "0.50x to 4.00x" in out
    assert "flash-attn-varlen" in out and "8.00x" in out       # detail: 0.008 / 0.001
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # as if matplotlib were not installed
    assert bench_main(["report", str(results), "--plot", str(results.with_suffix(".png"))]) == 1
    assert "pip install 'hierkern[plot]'" in capsys.readouterr().err
    assert not results.with_suffix(".png").exists()


def test_report_writes_the_plot(results):
    pytest.importorskip("matplotlib", reason="the plot needs the optional matplotlib (hierkern[plot])")
    png = results.with_suffix(".png")
    assert bench_main(["report", str(results), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_rejects_foreign_json(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"benchmarks": [{"group": "g", "stats": {"median": 1.0}, "extra_info": {}}]}))
    assert bench_main(["report", str(bad)]) == 2
    assert "extra_info['impl']" in capsys.readouterr().err
    bad.write_text("not json")
    assert bench_main(["report", str(bad)]) == 2
    bad.write_text(json.dumps({"results": []}))
    assert bench_main(["report", str(bad)]) == 2
    assert "pytest-benchmark JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_main(["report"])
