"""``python -m hierkern train``: train a ``HierarchicalEncoder`` with a masked-character objective.

Some characters inside words are replaced by ``CharVocab.MASK``; the model predicts each from its
character-stage state (the word's other characters: spelling) joined with its word's contextual vector
(the other words of the sentence). Runs on one process, or under ``torchrun --nproc-per-node N`` with
``DistributedDataParallel`` and a ``DistributedSampler`` (gloo on CPU, NCCL on CUDA).

Prints ``step <i>/<n> loss=<value> ...`` every ``--log-every`` steps and a final summary line
``done: <n> steps, loss <first> -> <last> ..., <chars/s> chars/s``, where ``first`` is the first step's
loss and ``last`` the mean over the last logging window (averaged over ranks).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from .corpus import default_corpus
from .layout import Segments
from .nn.layers import POOLING_MODES, HierarchicalEncoder
from .text import DEFAULT_MAX_WORD_LEN, CharVocab, TextBatch, collate_fn

__all__ = ["MaskedCharModel", "mask_chars", "load_checkpoint", "build_parser", "main"]

CHECKPOINT_FORMAT = "hierkern.train/1"


class MaskedCharModel(nn.Module):
    """A ``HierarchicalEncoder`` plus a head predicting masked characters.

    Args:
        encoder: the encoder to train.
    """

    def __init__(self, encoder: HierarchicalEncoder):
        super().__init__()
        dim, vocab_size = encoder.dim, encoder.config["vocab_size"]
        self.encoder = encoder
        self.head = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.LayerNorm(dim), nn.Linear(dim, vocab_size))

    def forward(self, batch: TextBatch, positions: torch.Tensor) -> torch.Tensor:
        """Logits ``(len(positions), vocab_size)`` for the characters at ``positions`` (indices into
        ``batch.char_ids``)."""
        char_states, word_vectors = self.encoder.encode_chars(batch)
        context = self.encoder.contextualize(word_vectors, batch.sentences)
        word_of_char = batch.words.segment_ids()[positions]
        return self.head(torch.cat((char_states[positions], context[word_of_char]), dim=-1))


def mask_chars(batch: TextBatch, prob: float, generator: torch.Generator | None = None
               ) -> tuple[TextBatch, torch.Tensor, torch.Tensor]:
    """Replace each character by ``CharVocab.MASK`` with probability ``prob`` (at least one per batch).

    Args:
        batch: a CPU batch.
        prob: masking probability per character.
        generator: the random generator.

    Returns:
        ``(masked_batch, positions, targets)``: the batch with masked ``char_ids``, int64 indices of the
        masked characters and their original ids.
    """
    if not 0.0 < prob < 1.0:
        raise ValueError(f"prob must be in (0, 1), got {prob}")
    chosen = torch.rand(batch.num_chars, generator=generator) < prob
    if not bool(chosen.any()):
        chosen[torch.randint(batch.num_chars, (1,), generator=generator)] = True
    positions = chosen.nonzero().flatten()
    targets = batch.char_ids[positions]
    char_ids = batch.char_ids.masked_fill(chosen, CharVocab.MASK)
    return TextBatch(char_ids, batch.words, batch.sentences), positions, targets


def _bucket_max_lens(batch: TextBatch, encoder: HierarchicalEncoder) -> TextBatch:
    """The batch with ``max_len``s rounded up to a power of two (capped by the encoder's position tables).

    ``max_len`` only has to bound the longest segment, and torch.compile specialises on it: rounding keeps
    the number of compiled graphs logarithmic instead of one per distinct longest word/sentence.
    """
    def bucket(segments: Segments, cap: int) -> Segments:
        n = segments.max_len
        rounded = max(n, min(1 << max(n - 1, 0).bit_length(), cap))
        return Segments(segments.offsets, rounded, segments.total, validate=False)
    return TextBatch(batch.char_ids, bucket(batch.words, encoder.config["max_word_len"]),
                     bucket(batch.sentences, encoder.config["max_sentence_len"]))


def _save_checkpoint(path: str, model: MaskedCharModel, vocab: CharVocab, optimizer, step: int) -> None:
    state = {"format": CHECKPOINT_FORMAT, "config": model.encoder.config, "vocab": vocab.to_dict(),
             "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind


def _read_checkpoint(path: str, map_location="cpu") -> dict:
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a hierkern training checkpoint")
    return state


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> tuple[HierarchicalEncoder, CharVocab]:
    """The trained encoder and its vocabulary from a ``python -m hierkern train --checkpoint`` file.

    Args:
        path: the checkpoint.
        map_location: where to load the tensors.

    Returns:
        ``(encoder, vocab)``, the encoder in eval mode.
    """
    state = _read_checkpoint(os.fspath(path), map_location)
    encoder = HierarchicalEncoder(**state["config"])
    prefix = "encoder."
    encoder.load_state_dict({k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)})
    return encoder.eval(), CharVocab.from_dict(state["vocab"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hierkern train",
                                description="Train a hierarchical char->word->sentence encoder with a "
                                            "masked-character objective.")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps to run (default 200)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="resume from PATH if it exists (model, vocab, optimizer); save to PATH at the end")
    p.add_argument("--corpus", metavar="FILE",
                   help="UTF-8 text, one sentence per line (default: the embedded generated corpus)")
    p.add_argument("--corpus-size", type=int, default=20000, help="sentences of the embedded corpus")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per step and process")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--char-layers", type=int, default=2)
    p.add_argument("--word-layers", type=int, default=2)
    p.add_argument("--pooling", choices=POOLING_MODES, default="cls")
    p.add_argument("--positional", choices=("sinusoidal", "learned"), default="sinusoidal")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--max-word-len", type=int, default=DEFAULT_MAX_WORD_LEN)
    p.add_argument("--mask-prob", type=float, default=0.15)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20, help="linear learning-rate warm-up steps")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU intra-op threads per process (default 1: this model's matrices are small, so "
                        "threads cost more than they save and oversubscribe shared machines; scale out with "
                        "torchrun instead; 0 keeps torch's default)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _read_corpus(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        sentences = [line.strip() for line in f]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise ValueError(f"--corpus {path} has no non-empty lines")
    return sentences


def main(argv: Sequence[str] | None = None) -> dict:
    """Run training; returns the summary (``first_loss``, ``last_loss``, ``chars_per_s``, ``steps``, ...).

    Args:
        argv: command-line arguments after ``train`` (``None`` reads ``sys.argv``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA device is available")
    if args.threads < 0:
        parser.error("--threads must be non-negative")
    if args.threads:
        torch.set_num_threads(args.threads)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world_size > 1
    if distributed:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        rank = dist.get_rank()
    else:
        rank = 0
    device = torch.device(args.device)
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if distributed else 0)
        torch.cuda.set_device(device)
    log = print if rank == 0 else (lambda *a, **k: None)

    try:
        return _train(args, device, rank, world_size, distributed, log)
    finally:
        if distributed:
            dist.destroy_process_group()


def _train(args, device, rank, world_size, distributed, log) -> dict:
    sentences = _read_corpus(args.corpus) if args.corpus else default_corpus(args.corpus_size, seed=args.seed)
    resume = _read_checkpoint(args.checkpoint) if args.checkpoint and os.path.exists(args.checkpoint) else None
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if resume is not None:
        vocab = CharVocab.from_dict(resume["vocab"])
        encoder = HierarchicalEncoder(**resume["config"])
    else:
        vocab = CharVocab.from_texts(sentences)
        encoder = HierarchicalEncoder(len(vocab), args.dim, args.heads, args.char_layers, args.word_layers,
                                      pooling=args.pooling, dropout=args.dropout, positional=args.positional,
                                      max_word_len=args.max_word_len, cls_id=CharVocab.CLS)
    model = MaskedCharModel(encoder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        start = resume["step"]
        log(f"resumed from {args.checkpoint} at step {start}", flush=True)
    model.to(device)
    # Optimizer state loaded on the CPU must follow the parameters.
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(device)

    net = torch.compile(model, dynamic=True) if args.compile else model
    if distributed:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = (DistributedSampler(sentences, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                                  drop_last=True) if distributed
               else RandomSampler(sentences, generator=torch.Generator().manual_seed(args.seed)))
    loader = DataLoader(sentences, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                        collate_fn=collate_fn(vocab, max_word_len=args.max_word_len))
    if len(loader) == 0:
        raise ValueError(f"the corpus has {len(sentences)} sentences, fewer than one batch of "
                         f"{args.batch_size} per process")
    mask_rng = torch.Generator().manual_seed(args.seed * 1000 + rank)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"hierkern train: {len(sentences)} sentences, vocab {len(vocab)}, {n_params / 1e6:.2f}M parameters, "
        f"device {device}, {world_size} process(es), pooling {encoder.pooling}", flush=True)

    def lr_at(step: int) -> float:
        return args.lr * min(1.0, step / max(1, args.warmup))

    net.train()
    epoch, batches = 0, iter(())
    first_loss, window, chars = None, [], 0
    t0 = time.perf_counter()
    for step in range(start + 1, start + args.steps + 1):
        batch = next(batches, None)
        if batch is None:
            if distributed:
                sampler.set_epoch(epoch)
            epoch += 1
            batches = iter(loader)
            batch = next(batches)
        batch, positions, targets = mask_chars(batch, args.mask_prob, mask_rng)
        if args.compile:
            batch = _bucket_max_lens(batch, encoder)
        if device.type == "cuda":
            # Pinned after masking (masking makes new tensors), so the copies below are asynchronous.
            batch = batch.pin_memory()
        batch = batch.to(device, non_blocking=True)
        positions, targets = positions.to(device), targets.to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = F.cross_entropy(net(batch, positions), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        chars += batch.num_chars
        window.append(loss.detach())
        if first_loss is None:
            first_loss = _mean_over_ranks(loss.detach(), distributed)
        if step % args.log_every == 0 or step == start + args.steps:
            value = _mean_over_ranks(torch.stack(window).mean(), distributed)
            elapsed = time.perf_counter() - t0
            log(f"step {step}/{start + args.steps} loss={value:.4f} lr={lr_at(step):.2e} "
                f"chars/s={chars * world_size / elapsed:.0f}", flush=True)
            last_loss, window = value, []
    elapsed = time.perf_counter() - t0
    chars_per_s = chars * world_size / elapsed
    log(f"done: {args.steps} steps, loss {first_loss:.4f} -> {last_loss:.4f} (first step -> last window), "
        f"{chars_per_s:.0f} chars/s, {elapsed:.1f} s", flush=True)
    if args.checkpoint and rank == 0:
        _save_checkpoint(args.checkpoint, model, vocab, optimizer, start + args.steps)
        log(f"saved {args.checkpoint}", flush=True)
    return {"steps": args.steps, "first_loss": first_loss, "last_loss": last_loss, "chars_per_s": chars_per_s,
            "seconds": elapsed, "final_step": start + args.steps}


def _mean_over_ranks(value: torch.Tensor, distributed: bool) -> float:
    if distributed:
        value = value.detach().clone().float()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)
