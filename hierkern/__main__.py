"""Command line: ``python -m hierkern {train,report,doctor} ...`` (``--help`` on each lists its options)."""

from __future__ import annotations

import argparse
import sys

COMMANDS = {
    "train": "train a HierarchicalEncoder with a masked-character objective (checkpoints, resume, DDP)",
    "report": "speedup table and plot from `pytest benchmarks --benchmark-json FILE` output "
    "(the same as `python -m hierkern.bench report`)",
    "doctor": "which backends run here and why, the toolchain that compiles the kernels, the versions",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hierkern",
        description="hierkern: fused attention over ragged, nested text.",
        epilog="`python -m hierkern COMMAND --help` lists a command's options and their defaults.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        commands.add_parser(name, help=help_text)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        try:
            _parser().parse_args(argv)  # prints the help, or the usage and the error
        except SystemExit as done:  # argparse's way out: 0 after --help, 2 after a usage error
            return int(done.code or 0)
        return 2
    # Each command parses its own options, so its --help is the authoritative one.
    command, rest = argv[0], argv[1:]
    if command == "train":
        from .train import TrainingStopped
        from .train import main as train_main

        try:
            train_main(rest)
        except TrainingStopped as e:
            print(f"hierkern train: {e}", file=sys.stderr)
            return e.exit_code
        return 0
    if command == "report":
        from .bench.__main__ import main as bench_main

        return bench_main(["report", *rest])
    from .doctor import main as doctor_main

    return doctor_main(rest)


if __name__ == "__main__":
    sys.exit(main())
