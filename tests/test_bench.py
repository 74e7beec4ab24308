"""The benchmark workloads (determinism, statistics, stress layouts) and the report command."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

import hierkern
from hierkern.bench import SEED_MODEL_WORDS, english_text, make_qkv, seed_model_batch, workloads
from hierkern.bench.__main__ import main as bench_main
from hierkern.bench.report import load, load_run, plot_speedups, speedup_range, spread_warnings, summary_table
from hierkern.bench.workloads import ENGLISH_WORD_LENGTH_PERCENT, MAX_SENTENCE_WORDS, SIZES, TARGET_CHARS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    assert 4.5 <= table_mean() <= 4.9  # token-weighted English, ~4.5-4.8 characters
    words, _ = english_text(40000, seed=0)
    assert abs(statistics.fmean(words) - table_mean()) < 0.05
    assert min(words) >= 1 and max(words) <= max(ENGLISH_WORD_LENGTH_PERCENT)
    share_2_3 = sum(n in (2, 3) for n in words) / len(words)
    assert abs(share_2_3 - 0.3816 / 0.9905) < 0.01  # the table's two most common lengths


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


def test_cuda_workloads_include_the_target_shape():
    by_name = {w.name: w for w in workloads("default", "cuda")}
    target = by_name["chars-1M-d64"]
    assert target.total == TARGET_CHARS and (target.num_heads, target.head_dim) == (8, 64)
    assert target.dtypes == ("bfloat16",) and 4.5 < target.mean_len < 5.0
    assert "chars-1M-d64" not in {w.name for w in workloads("small", "cuda")}
    assert "lengths" not in repr(target)  # pytest-benchmark writes parameter reprs into the JSON


def test_seed_model_batch():
    batch = seed_model_batch("small", "cpu")
    assert isinstance(batch, hierkern.TextBatch)
    assert batch.words.num_segments == batch.sentences.total == SEED_MODEL_WORDS["small"]["cpu"]
    assert batch.char_ids.min() > hierkern.CharVocab.CLS
    words, sentences = english_text(SEED_MODEL_WORDS["small"]["cpu"], 0)
    assert batch.words.lengths.tolist() == list(words) and batch.sentences.lengths.tolist() == list(sentences)
    again = seed_model_batch("small", "cpu")
    assert torch.equal(again.char_ids, batch.char_ids)
    with pytest.raises(ValueError, match="size"):
        seed_model_batch("huge")


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


def entry(group, impl, median, iqr=0.0, **extra):
    return {
        "group": group,
        "name": f"test[{impl}]",
        "fullname": f"x::test[{impl}]",
        "stats": {"median": median, "mean": median, "min": median * 0.9, "iqr": iqr * median, "rounds": 5},
        "extra_info": {
            "impl": impl,
            "mean_len": 4.8,
            "tokens": 1000,
            "bytes_per_s": 2e9,
            "floor_bytes": 4e6,
            "copy_bandwidth_Bps": 4e9,
            **extra,
        },
    }


@pytest.fixture
def results(tmp_path):
    data = {
        "machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2}},
        "commit_info": {"id": "abcdef0123456789", "dirty": False},
        "datetime": "2026-11-30T03:00:00",
        "hierkern": {
            "failed": [
                {
                    "group": "chars/fwd+bwd/float32",
                    "impl": "torch-flex",
                    "error": "NotImplementedError: no CPU backward",
                }
            ]
        },
        "benchmarks": [
            entry("chars/fwd/float32", "torch-sdpa-padded", 0.010),
            entry("chars/fwd/float32", "torch-sdpa-nested", 0.008),
            entry("chars/fwd/float32", "hierkern-cpu", 0.002),  # floor 1 ms at 4 GB/s: 50%
            entry("chars/fwd/float32", "hierkern-reference", 0.016),
            entry("chars/fwd/float32", "flash-attn-varlen", 0.001),  # not torch: never the baseline
            entry("chars/fwd+bwd/float32", "torch-sdpa-padded", 0.040),
            entry("chars/fwd+bwd/float32", "hierkern-cpu", 0.010, iqr=0.6),  # a noisy one
            entry("long/fwd/float32", "torch-sdpa-nested", 0.030, mean_len=5.0),
            entry("long/fwd/float32", "hierkern-cpu", 0.060, mean_len=5.0),
            entry("only-ours/fwd/float32", "hierkern-cpu", 0.001),
            # hierkern runs torch's code here: out of the speedup range
            entry("mha-weights-chars/fwd/float32", "torch-mha", 0.100, need_weights=True, family="layer"),
            entry("mha-weights-chars/fwd/float32", "hierkern-mha-padded", 0.010, need_weights=True, family="layer"),
            entry("mha-chars/fwd/float32", "torch-mha", 0.100, family="layer"),
            entry("mha-chars/fwd/float32", "hierkern-mha-packed", 0.025, family="layer"),
            entry("seed-model/train/float32", "torch-encoder-padded", 2.0),
            entry("seed-model/train/float32", "hierkern-encoder", 0.5),
        ],
    }
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


def test_report_floor_spread_and_torch_code_groups(results):
    run = load_run(results)
    groups = {g.name: g for g in run.groups}
    chars = groups["chars/fwd/float32"]
    assert chars.best_hierkern.floor_fraction == pytest.approx(0.5)  # 4 MB at 4 GB/s = 1 ms of 2 ms
    # JSON written before floor_bytes: the old "bytes" field, with the run's bandwidth.
    old = type(chars.best_hierkern)("g", "hierkern-cpu", 0.004, {"bytes": 4e6, "copy_bandwidth_Bps": 4e9})
    assert old.floor_fraction == pytest.approx(0.25)
    assert groups["mha-weights-chars/fwd/float32"].runs_torch_code
    assert not groups["mha-chars/fwd/float32"].runs_torch_code
    # need_weights' 10x (hierkern-mha-padded is a stand-in here) stays out: the range is 0.5x..4x.
    assert speedup_range(run.groups) == (pytest.approx(0.5), pytest.approx(4.0))
    warnings = spread_warnings(run.groups)
    assert len(warnings) == 1 and warnings[0].startswith("chars/fwd+bwd/float32") and "60%" in warnings[0]
    assert run.failed[0]["impl"] == "torch-flex"
    assert (run.machine, run.commit, run.date) == ("Test CPU, 2 cores", "abcdef0", "2026-11-30")
    assert groups["seed-model/train/float32"].family == "seed model"  # from the group name
    table = summary_table(run.groups)
    assert "% of floor" in table and "50.0%" in table and "mha-weights-chars/fwd/float32 *" in table


def test_report_command(results, capsys, monkeypatch):
    assert bench_main(["report", str(results), "--detail"]) == 0
    out = capsys.readouterr().out
    assert "hierkern-cpu" in out and "4.00x" in out and "0.50x to 4.00x" in out
    assert "over 5 groups" in out and "left out of that range: 1 group with need_weights=True" in out
    assert "flash-attn-varlen" in out and "8.00x" in out  # detail: 0.008 / 0.001
    assert "Test CPU, 2 cores, commit abcdef0, 2026-11-30" in out
    assert "torch-flex: NotImplementedError: no CPU backward" in out
    assert "Warning: wide spread" in out and "hierkern-cpu 60% over 5 rounds" in out
    detail = out[out.index("rounds") :]  # the --detail table: min / median / IQR
    assert "IQR" in out and "1.8 ms" in detail and "60%" in detail
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    assert bench_main(["report", str(results), "--plot", str(results.with_suffix(".png"))]) == 1
    assert "pip install 'hierkern[plot]'" in capsys.readouterr().err
    assert not results.with_suffix(".png").exists()


def test_report_flags_a_floor_faster_than_copy(tmp_path, capsys):
    """A % of floor above 100% means the bandwidth was measured in a busier moment than the timing."""
    path = tmp_path / "busy.json"
    path.write_text(
        json.dumps(
            {
                "benchmarks": [
                    entry("chars/fwd/float32", "torch-sdpa-padded", 0.010),
                    entry("chars/fwd/float32", "hierkern-cpu", 0.0005),
                ]
            }
        )
    )  # 1 ms floor in 0.5 ms: 200%
    assert bench_main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "200.0%" in out and "1 entries run faster than their floor" in out


def test_report_writes_the_plot(results, tmp_path):
    png = tmp_path / "plot.png"
    assert bench_main(["report", str(results), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = load_run(results)
    drawn = plot_speedups(run.groups, tmp_path / "again.png", failed=run.failed)
    # One panel per family present, in a fixed order; need_weights groups are not drawn.
    assert list(drawn) == ["attention core", "layer", "seed model"]
    assert {g for g, _, _ in drawn["layer"]} == {"mha-chars/fwd/float32"}
    bars = {(g, peer): value for panel in drawn.values() for g, peer, value in panel}
    assert bars[("chars/fwd/float32", "torch-sdpa-nested")] == pytest.approx(4.0)
    assert bars[("chars/fwd/float32", "flash-attn-varlen")] == pytest.approx(0.5)  # other libraries too
    assert bars[("chars/fwd+bwd/float32", "torch-flex")] is None  # drawn as "fails"
    assert bars[("seed-model/train/float32", "torch-encoder-padded")] == pytest.approx(4.0)
    assert not any(peer == "hierkern-reference" for _, peer in bars)
    # --all: the reference backend is drawn as a bar against hierkern's fastest backend.
    drawn = plot_speedups(run.groups, tmp_path / "all.png", include_reference=True)
    bars = {(g, peer): value for panel in drawn.values() for g, peer, value in panel}
    assert bars[("chars/fwd/float32", "hierkern-reference")] == pytest.approx(8.0)


def test_json_entries_are_completed_centrally(monkeypatch):
    """Entries from benchmark files that do not use run_benchmark still get impl, floor and bandwidth."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import harness
    finally:
        sys.path.remove(os.path.join(REPO, "benchmarks"))
    monkeypatch.setattr(
        harness, "copy_bandwidth", lambda device: {"copy_bandwidth_Bps": 1e9, "copy_bandwidth_method": "stub"}
    )
    benches = [
        {
            "group": "encoder-stack/fwd/float32",
            "name": "test_stack[hk]",
            "params": {"impl": "hierkern-stack"},
            "stats": {"median": 0.01},
            "extra_info": {"floor_bytes": 2e6, "device": "cpu"},
        },
        {
            "group": "encoder-stack/fwd/float32",
            "name": "test_stack[torch]",
            "params": {"impl": "torch-stack"},
            "stats": {"median": 0.02},
            "extra_info": {},
        },
        {"group": "hf/fwd/float32", "name": "test_hf_plain", "stats": {"median": 0.5}, "extra_info": {}},
    ]
    harness.complete_entries(benches)
    first, second, third = (b["extra_info"] for b in benches)
    assert (first["impl"], second["impl"], third["impl"]) == ("hierkern-stack", "torch-stack", "test_hf_plain")
    assert second["floor_bytes"] == 2e6 and second["floor_fraction"] == pytest.approx(0.1)  # 2 ms / 20 ms
    assert third["floor_bytes"] is None and "floor_fraction" not in third
    assert (first["family"], third["family"]) == ("encoder stack", "hf")
    assert all(e["copy_bandwidth_Bps"] == 1e9 and e["device"] == "cpu" for e in (first, second, third))


def test_benchmark_json_end_to_end(tmp_path):
    """A tiny `pytest benchmarks` run through the conftest hook: every entry carries impl, floor_bytes and
    the bandwidth measured in the run, and the JSON has the run-level `hierkern` object."""
    out = tmp_path / "run.json"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "benchmarks/test_attention.py",
        "-q",
        "-p",
        "no:cacheprovider",
        "--hk-size=small",
        "--benchmark-max-time=0.01",
        "--benchmark-min-rounds=1",
        f"--benchmark-json={out}",
        "-k",
        "uniform-1-fwd-float32 and (hierkern-cpu or sdpa-padded)",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert len(data["benchmarks"]) == 2
    for bench in data["benchmarks"]:
        extra = bench["extra_info"]
        assert extra["impl"] in ("hierkern-cpu", "torch-sdpa-padded")
        assert extra["floor_bytes"] > 0 and extra["copy_bandwidth_Bps"] > 1e8 and 0 < extra["floor_fraction"]
    assert data["hierkern"]["copy_bandwidth"]["cpu"]["copy_bandwidth_Bps"] > 1e8
    assert data["hierkern"]["failed"] == []


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
