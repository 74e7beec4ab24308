"""``python -m hierkern.bench report results.json [more.json ...] [--plot out.png] [--detail]``."""

from __future__ import annotations

import argparse
import sys

from .report import PlotUnavailable, detail_table, load, plot_speedups, speedup_range, summary_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hierkern.bench",
        description="Read pytest-benchmark JSON written by `pytest benchmarks --benchmark-json FILE` and "
                    "print hierkern's speedup over the fastest torch baseline of every group.")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="speedup tables (and a PNG plot with --plot)")
    report.add_argument("results", nargs="+", help="pytest-benchmark JSON file(s)")
    report.add_argument("--plot", metavar="PNG", help="also write speedup vs mean segment length to PNG "
                        "(needs matplotlib: pip install 'hierkern[plot]')")
    report.add_argument("--detail", action="store_true",
                        help="also print every implementation with GB/s, tokens/s and peak memory")
    args = parser.parse_args(argv)

    try:
        groups = load(args.results)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not groups:
        print("error: no benchmarks in " + ", ".join(args.results), file=sys.stderr)
        return 2
    print("Speedup = median of the fastest torch-* baseline / median of the fastest hierkern-* "
          "implementation, per group.\n")
    print(summary_table(groups))
    span = speedup_range(groups)
    if span is not None:
        print(f"\nhierkern vs torch over {len(groups)} groups: {span[0]:.2f}x to {span[1]:.2f}x")
    if args.detail:
        print("\n" + detail_table(groups))
    if args.plot:
        try:
            plot_speedups(groups, args.plot)
        except PlotUnavailable as exc:
            print(f"\nno plot written: {exc}", file=sys.stderr)
            return 1
        print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
