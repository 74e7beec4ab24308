"""The training command: masking, the model's gradients, a few steps in and out of process, checkpoints."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import hierkern
from hierkern import CharVocab, TextBatch
from hierkern.corpus import default_corpus
from hierkern.__main__ import main as cli
from hierkern.train import MaskedCharModel, load_checkpoint, main, mask_chars

TINY = ["--dim", "16", "--heads", "2", "--char-layers", "1", "--word-layers", "1", "--batch-size", "4",
        "--corpus-size", "40", "--log-every", "1"]


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
    batch, positions, targets = mask_chars(TextBatch.from_sentences(corpus, vocab), 0.2,
                                           torch.Generator().manual_seed(1))
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
    summary = main(["--steps", "40", "--corpus", str(corpus), "--dim", "32", "--heads", "2", "--char-layers", "1",
                    "--word-layers", "1", "--batch-size", "16", "--log-every", "10", "--mask-prob", "0.3"])
    assert summary["last_loss"] < 0.8 * summary["first_loss"]


def test_train_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        main(["--steps", "0"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no non-empty lines"):
        main(["--corpus", str(empty)])
    with pytest.raises(ValueError, match="fewer than one batch"):
        main(["--steps", "1", "--corpus-size", "3", "--batch-size", "4"])


def test_command_line_entry_point():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "hierkern", "train", "--steps", "1", *TINY],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "step 1/1 loss=" in run.stdout and "done: 1 steps" in run.stdout


def test_command_line_usage(capsys):
    assert cli([]) == 2 and "python -m hierkern train" in capsys.readouterr().out
    assert cli(["--help"]) == 0
    assert cli(["serve"]) == 2 and "unknown command 'serve'" in capsys.readouterr().err


def test_compile_buckets_max_len_without_undercutting():
    from hierkern.train import _bucket_max_lens
    vocab = CharVocab.from_texts(["abcdefghij"])
    encoder = hierkern.HierarchicalEncoder(len(vocab), 16, 2, 1, 1, positional="learned", max_word_len=8,
                                           max_sentence_len=4)
    batch = TextBatch.from_sentences(["abcde ab", "abc", "abcdefghij a b c d"], vocab, max_word_len=10)
    bucketed = _bucket_max_lens(batch, encoder)
    # 5 -> 8 would be the power of two, but the longest word (10) already exceeds the table: kept as is.
    assert (bucketed.words.max_len, bucketed.sentences.max_len) == (10, 5)
    short = TextBatch.from_sentences(["abcde ab", "abc"], vocab)
    assert (_bucket_max_lens(short, encoder).words.max_len, _bucket_max_lens(short, encoder).sentences.max_len) \
        == (8, 2)
    assert torch.equal(bucketed.words.offsets, batch.words.offsets)
