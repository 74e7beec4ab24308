"""``python -m hierkern train``: train a ``HierarchicalEncoder`` with a masked-character objective.

Some characters inside words are replaced by ``CharVocab.MASK``; the model predicts each from its
character-stage state (the word's other characters: spelling) joined with its word's contextual vector
(the other words of the sentence). Runs on one process, or under ``torchrun --nproc-per-node N`` with
``DistributedDataParallel`` and a ``DistributedSampler`` (gloo on CPU, NCCL on CUDA).

Prints ``step <i>/<n> loss=<value> ...`` every ``--log-every`` steps and a final summary line
``done: <n> steps, loss <first> -> <last> ..., <chars/s> chars/s``, where ``first`` is the first step's
loss and ``last`` the mean over the last logging window (averaged over ranks).

Losing work: every argument is checked before anything is trained (argparse errors name the flag). With
``--checkpoint`` the run saves at the end, every ``--save-every`` steps, and on SIGINT/SIGTERM: the step under
way is finished (under torchrun on CUDA: up to the next ``--log-every`` step, where the ranks agree to stop),
the checkpoint written, and the process exits with ``128 + signal`` (130, 143). Saves are atomic. A loss
that is not finite stops the run (exit status 1) without saving the diverged model. Resuming takes the model
configuration from the checkpoint; a model flag that contradicts it is refused.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from .corpus import default_corpus
from .layout import Segments
from .nn.layers import POOLING_MODES, HierarchicalEncoder
from .text import DEFAULT_MAX_WORD_LEN, CharVocab, TextBatch, _atomic_write, collate_fn

__all__ = ["MaskedCharModel", "mask_chars", "load_checkpoint", "build_parser", "main", "TrainingStopped"]

CHECKPOINT_FORMAT = "hierkern.train/1"

# The model flags: destination -> (HierarchicalEncoder config key, default for a new model). They default to
# None in the parser so that a resumed run can tell a flag the user gave from one left out.
MODEL_FLAGS = {
    "dim": ("dim", 128),
    "heads": ("num_heads", 4),
    "char_layers": ("char_layers", 2),
    "word_layers": ("word_layers", 2),
    "pooling": ("pooling", "cls"),
    "positional": ("positional", "sinusoidal"),
    "dropout": ("dropout", 0.0),
    "max_word_len": ("max_word_len", DEFAULT_MAX_WORD_LEN),
}
# Dropout changes no parameter shape and no tokenization, so a resumed run may change it.
RESUME_MAY_CHANGE = {"dropout"}


class TrainingStopped(RuntimeError):
    """Training ended before its last step (a signal, or a loss that is not finite).

    Attributes:
        exit_code: the status ``python -m hierkern train`` exits with.
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


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


def mask_chars(
    batch: TextBatch, prob: float, generator: torch.Generator | None = None
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

    return TextBatch(
        batch.char_ids,
        bucket(batch.words, encoder.config["max_word_len"]),
        bucket(batch.sentences, encoder.config["max_sentence_len"]),
    )


def _save_checkpoint(path: str, model: MaskedCharModel, vocab: CharVocab, optimizer, step: int) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": model.encoder.config,
        "vocab": vocab.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
    }
    _atomic_write(path, lambda f: torch.save(state, f), binary=True)


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
    encoder.load_state_dict({k[len(prefix) :]: v for k, v in state["model"].items() if k.startswith(prefix)})
    return encoder.eval(), CharVocab.from_dict(state["vocab"])


