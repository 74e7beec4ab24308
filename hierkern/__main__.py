"""Command line: ``python -m hierkern train [--steps N] [--device cpu|cuda] ...`` (``--help`` for all)."""

import sys

USAGE = "usage: python -m hierkern train [--help] [options]"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\ncommands:\n  train    train a HierarchicalEncoder (masked-character objective)\n\n"
              "python -m hierkern train --help lists its options and their defaults")
        return 0 if argv else 2
    if argv[0] != "train":
        print(f"{USAGE}\nunknown command {argv[0]!r}", file=sys.stderr)
        return 2
    from .train import TrainingStopped, main as train_main
    try:
        train_main(argv[1:])
    except TrainingStopped as e:
        print(f"hierkern train: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
