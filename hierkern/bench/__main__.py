"""``python -m hierkern.bench report results.json [more.json ...] [--plot out.png] [--detail] [--all]``."""

from __future__ import annotations

import argparse
import sys

from .report import (
    SPREAD_WARNING,
    PlotUnavailable,
    detail_table,
    load_run,
    plot_speedups,
    speedup_range,
    spread_warnings,
    summary_table,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hierkern.bench",
        description="Read pytest-benchmark JSON written by `pytest benchmarks --benchmark-json FILE` and "
        "print hierkern's speedup over the fastest torch baseline of every group.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="speedup tables (and a PNG plot with --plot)")
    report.add_argument("results", nargs="+", help="pytest-benchmark JSON file(s)")
    report.add_argument(
        "--plot",
        metavar="PNG",
        help="also write a PNG: per family, hierkern's fastest backend "
        "against each peer, per workload (needs matplotlib: pip install 'hierkern[plot]'; default: no plot)",
    )
    report.add_argument(
        "--detail",
        action="store_true",
        help="also print every implementation with its rounds (min, median, IQR), GB/s, "
        "%% of floor, tokens/s and peak memory (default: off)",
    )
    report.add_argument(
        "--all",
        action="store_true",
        help="plot the reference backend (hierkern's pure-PyTorch fallback) too (default: off)",
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    try:
        run = load_run(args.results)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    groups = run.groups
    if not groups:
        print("error: no benchmarks in " + ", ".join(args.results), file=sys.stderr)
        return 2
    print(f"{run.machine}, commit {run.commit}, {run.date}\n")
    print(
        "Speedup = median of the fastest torch-* baseline / median of the fastest hierkern-* "
        "implementation, per group.\n% of floor = time to move the group's floor bytes at the copy bandwidth "
        "measured in the run / hierkern's median.\n"
    )
    print(summary_table(groups))
    span = speedup_range(groups)
    excluded = [g for g in groups if g.runs_torch_code]
    if span is not None:
        counted = sum(1 for g in groups if g.best_hierkern and g.best_torch and not g.runs_torch_code)
        print(f"\nhierkern vs torch over {counted} groups: {span[0]:.2f}x to {span[1]:.2f}x")
    if excluded:
        plural = "s" * (len(excluded) != 1)
        print(
            f"* left out of that range: {len(excluded)} group{plural} with need_weights=True, where hierkern "
            f"deliberately runs torch's own code (the attention weights must be materialised)"
        )
    if run.failed:
        print("\nPeers that failed on their input (recorded as results):")
        for f in run.failed:
            print(f"  {f.get('group')}  {f.get('impl')}: {f.get('error')}")
    over = [g.name for g in groups for e in g.entries if (e.floor_fraction or 0) > 1]
    if over:
        print(
            f"\nWarning: {len(over)} entries run faster than their floor (% of floor above 100%): the copy "
            f"bandwidth was measured while the machine was busier than during their timing, so every % of "
            f"floor of this run is too high. Rerun on a quiet machine."
        )
    warnings = spread_warnings(groups)
    if warnings:
        print(
            f"\nWarning: wide spread (IQR over {100 * SPREAD_WARNING:.0f}% of the median) in {len(warnings)} "
            f"groups; their medians may be off by as much (a shared or busy machine?). Rerun quietly or with "
            f"more rounds (--benchmark-min-rounds)."
        )
        for line in warnings:
            print(f"  {line}")
    if args.detail:
        print("\n" + detail_table(groups))
    if args.plot:
        try:
            plot_speedups(
                groups,
                args.plot,
                failed=run.failed,
                include_reference=args.all,
                title=f"hierkern benchmarks: {run.machine}, commit {run.commit}, {run.date}",
            )
        except PlotUnavailable as exc:
            print(f"\nno plot written: {exc}", file=sys.stderr)
            return 1
        print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