def _number(kind: type, ok: Callable[[float], bool], requirement: str) -> Callable[[str], float]:
    """An argparse ``type`` accepting a ``kind`` (int or float) that satisfies ``ok``; argparse's error then
    names the flag: ``argument --dim: must be an integer >= 1, got '0'``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}") from None
        if (kind is float and not math.isfinite(value)) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    return parse


_positive = _number(int, lambda v: v >= 1, "an integer >= 1")
_non_negative = _number(int, lambda v: v >= 0, "an integer >= 0")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hierkern train",
        description="Train a hierarchical char->word->sentence encoder with a masked-character objective.",
        epilog="Model flags (--dim ... --max-word-len) left out of a resumed run take "
        "the checkpoint's values; one that contradicts the checkpoint is an "
        "error (except --dropout, which may change).",
    )
    p.add_argument("--steps", type=_positive, default=200, help="optimizer steps to run (default %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (default: off, eager)")
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="resume from PATH if it exists (model, vocab, optimizer, step); save to PATH at the end, "
        "every --save-every steps and on SIGINT/SIGTERM, creating its directory if needed "
        "(default: none, nothing is saved)",
    )
    p.add_argument(
        "--save-every",
        type=_non_negative,
        default=0,
        metavar="N",
        help="also save the checkpoint every N steps, against crashes that give no signal "
        "(default %(default)s: only at the end and on SIGINT/SIGTERM)",
    )
    p.add_argument(
        "--corpus", metavar="FILE", help="UTF-8 text, one sentence per line (default: the embedded generated corpus)"
    )
    p.add_argument(
        "--corpus-size", type=_positive, default=20000, help="sentences of the embedded corpus (default %(default)s)"
    )
    p.add_argument(
        "--batch-size", type=_positive, default=32, help="sentences per step and process (default %(default)s)"
    )
    for flag, dest, kind, help_text in (
        ("--dim", "dim", _positive, "model width, a multiple of --heads"),
        ("--heads", "heads", _positive, "attention heads"),
        ("--char-layers", "char_layers", _non_negative, "layers of the character stage"),
        ("--word-layers", "word_layers", _non_negative, "layers of the word stage"),
        ("--max-word-len", "max_word_len", _positive, "longest word kept whole (longer: head + tail)"),
    ):
        p.add_argument(flag, type=kind, help=f"{help_text} (default {MODEL_FLAGS[dest][1]})")
    p.add_argument(
        "--pooling", choices=POOLING_MODES, help=f"characters -> word vector (default {MODEL_FLAGS['pooling'][1]})"
    )
    p.add_argument(
        "--positional",
        choices=("sinusoidal", "learned"),
        help=f"position encoding (default {MODEL_FLAGS['positional'][1]})",
    )
    p.add_argument(
        "--dropout",
        type=_number(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
        help=f"dropout probability (default {MODEL_FLAGS['dropout'][1]})",
    )
    p.add_argument(
        "--mask-prob",
        type=_number(float, lambda v: 0.0 < v < 1.0, "a number in (0, 1)"),
        default=0.15,
        help="probability that a character is masked (default %(default)s)",
    )
    p.add_argument(
        "--lr",
        type=_number(float, lambda v: v > 0.0, "a finite number > 0"),
        default=2e-3,
        help="peak learning rate of AdamW (default %(default)s)",
    )
    p.add_argument(
        "--warmup", type=_non_negative, default=20, help="linear learning-rate warm-up steps (default %(default)s)"
    )
    p.add_argument(
        "--log-every",
        type=_positive,
        default=10,
        help="print the mean loss every N steps; on CUDA the loss is also checked for NaN/inf "
        "only then, to keep the loop free of host syncs (default %(default)s)",
    )
    p.add_argument(
        "--threads",
        type=_non_negative,
        default=1,
        help="CPU intra-op threads per process (default 1: this model's matrices are small, so "
        "threads cost more than they save and oversubscribe shared machines; scale out with "
        "torchrun instead; 0 keeps torch's default)",
    )
    p.add_argument(
        "--seed",
        type=_number(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
        default=0,
        help="seed of the corpus, initial weights, sampling and masking (default %(default)s)",
    )
    return p


def _read_corpus(parser: argparse.ArgumentParser, path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            sentences = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"--corpus {path}: cannot be read as UTF-8 text ({e})")
    sentences = [s for s in sentences if s]
    if not sentences:
        parser.error(f"--corpus {path} has no non-empty lines")
    return sentences


def _read_resume(parser: argparse.ArgumentParser, path: str) -> dict | None:
    """The checkpoint to resume from, ``None`` for a new run; refuses a path that cannot be saved to."""
    if os.path.isdir(path):
        parser.error(f"--checkpoint {path} is a directory; give a file in it, such as {path}/model.pt")
    if not os.path.exists(path):
        return None
    try:
        return _read_checkpoint(path)
    # Whatever the reason (not a zip, truncated, another format), this file is no checkpoint to resume,
    # and a run that went on would overwrite it at the end. torch.load's own message is left out: it
    # suggests weights_only=False, which would unpickle arbitrary code.
    except Exception as e:  # noqa: BLE001
        parser.error(
            f"--checkpoint {path} exists but is not a readable hierkern checkpoint "
            f"({type(e).__name__}); refusing to overwrite it"
        )


def _prepare_checkpoint_dir(parser: argparse.ArgumentParser, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):  # a real write: permissions alone miss read-only mounts
            pass
    except OSError as e:
        parser.error(f"--checkpoint {path}: cannot write in {directory} ({e.strerror or e})")


def _resolve_model_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, resume: dict | None) -> None:
    """Fill the model flags left out: the checkpoint's values on resume, else the defaults. A resumed run
    must never build one model and tokenize for another, so a contradicting flag is refused."""
    if resume is None:
        for dest, (_, default) in MODEL_FLAGS.items():
            if getattr(args, dest) is None:
                setattr(args, dest, default)
    else:
        saved = resume["config"]
        conflicts = [
            f"--{dest.replace('_', '-')} {getattr(args, dest)} (checkpoint: {saved[key]})"
            for dest, (key, _) in MODEL_FLAGS.items()
            if dest not in RESUME_MAY_CHANGE and getattr(args, dest) not in (None, saved[key])
        ]
        if conflicts:
            parser.error(
                f"--checkpoint {args.checkpoint} holds a different model: {', '.join(conflicts)}; "
                f"leave these flags out to continue it, or give a new --checkpoint path"
            )
        for dest, (key, _) in MODEL_FLAGS.items():
            if getattr(args, dest) is None:
                setattr(args, dest, saved[key])
    if args.dim % args.heads:
        parser.error(f"--dim {args.dim} must be a multiple of --heads {args.heads}")


def main(argv: Sequence[str] | None = None) -> dict:
    """Run training; returns the summary (``first_loss``, ``last_loss``, ``chars_per_s``, ``steps``, ...).

    Every argument is validated before any step runs (argparse's ``SystemExit(2)`` naming the flag).

    Args:
        argv: command-line arguments after ``train`` (``None`` reads ``sys.argv``).

    Raises:
        TrainingStopped: on SIGINT/SIGTERM (after saving) or when the loss stops being finite.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA device is available")
    if args.save_every and not args.checkpoint:
        parser.error("--save-every needs --checkpoint")
    resume = _read_resume(parser, args.checkpoint) if args.checkpoint else None
    _resolve_model_flags(parser, args, resume)
    sentences = _read_corpus(parser, args.corpus) if args.corpus else default_corpus(args.corpus_size, seed=args.seed)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_process = len(sentences) // world_size  # DistributedSampler(drop_last=True)
    if per_process < args.batch_size:
        parser.error(
            f"--batch-size {args.batch_size}: the corpus has {len(sentences)} sentences, "
            f"{per_process} per process, fewer than one batch"
        )
    if args.checkpoint:
        _prepare_checkpoint_dir(parser, args.checkpoint)
    if args.threads:
        torch.set_num_threads(args.threads)

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
        return _train(args, sentences, resume, device, rank, world_size, distributed, log)
    finally:
        if distributed:
            dist.destroy_process_group()


class _StopSignals:
    """While active, SIGINT and SIGTERM only record that the run should stop, so that the loop can finish its
    step and save. Signals after the first change nothing: the wind-down takes a step and a save, and torchrun
    relays a terminal's Ctrl-C to workers that already got it; SIGKILL still ends a run at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _record(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():  # the only thread that may set handlers
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            # None: a handler not installed from Python, which cannot be put back; the default is closest.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _first_nonfinite(losses: list[torch.Tensor], first_step: int) -> tuple[int, float] | None:
    """``(step, loss)`` of the first loss that is not finite, ``None`` if all are (one host sync)."""
    values = torch.stack(losses).float().cpu()
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad) == 0:
        return None
    i = int(bad[0])
    return first_step + i, float(values[i])


def _train(args, sentences, resume, device, rank, world_size, distributed, log) -> dict:
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if resume is not None:
        vocab = CharVocab.from_dict(resume["vocab"])
        encoder = HierarchicalEncoder(**{**resume["config"], "dropout": args.dropout})
    else:
        vocab = CharVocab.from_texts(sentences)
        encoder = HierarchicalEncoder(
            len(vocab),
            args.dim,
            args.heads,
            args.char_layers,
            args.word_layers,
            pooling=args.pooling,
            dropout=args.dropout,
            positional=args.positional,
            max_word_len=args.max_word_len,
            cls_id=CharVocab.CLS,
        )
    model = MaskedCharModel(encoder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        start = resume["step"]
        saved_dropout = resume["config"]["dropout"]
        change = f", dropout {saved_dropout} -> {args.dropout}" if args.dropout != saved_dropout else ""
        log(f"resumed from {args.checkpoint} at step {start}{change}", flush=True)
    model.to(device)
    # Optimizer state loaded on the CPU must follow the parameters.
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(device)

    net = torch.compile(model, dynamic=True) if args.compile else model
    if distributed:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = (
        DistributedSampler(sentences, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
        if distributed
        else RandomSampler(sentences, generator=torch.Generator().manual_seed(args.seed))
    )
    loader = DataLoader(
        sentences,
        batch_size=args.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_fn(vocab, max_word_len=args.max_word_len),
    )
    mask_rng = torch.Generator().manual_seed(args.seed * 1000 + rank)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"hierkern train: {len(sentences)} sentences, vocab {len(vocab)}, {n_params / 1e6:.2f}M parameters, "
        f"device {device}, {world_size} process(es), pooling {encoder.pooling}",
        flush=True,
    )

    def lr_at(step: int) -> float:
        return args.lr * min(1.0, step / max(1, args.warmup))

    def save(step: int) -> None:
        if rank == 0:
            _save_checkpoint(args.checkpoint, model, vocab, optimizer, step)
            log(f"saved {args.checkpoint} (step {step})", flush=True)

    final = start + args.steps
    # Reading a loss is free on the CPU but a host sync on CUDA, which would stall the queue of kernels
    # every step: there, losses are tested at the steps that sync anyway (logging) and before every save.
    check_every = 1 if device.type == "cpu" else args.log_every
    net.train()
    epoch, batches = 0, iter(())
    first_loss, window, unchecked, chars = None, [], [], 0
    t0 = time.perf_counter()
    with _StopSignals() as stop:
        for step in range(start + 1, final + 1):
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
            unchecked.append(loss.detach())
            if first_loss is None:
                first_loss = _mean_over_ranks(loss.detach(), distributed)

            logging = step % args.log_every == 0 or step == final
            saving = bool(args.checkpoint) and (step == final or (args.save_every and step % args.save_every == 0))
            # A process acts on its own signal at once only when it is alone: ranks must stop at one step,
            # which they agree on at the check steps.
            if not (logging or saving or step % check_every == 0 or (stop.signum and not distributed)):
                continue
            bad = _first_nonfinite(unchecked, step - len(unchecked) + 1)
            unchecked = []
            signum, diverged = stop.signum, bad is not None
            if distributed:
                flags = torch.tensor([signum, int(diverged)], device=device)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                signum, diverged = (int(v) for v in flags.tolist())
            if diverged:
                where = (
                    f"the loss is {bad[1]} at step {bad[0]}"
                    if bad is not None
                    else f"the loss of another process stopped being finite by step {step}"
                )
                kept = f"; {args.checkpoint} keeps its last save" if args.checkpoint else ""
                raise TrainingStopped(
                    f"training diverged: {where}; stopped without saving the model{kept} "
                    f"(try a lower --lr than {args.lr:g})",
                    1,
                )
            if logging:
                value = _mean_over_ranks(torch.stack(window).mean(), distributed)
                elapsed = time.perf_counter() - t0
                log(
                    f"step {step}/{final} loss={value:.4f} lr={lr_at(step):.2e} "
                    f"chars/s={chars * world_size / elapsed:.0f}",
                    flush=True,
                )
                last_loss, window = value, []
            if signum:
                name = signal.Signals(signum).name
                if args.checkpoint:
                    save(step)
                    if distributed:
                        dist.barrier()  # a rank exiting early would have torchrun kill rank 0 mid-save
                    outcome = f"saved {args.checkpoint}; run again with the same --checkpoint to resume"
                else:
                    outcome = "nothing saved (no --checkpoint)"
                raise TrainingStopped(f"interrupted by {name} after step {step}/{final}: {outcome}", 128 + signum)
            if saving:
                save(step)
    elapsed = time.perf_counter() - t0
    chars_per_s = chars * world_size / elapsed
    log(
        f"done: {args.steps} steps, loss {first_loss:.4f} -> {last_loss:.4f} (first step -> last window), "
        f"{chars_per_s:.0f} chars/s, {elapsed:.1f} s",
        flush=True,
    )
    return {
        "steps": args.steps,
        "first_loss": first_loss,
        "last_loss": last_loss,
        "chars_per_s": chars_per_s,
        "seconds": elapsed,
        "final_step": final,
    }


def _mean_over_ranks(value: torch.Tensor, distributed: bool) -> float:
    if distributed:
        value = value.detach().clone().float()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)
