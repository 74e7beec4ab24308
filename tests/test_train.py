"""The training command: masking, the model's gradients, a few steps in and out of process, checkpoints."""

import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import hierkern
from hierkern import CharVocab, TextBatch
from hierkern.__main__ import main as cli
from hierkern.corpus import default_corpus
from hierkern.train import MaskedCharModel, TrainingStopped, build_parser, load_checkpoint, main, mask_chars

TINY = [
    "--dim",
    "16",
    "--heads",
    "2",
    "--char-layers",
    "1",
    "--word-layers",
    "1",
    "--batch-size",
    "4",
    "--corpus-size",
    "40",
    "--log-every",
    "1",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: on a shared 2-core machine intra-op threads cost far more than they save.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_mask_chars():
    corpus = default_corpus(8)
    vocab = CharVocab.from_texts(corpus)
    batch = TextBatch.from_sentences(corpus, vocab)
    masked, positions, targets = mask_chars(batch, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(targets, batch.char_ids[positions])
    assert (masked.char_ids[positions] == CharVocab.MASK).all()
    keep = torch.ones(batch.num_chars, dtype=torch.bool)
    keep[positions] = False
    assert torch.equal(masked.char_ids[keep], batch.char_ids[keep])
    assert 0.2 < len(positions) / batch.num_chars < 0.4
    assert masked.words is batch.words and masked.sentences is batch.sentences
    one_char = TextBatch.from_sentences(["a"], vocab)
    assert mask_chars(one_char, 0.01, torch.Generator().manual_seed(0))[1].tolist() == [0]  # never none
    with pytest.raises(ValueError, match="prob"):
        mask_chars(batch, 0.0)


@pytest.mark.parametrize("pooling", ["cls", "attention"])
def test_masked_char_model_uses_every_parameter(pooling):
    corpus = default_corpus(6)
    vocab = CharVocab.from_texts(corpus)
    model = MaskedCharModel(hierkern.HierarchicalEncoder(len(vocab), 16, 2, 1, 1, pooling=pooling))
    batch, positions, targets = mask_chars(
        TextBatch.from_sentences(corpus, vocab), 0.2, torch.Generator().manual_seed(1)
    )
    logits = model(batch, positions)
    assert logits.shape == (len(positions), len(vocab))
    F.cross_entropy(logits, targets).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # so DDP needs no find_unused_parameters


def test_train_logs_checkpoints_and_resumes(tmp_path, capsys):
    ckpt = tmp_path / "model.pt"
    summary = main(["--steps", "3", "--checkpoint", str(ckpt), *TINY])
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if "loss=" in line] == ["1/3", "2/3", "3/3"]
    assert "done: 3 steps, loss" in out and "chars/s" in out and ckpt.exists()
    assert math.isfinite(summary["first_loss"]) and summary["chars_per_s"] > 0
    encoder, vocab = load_checkpoint(ckpt)
    batch = TextBatch.from_sentences(["A new sentence, unseen."], vocab)
    assert encoder(batch).shape == (batch.num_words, 16) and not encoder.training

    summary = main(["--steps", "2", "--checkpoint", str(ckpt), *TINY])
    out = capsys.readouterr().out
    assert "resumed from" in out and "step 5/5 loss=" in out and summary["final_step"] == 5
    assert torch.load(ckpt, weights_only=True)["step"] == 5


def test_train_learns_on_a_small_corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(default_corpus(16, seed=5)) + "\n\n", encoding="utf-8")
    summary = main(
        [
            "--steps",
            "40",
            "--corpus",
            str(corpus),
            "--dim",
            "32",
            "--heads",
            "2",
            "--char-layers",
            "1",
            "--word-layers",
            "1",
            "--batch-size",
            "16",
            "--log-every",
            "10",
            "--mask-prob",
            "0.3",
        ]
    )
    assert summary["last_loss"] < 0.8 * summary["first_loss"]


