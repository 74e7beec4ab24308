"""Turn pytest-benchmark JSON from ``pytest benchmarks`` into speedup tables and a plot.

Every benchmark entry carries ``extra_info["impl"]``: ``hierkern-*`` for ours, ``torch-*`` for the torch
baselines, anything else for other libraries (shown, never used as the baseline). Within a group
(``workload/mode/dtype``) the speedup of an implementation is the median time of the *fastest* torch
baseline divided by its median time: above 1 means faster than the best of what torch offers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Entry", "Group", "load", "summary_table", "detail_table", "plot_speedups", "PlotUnavailable"]


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


@dataclass(frozen=True)
class Entry:
    """One timed implementation in one group."""

    group: str
    impl: str
    median_s: float
    extra: dict

    @property
    def is_hierkern(self) -> bool:
        return self.impl.startswith("hierkern-")

    @property
    def is_torch(self) -> bool:
        return self.impl.startswith("torch-")


@dataclass
class Group:
    """All entries of one ``workload/mode/dtype`` group."""

    name: str
    entries: list[Entry]

    @property
    def best_torch(self) -> Entry | None:
        return min((e for e in self.entries if e.is_torch), key=lambda e: e.median_s, default=None)

    @property
    def best_hierkern(self) -> Entry | None:
        return min((e for e in self.entries if e.is_hierkern), key=lambda e: e.median_s, default=None)

    def speedup(self, entry: Entry) -> float | None:
        """Best torch median / ``entry``'s median; ``None`` without a torch baseline."""
        base = self.best_torch
        if base is None or entry.median_s <= 0:
            return None
        return base.median_s / entry.median_s

    def field(self, key: str):
        """A workload field (same for every entry of the group), from the first entry that has it."""
        return next((e.extra[key] for e in self.entries if key in e.extra), None)


def load(paths) -> list[Group]:
    """Read one or more pytest-benchmark JSON files into groups, in first-seen order.

    Args:
        paths: a path or a list of paths.

    Returns:
        The groups; entries sorted fastest first.

    Raises:
        ValueError: a file is not pytest-benchmark JSON, or an entry has no ``extra_info["impl"]``.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    groups: dict[str, list[Entry]] = {}
    for path in paths:
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
            raise ValueError(f"{path} is not pytest-benchmark JSON (no 'benchmarks' list); write it with "
                             f"`pytest benchmarks --benchmark-json {path}`")
        for bench in data["benchmarks"]:
            extra = bench.get("extra_info") or {}
            if "impl" not in extra:
                raise ValueError(f"{path}: benchmark {bench.get('fullname', bench.get('name'))!r} has no "
                                 f"extra_info['impl']; was it written by `pytest benchmarks`?")
            group = bench.get("group") or bench.get("name")
            groups.setdefault(group, []).append(
                Entry(group, extra["impl"], float(bench["stats"]["median"]), extra))
    return [Group(name, sorted(entries, key=lambda e: e.median_s)) for name, entries in groups.items()]


def _time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _format(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    right = [i > 0 and any(ch.isdigit() for ch in header[i] + "".join(r[i] for r in rows)) for i in
             range(len(header))]
    def line(cells):
        return "  ".join(str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(cells, widths, right))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def summary_table(groups: list[Group]) -> str:
    """One row per group: the fastest hierkern implementation vs the fastest torch baseline."""
    header = ["group", "mean len", "tokens", "best hierkern", "median", "best torch", "median", "speedup"]
    rows = []
    for g in groups:
        ours, base = g.best_hierkern, g.best_torch
        mean_len = g.field("mean_len")
        rows.append([
            g.name, "-" if mean_len is None else f"{mean_len:.1f}", str(g.field("tokens") or "-"),
            ours.impl if ours else "(none ran)", _time(ours.median_s) if ours else "-",
            base.impl if base else "(none ran)", _time(base.median_s) if base else "-",
            _ratio(g.speedup(ours)) if ours else "-",
        ])
    return _format(header, rows)


def detail_table(groups: list[Group]) -> str:
    """Every implementation of every group: median, achieved bandwidth, tokens/s, peak memory, speedup."""
    header = ["group", "impl", "median", "GB/s", "Mtok/s", "peak MiB", "vs best torch"]
    rows = []
    for g in groups:
        for e in g.entries:
            gbs, toks = e.extra.get("bytes_per_s"), e.extra.get("tokens_per_s")
            peak = e.extra.get("peak_memory_bytes")
            impl = e.impl + (f" (+mask build {_time(e.extra['mask_build_s'])})" if "mask_build_s" in e.extra
                             else "")
            rows.append([g.name, impl, _time(e.median_s), "-" if gbs is None else f"{gbs / 1e9:.2f}",
                         "-" if toks is None else f"{toks / 1e6:.2f}",
                         "-" if peak is None else f"{peak / 2 ** 20:.1f}", _ratio(g.speedup(e))])
    return _format(header, rows)


def plot_speedups(groups: list[Group], path) -> None:
    """Write a PNG: speedup of each hierkern implementation vs the best torch baseline against mean segment
    length, one marker style per (implementation, mode, dtype); the layer groups (``mha*``) in a second panel.

    Raises:
        PlotUnavailable: matplotlib is not installed.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("matplotlib is not installed; install it with `pip install 'hierkern[plot]'` "
                              "(or `pip install matplotlib`) to write the plot") from None
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for g in groups:
        mean_len = g.field("mean_len")
        if mean_len is None or mean_len <= 0:
            continue
        workload, _, rest = g.name.partition("/")
        panel = "layer (MultiheadAttention)" if workload.startswith("mha") else "attention core"
        for e in g.entries:
            s = g.speedup(e)
            if e.is_hierkern and s is not None:
                label = f"{e.impl}{' need_weights' if workload.startswith('mha-weights') else ''} {rest}"
                panels.setdefault(panel, {}).setdefault(label, []).append((mean_len, s))
    names = sorted(panels) or ["attention core"]
    fig, axes = plt.subplots(1, len(names), figsize=(7 * len(names), 5), squeeze=False)
    for ax, name in zip(axes[0], names):
        # Different workloads share a mean length, so points are not joined by lines.
        for i, (label, points) in enumerate(sorted(panels.get(name, {}).items())):
            ax.plot([p[0] for p in points], [p[1] for p in points], linestyle="none", marker="osD^v<>"[i % 7],
                    alpha=0.8, label=label)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("mean segment length (tokens)")
        ax.set_ylabel("speedup vs fastest torch baseline (x)")
        ax.set_title(f"{name}: hierkern vs torch (higher is faster)")
        if panels.get(name):
            ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def speedup_range(groups: list[Group]) -> tuple[float, float] | None:
    """Smallest and largest best-hierkern speedup over the groups that have both kinds."""
    values = [g.speedup(g.best_hierkern) for g in groups if g.best_hierkern and g.best_torch]
    values = [v for v in values if v is not None and math.isfinite(v)]
    return (min(values), max(values)) if values else None
