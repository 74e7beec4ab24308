"""DistributedDataParallel: 2 spawned processes (gloo over loopback).

One spawn (process start-up dominates the cost) checks two things in turn:
1. the synchronised gradient of a DDP-wrapped HierarchicalEncoder on two shards equals the single-process
   gradient over the union of the shards, on two iterations (a second iteration would fail if some
   parameter went unused, since DDP runs without find_unused_parameters);
2. ``hierkern.train.main`` run as ``torchrun`` would run it (RANK/WORLD_SIZE/MASTER_* in the environment):
   DistributedSampler, DDP, rank-0 logging and checkpoint.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hierkern
from hierkern import CharVocab, TextBatch
from hierkern import train as hk_train
from hierkern.corpus import default_corpus

WORLD = 2
CORPUS = default_corpus(10, seed=7)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(vocab: CharVocab) -> torch.nn.Module:
    torch.manual_seed(0)
    return hierkern.HierarchicalEncoder(
        len(vocab), 16, 2, char_layers=1, word_layers=1, pooling="attention", dropout=0.0
    ).double()


def _loss(model, sentences, vocab) -> torch.Tensor:
    # A sum over words: sentences are independent, so the union's loss is the sum of the shards' losses.
    out = model(TextBatch.from_sentences(sentences, vocab))
    return (out.tanh() * torch.linspace(-1, 1, out.shape[1], dtype=out.dtype)).sum()


def _worker(rank: int, ports: tuple[int, int], out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    vocab = CharVocab.from_texts(CORPUS)
    ddp = torch.nn.parallel.DistributedDataParallel(_model(vocab))
    grads = []
    for _ in range(2):
        ddp.zero_grad()
        _loss(ddp, CORPUS[rank::WORLD], vocab).backward()
        grads.append({n: p.grad.clone() for n, p in ddp.module.named_parameters()})
    dist.destroy_process_group()

    os.environ.update(MASTER_PORT=str(ports[1]), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    summary = hk_train.main(
        [
            "--steps",
            "2",
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
            "--checkpoint",
            os.path.join(out_dir, "ckpt.pt"),
        ]
    )
    torch.save({"grads": grads, "summary": summary}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_gradients_equal_single_process_and_train_under_torchrun_env(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_worker, args=((_free_port(), _free_port()), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    vocab = CharVocab.from_texts(CORPUS)
    model = _model(vocab)
    _loss(model, CORPUS, vocab).backward()
    for name, p in model.named_parameters():
        # DDP averages over ranks; the union's gradient is the sum over shards.
        for result in results:
            for grads in result["grads"]:
                torch.testing.assert_close(grads[name] * WORLD, p.grad, rtol=1e-10, atol=1e-12, msg=name)

    first = [r["summary"] for r in results]
    assert first[0]["first_loss"] == first[1]["first_loss"]  # the logged loss is averaged over ranks
    assert first[0]["final_step"] == 2 and (tmp_path / "ckpt.pt").exists()
    encoder, _ = hk_train.load_checkpoint(tmp_path / "ckpt.pt")
    assert isinstance(encoder, hierkern.HierarchicalEncoder)