def _usage_error(capsys, argv) -> str:
    """argparse's exit status 2, with nothing trained; returns its message (the last line, after the usage)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and "loss=" not in out, (out, err)
    return err.splitlines()[-1]


@pytest.mark.parametrize(
    "bad, flag",
    [
        (["--steps", "0"], "--steps"),
        (["--log-every", "0"], "--log-every"),
        (["--dim", "0"], "--dim"),
        (["--heads", "0"], "--heads"),
        (["--dim", "10", "--heads", "3"], "--dim"),
        (["--char-layers", "-1"], "--char-layers"),
        (["--word-layers", "-1"], "--word-layers"),
        (["--batch-size", "0"], "--batch-size"),
        (["--corpus-size", "0"], "--corpus-size"),
        (["--lr", "inf"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "0"], "--lr"),
        (["--lr", "x"], "--lr"),
        (["--mask-prob", "0"], "--mask-prob"),
        (["--mask-prob", "1"], "--mask-prob"),
        (["--dropout", "1"], "--dropout"),
        (["--dropout", "-0.1"], "--dropout"),
        (["--max-word-len", "0"], "--max-word-len"),
        (["--warmup", "-1"], "--warmup"),
        (["--threads", "-1"], "--threads"),
        (["--seed", "-1"], "--seed"),
        (["--save-every", "-1"], "--save-every"),
        (["--save-every", "2"], "--save-every"),  # without --checkpoint there is nowhere to save
        (["--corpus-size", "3"], "--batch-size"),  # fewer sentences than one batch
    ],
)
def test_train_rejects_bad_numbers_before_training(capsys, bad, flag):
    assert flag in _usage_error(capsys, ["--steps", "1", *TINY, *bad])


def test_train_rejects_a_bad_corpus_before_training(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    assert "--corpus" in _usage_error(capsys, ["--corpus", str(empty)])
    assert "--corpus" in _usage_error(capsys, ["--corpus", str(tmp_path / "missing.txt")])


def test_checkpoint_parent_directories_are_created(tmp_path, capsys):
    ckpt = tmp_path / "runs" / "a" / "m.pt"
    main(["--steps", "1", *TINY, "--checkpoint", str(ckpt)])
    assert load_checkpoint(ckpt)[0].dim == 16 and os.listdir(ckpt.parent) == ["m.pt"]


def test_unusable_checkpoint_paths_are_refused_before_training(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    assert "--checkpoint" in _usage_error(capsys, ["--steps", "1", *TINY, "--checkpoint", str(a_file / "m.pt")])
    assert "--checkpoint" in _usage_error(capsys, ["--steps", "1", *TINY, "--checkpoint", str(tmp_path)])
    # An existing file that is no checkpoint is neither resumed nor overwritten.
    err = _usage_error(capsys, ["--steps", "1", *TINY, "--checkpoint", str(a_file)])
    assert "--checkpoint" in err and a_file.read_text() == "not a directory"


def test_resume_adopts_the_checkpoints_model_and_refuses_a_different_one(tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    main(["--steps", "1", *TINY, "--pooling", "mean", "--checkpoint", str(ckpt)])
    data = ["--batch-size", "4", "--corpus-size", "40", "--checkpoint", str(ckpt)]
    err = _usage_error(capsys, ["--steps", "1", *data, "--dim", "32", "--pooling", "cls", "--heads", "2"])
    assert "--dim 32" in err and "16" in err and "--pooling cls" in err and "--heads" not in err
    # The tokenizer's word length must not change under a model trained with another.
    assert "--max-word-len" in _usage_error(capsys, ["--steps", "1", *data, "--max-word-len", "8"])
    assert torch.load(ckpt, weights_only=True)["step"] == 1
    # Flags left out take the checkpoint's values; dropout changes no shape and is applied in full.
    assert main(["--steps", "1", *data, "--dropout", "0.1"])["final_step"] == 2
    config = torch.load(ckpt, weights_only=True)["config"]
    assert (config["dim"], config["num_heads"], config["pooling"], config["dropout"]) == (16, 2, "mean", 0.1)


def test_periodic_checkpoints(tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    main(["--steps", "5", *TINY, "--save-every", "2", "--checkpoint", str(ckpt)])
    saves = [line for line in capsys.readouterr().out.splitlines() if line.startswith("saved")]
    assert saves == [f"saved {ckpt} (step {n})" for n in (2, 4, 5)]
    assert os.listdir(tmp_path) == ["m.pt"]


def test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    ckpt = tmp_path / "m.pt"
    main(["--steps", "1", *TINY, "--checkpoint", str(ckpt)])
    before = ckpt.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        main(["--steps", "1", *TINY, "--checkpoint", str(ckpt)])
    assert ckpt.read_bytes() == before and os.listdir(tmp_path) == ["m.pt"]


def test_a_diverging_run_stops_with_the_step_and_loss(tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    with pytest.raises(TrainingStopped) as stopped:
        main(["--steps", "5", *TINY, "--lr", "1e30", "--warmup", "0", "--checkpoint", str(ckpt)])
    assert stopped.value.exit_code == 1
    message = str(stopped.value)
    assert "step 2" in message and ("nan" in message or "inf" in message) and "--lr" in message
    assert "step 3/5" not in capsys.readouterr().out  # stopped at once on the CPU
    assert not ckpt.exists()  # a diverged model is never saved
    assert cli(["train", "--steps", "3", *TINY, "--lr", "1e30", "--warmup", "0"]) == 1
    assert "step 2" in capsys.readouterr().err


@pytest.mark.parametrize("with_checkpoint", [True, False])
def test_a_signal_finishes_the_step_then_saves_and_stops(tmp_path, monkeypatch, capsys, with_checkpoint):
    import hierkern.train as train

    calls = []

    def mask_and_signal_on_step_3(*args, **kwargs):
        calls.append(None)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return mask_chars(*args, **kwargs)

    monkeypatch.setattr(train, "mask_chars", mask_and_signal_on_step_3)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    ckpt = tmp_path / "m.pt"
    with pytest.raises(TrainingStopped) as stopped:
        main(["--steps", "10", *TINY, *(["--checkpoint", str(ckpt)] if with_checkpoint else [])])
    assert stopped.value.exit_code == 128 + signal.SIGTERM and "SIGTERM" in str(stopped.value)
    assert "step 3/10 loss=" in capsys.readouterr().out  # the step under way was finished
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    if with_checkpoint:
        assert str(ckpt) in str(stopped.value) and torch.load(ckpt, weights_only=True)["step"] == 3
    else:
        assert "nothing saved" in str(stopped.value) and os.listdir(tmp_path) == []


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_command_line_saves_on_a_signal(tmp_path, signum, code):
    ckpt = tmp_path / "m.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hierkern", "train", "--steps", "1000000", *TINY, "--checkpoint", str(ckpt)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        for line in proc.stdout:
            if line.startswith("step "):
                break
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert str(ckpt) in err and os.listdir(tmp_path) == ["m.pt"]
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 1 <= step < 1000000 and f"saved {ckpt} (step {step})" in out
    assert load_checkpoint(ckpt)[0].dim == 16


def test_command_line_entry_point():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "hierkern", "train", "--steps", "1", *TINY],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "step 1/1 loss=" in run.stdout and "done: 1 steps" in run.stdout


def test_command_line_usage(capsys):
    assert cli([]) == 2 and "usage: python -m hierkern" in capsys.readouterr().err
    assert cli(["--help"]) == 0 and "    train " in capsys.readouterr().out
    assert cli(["serve"]) == 2 and "invalid choice: 'serve'" in capsys.readouterr().err


def test_compile_buckets_max_len_without_undercutting():
    from hierkern.train import _bucket_max_lens

    vocab = CharVocab.from_texts(["abcdefghij"])
    encoder = hierkern.HierarchicalEncoder(
        len(vocab), 16, 2, 1, 1, positional="learned", max_word_len=8, max_sentence_len=4
    )
    batch = TextBatch.from_sentences(["abcde ab", "abc", "abcdefghij a b c d"], vocab, max_word_len=10)
    bucketed = _bucket_max_lens(batch, encoder)
    # 5 -> 8 would be the power of two, but the longest word (10) already exceeds the table: kept as is.
    assert (bucketed.words.max_len, bucketed.sentences.max_len) == (10, 5)
    short = TextBatch.from_sentences(["abcde ab", "abc"], vocab)
    assert (_bucket_max_lens(short, encoder).words.max_len, _bucket_max_lens(short, encoder).sentences.max_len) == (
        8,
        2,
    )
    assert torch.equal(bucketed.words.offsets, batch.words.offsets)


def test_every_option_has_help_and_shows_its_default(capsys):
    for action in build_parser()._actions:
        assert action.help, action.option_strings
        if action.nargs != 0:  # options that take a value
            assert "default" in action.help, action.option_strings
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--save-every" in capsys.readouterr().out
