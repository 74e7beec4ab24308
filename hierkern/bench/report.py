"""Turn pytest-benchmark JSON from ``pytest benchmarks`` into speedup tables and a plot.

Every benchmark entry carries ``extra_info["impl"]``: ``hierkern-*`` for ours, ``torch-*`` for the torch
baselines, anything else for other libraries (shown, never used as the baseline). Within a group
(``workload/mode/dtype``) the speedup of an implementation is the median time of the *fastest* torch
baseline divided by its median time: above 1 means faster than the best of what torch offers.

``% of floor`` is the time the group's memory-traffic floor (``floor_bytes``: the bytes one call must move at
least) takes at the copy bandwidth measured in the same run on the same device, over the measured median:
100% would be a kernel that only moves its inputs and outputs at copy speed.

Groups whose entries have ``need_weights=True`` are groups where hierkern deliberately runs torch's own code
(the attention weights must be materialised); the summary's speedup range leaves them out and says so.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Entry",
    "Group",
    "Run",
    "load",
    "load_run",
    "summary_table",
    "detail_table",
    "spread_warnings",
    "plot_speedups",
    "speedup_range",
    "family_of",
    "PlotUnavailable",
    "FAMILIES",
    "SPREAD_WARNING",
]

# Plot panels, in this order, for the families present. Entries name theirs (``extra_info["family"]``);
# JSON written before that field existed gets it from the group name (``family_of``).
FAMILIES = ("attention core", "layer", "encoder stack", "seed model", "hf")

# A group is flagged when an implementation's interquartile range is more than this fraction of its median:
# the median itself may then be off by about as much (a shared machine, a thermal or frequency change).
SPREAD_WARNING = 0.25


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


@dataclass(frozen=True)
class Entry:
    """One timed implementation in one group (``stats``: pytest-benchmark's, in seconds)."""

    group: str
    impl: str
    median_s: float
    extra: dict
    stats: dict = field(default_factory=dict)

    @property
    def is_hierkern(self) -> bool:
        return self.impl.startswith("hierkern-")

    @property
    def is_torch(self) -> bool:
        return self.impl.startswith("torch-")

    @property
    def floor_fraction(self) -> float | None:
        """Floor time at the measured copy bandwidth / median; ``None`` when either is unknown."""
        if self.extra.get("floor_fraction") is not None:
            return self.extra["floor_fraction"]
        floor = self.extra.get("floor_bytes", self.extra.get("bytes"))  # "bytes": JSON before floor_bytes
        bandwidth = self.extra.get("copy_bandwidth_Bps")
        if not floor or not bandwidth or self.median_s <= 0:
            return None
        return floor / bandwidth / self.median_s

    @property
    def spread(self) -> float | None:
        """Interquartile range / median; ``None`` without the statistics."""
        iqr = self.stats.get("iqr")
        return None if iqr is None or self.median_s <= 0 else iqr / self.median_s


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

    @property
    def runs_torch_code(self) -> bool:
        """hierkern deliberately runs torch's own code here (``need_weights=True``)."""
        return bool(self.field("need_weights"))

    @property
    def family(self) -> str:
        return self.field("family") or family_of(self.name)

    def speedup(self, entry: Entry) -> float | None:
        """Best torch median / ``entry``'s median; ``None`` without a torch baseline."""
        base = self.best_torch
        if base is None or entry.median_s <= 0:
            return None
        return base.median_s / entry.median_s

    def field(self, key: str):
        """A workload field (same for every entry of the group), from the first entry that has it."""
        return next((e.extra[key] for e in self.entries if key in e.extra), None)


@dataclass
class Run:
    """What one or more JSON files hold: the groups, the baselines that failed, and where they ran."""

    groups: list[Group]
    failed: list[dict]
    machine: str
    commit: str
    date: str


def family_of(group: str) -> str:
    """The plot panel of a group from its name: ``mha*`` -> layer, ``seed-model*``, ``encoder*``, ``hf*``,
    else the attention core (whose groups are ``<workload>/<mode>/<dtype>``)."""
    head = group.split("/", 1)[0]
    for prefix, family in (("mha", "layer"), ("seed-model", "seed model"), ("encoder", "encoder stack"), ("hf", "hf")):
        if head.startswith(prefix):
            return family
    return "attention core"


def _describe(data: dict) -> tuple[str, str, str]:
    machine = data.get("machine_info") or {}
    info = data.get("hierkern") or {}
    device = info.get("cuda_device_name") or (machine.get("cpu") or {}).get("brand_raw") or machine.get("node")
    cores = (machine.get("cpu") or {}).get("count")
    if device and cores and not info.get("cuda_device_name"):
        device = f"{device}, {cores} cores"
    commit = data.get("commit_info") or {}
    sha = (commit.get("id") or "")[:7] + ("+dirty" if commit.get("dirty") else "")
    return device or "unknown device", sha or "unknown commit", (data.get("datetime") or "")[:10]


def load_run(paths) -> Run:
    """Read one or more pytest-benchmark JSON files.

    Args:
        paths: a path or a list of paths.

    Returns:
        A ``Run``: groups in first-seen order with entries sorted fastest first, the failed baselines, and
        the first file's device, commit and date.

    Raises:
        ValueError: a file is not pytest-benchmark JSON, or an entry has no ``extra_info["impl"]``.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    groups: dict[str, list[Entry]] = {}
    failed: list[dict] = []
    described = None
    for path in paths:
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
            raise ValueError(
                f"{path} is not pytest-benchmark JSON (no 'benchmarks' list); write it with "
                f"`pytest benchmarks --benchmark-json {path}`"
            )
        for bench in data["benchmarks"]:
            extra = bench.get("extra_info") or {}
            if "impl" not in extra:
                raise ValueError(
                    f"{path}: benchmark {bench.get('fullname', bench.get('name'))!r} has no "
                    f"extra_info['impl']; was it written by `pytest benchmarks`?"
                )
            group = bench.get("group") or bench.get("name")
            stats = {k: v for k, v in bench["stats"].items() if k != "data"}
            groups.setdefault(group, []).append(
                Entry(group, extra["impl"], float(bench["stats"]["median"]), extra, stats)
            )
        failed += (data.get("hierkern") or {}).get("failed", [])
        described = described or _describe(data)
    machine, commit, date = described or ("unknown device", "unknown commit", "")
    return Run(
        [Group(name, sorted(entries, key=lambda e: e.median_s)) for name, entries in groups.items()],
        failed,
        machine,
        commit,
        date,
    )


def load(paths) -> list[Group]:
    """The groups of ``load_run(paths)``."""
    return load_run(paths).groups


def _time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _format(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    right = [i > 0 and any(ch.isdigit() for ch in header[i] + "".join(r[i] for r in rows)) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def summary_table(groups: list[Group]) -> str:
    """One row per group: the fastest hierkern implementation vs the fastest torch baseline, and the
    fraction of its memory-traffic floor hierkern reaches. ``*``: hierkern runs torch's code there."""
    header = ["group", "mean len", "tokens", "best hierkern", "median", "best torch", "median", "speedup", "% of floor"]
    rows = []
    for g in groups:
        ours, base = g.best_hierkern, g.best_torch
        mean_len = g.field("mean_len")
        rows.append(
            [
                g.name + (" *" if g.runs_torch_code else ""),
                "-" if mean_len is None else f"{mean_len:.1f}",
                str(g.field("tokens") or "-"),
                ours.impl if ours else "(none ran)",
                _time(ours.median_s) if ours else "-",
                base.impl if base else "(none ran)",
                _time(base.median_s) if base else "-",
                _ratio(g.speedup(ours)) if ours else "-",
                _percent(ours.floor_fraction) if ours else "-",
            ]
        )
    return _format(header, rows)


def detail_table(groups: list[Group]) -> str:
    """Every implementation of every group: the spread of its rounds (min, median, interquartile range),
    achieved bandwidth, % of floor, tokens/s, peak memory and speedup."""
    header = [
        "group",
        "impl",
        "rounds",
        "min",
        "median",
        "IQR",
        "GB/s",
        "% of floor",
        "Mtok/s",
        "peak MiB",
        "vs best torch",
    ]
    rows = []
    for g in groups:
        for e in g.entries:
            gbs, toks = e.extra.get("bytes_per_s"), e.extra.get("tokens_per_s")
            peak = e.extra.get("peak_memory_bytes")
            notes = []
            if "block_size" in e.extra:
                notes.append(f"block {e.extra['block_size']}")
            if "mask_build_s" in e.extra:
                notes.append(f"+mask build {_time(e.extra['mask_build_s'])}")
            impl = e.impl + (f" ({', '.join(notes)})" if notes else "")
            spread = e.spread
            rows.append(
                [
                    g.name,
                    impl,
                    str(e.stats.get("rounds", "-")),
                    _time(e.stats["min"]) if "min" in e.stats else "-",
                    _time(e.median_s),
                    "-" if spread is None else f"{100 * spread:.0f}%",
                    "-" if gbs is None else f"{gbs / 1e9:.2f}",
                    _percent(e.floor_fraction),
                    "-" if toks is None else f"{toks / 1e6:.2f}",
                    "-" if peak is None else f"{peak / 2**20:.1f}",
                    _ratio(g.speedup(e)),
                ]
            )
    return _format(header, rows)


def spread_warnings(groups: list[Group], threshold: float = SPREAD_WARNING) -> list[str]:
    """One line per group in which an implementation's IQR exceeds ``threshold`` of its median."""
    out = []
    for g in groups:
        wide = [e for e in g.entries if e.spread is not None and e.spread > threshold]
        if wide:
            what = ", ".join(f"{e.impl} {100 * e.spread:.0f}% over {e.stats.get('rounds', '?')} rounds" for e in wide)
            out.append(f"{g.name}: IQR/median {what}")
    return out


def speedup_range(groups: list[Group]) -> tuple[float, float] | None:
    """Smallest and largest best-hierkern speedup over the groups that have both kinds, leaving out the
    groups where hierkern runs torch's own code (``Group.runs_torch_code``)."""
    values = [g.speedup(g.best_hierkern) for g in groups if g.best_hierkern and g.best_torch and not g.runs_torch_code]
    values = [v for v in values if v is not None and math.isfinite(v)]
    return (min(values), max(values)) if values else None


def _workload_label(g: Group, multiple_dtypes: bool) -> str:
    """``"<workload> <mode>"`` from the group's fields (benchmarks order their group names differently),
    else from a ``workload/mode/dtype`` name; the dtype only when the panel mixes dtypes."""
    parts = g.name.split("/")
    workload = g.field("workload") or re.sub(r"^mha-(weights-)?", "", parts[0])
    mode = g.field("mode") or (parts[1] if len(parts) > 1 else "")
    return f"{workload} {mode}".strip() + (f" {_dtype(g)}" if multiple_dtypes else "")


def _dtype(g: Group) -> str:
    parts = g.name.split("/")
    return g.field("dtype") or (parts[2] if len(parts) > 2 else "")


def plot_speedups(
    groups: list[Group], path, *, failed: list[dict] = (), title: str = "", include_reference: bool = False
) -> dict[str, list[tuple[str, str, float | None]]]:
    """Write a PNG: one panel per family (``FAMILIES`` order), one cluster of bars per workload group.

    Each bar is hierkern's fastest implementation against one peer in that group: the peer's median over
    ours (above 1: hierkern is faster), labelled with the value, on a log axis. Peers are every non-hierkern
    implementation (torch's and other libraries'); a peer that failed on the group's input is marked where
    its bar would be. ``hierkern-reference`` (the pure-PyTorch fallback) takes part only with
    ``include_reference``. Groups where hierkern runs torch's own code (``need_weights=True``) are left out.

    Returns:
        What was drawn: per panel, ``(group, peer, peer median / ours)`` per bar, ``None`` for a failure.

    Raises:
        PlotUnavailable: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(
            "matplotlib is not installed; install it with `pip install 'hierkern[plot]'` "
            "(or `pip install matplotlib`) to write the plot"
        ) from None

    def ours(g: Group) -> Entry | None:
        return min(
            (e for e in g.entries if e.is_hierkern and (include_reference or e.impl != "hierkern-reference")),
            key=lambda e: e.median_s,
            default=None,
        )

    failures: dict[str, list[str]] = {}
    for f in failed:
        failures.setdefault(f.get("group", ""), []).append(f.get("impl", "?"))
    panels: dict[str, list[Group]] = {}
    for g in groups:
        if not g.runs_torch_code and ours(g) is not None:
            panels.setdefault(g.family, []).append(g)
    names = [f for f in FAMILIES if f in panels] + sorted(set(panels) - set(FAMILIES))
    peers = sorted(
        {e.impl for gs in panels.values() for g in gs for e in g.entries if not e.is_hierkern}
        | {i for gs in panels.values() for g in gs for i in failures.get(g.name, [])}
    )
    if include_reference:
        peers.append("hierkern-reference")
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(peers)}
    plotted: dict[str, list[tuple[str, str, float | None]]] = {}

    width_units = max([len(panels[n]) for n in names] + [4])
    fig, axes = plt.subplots(
        len(names) or 1, 1, squeeze=False, figsize=(max(8.0, 0.75 * width_units + 2.5), 3.6 * max(len(names), 1) + 1.2)
    )
    for ax, name in zip(axes[:, 0], names or ["(no groups)"]):
        gs = panels.get(name, [])
        multiple_dtypes = len({_dtype(g) for g in gs}) > 1
        ymax = ymin = 1.0
        for x, g in enumerate(gs):
            best = ours(g)
            shown = [
                e
                for e in g.entries
                if not e.is_hierkern or (include_reference and e.impl == "hierkern-reference" and e is not best)
            ]
            bars = [(e.impl, e.median_s / best.median_s) for e in shown]
            bars += [(impl, None) for impl in failures.get(g.name, []) if impl not in {b[0] for b in bars}]
            bars.sort(key=lambda b: peers.index(b[0]))
            # At most a quarter of a cluster per bar, so a lone bar does not fill its cluster.
            step = min(0.8 / max(len(bars), 1), 0.25)
            for i, (impl, value) in enumerate(bars):
                pos = x + step * (i + 0.5 - len(bars) / 2)
                plotted.setdefault(name, []).append((g.name, impl, value))
                if value is None:  # the peer raised on this input
                    ax.text(
                        pos,
                        1.0,
                        "fails",
                        rotation=90,
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        bbox=dict(facecolor=colors[impl], alpha=0.35, linewidth=0, pad=1),
                    )
                    continue
                ax.bar(pos, value, width=step * 0.9, color=colors[impl])
                ax.text(
                    pos,
                    value * 1.05,
                    f"{value:.1f}x" if value < 100 else f"{value:.0f}x",
                    rotation=90,
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
                ymax, ymin = max(ymax, value), min(ymin, value)
        ax.set_yscale("log")
        ax.set_ylim(ymin / 2, ymax * 8)  # room above the tallest bar for its label
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(gs)))
        ax.set_xticklabels(
            [_workload_label(g, multiple_dtypes) for g in gs],
            fontsize=8,
            rotation=30,
            ha="right",
            rotation_mode="anchor",
        )
        ax.set_xlim(-0.6, max(len(gs), 1) - 0.4)
        ax.set_ylabel("peer time / hierkern time")
        ax.set_title(f"{name}: hierkern's fastest backend vs each peer (above 1 = hierkern faster)", fontsize=10)
        ax.grid(True, axis="y", which="major", alpha=0.3)
    handles = [matplotlib.patches.Patch(color=colors[p], label=p) for p in peers]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    fig.suptitle(title or "hierkern benchmarks", fontsize=11)
    legend_rows = math.ceil(len(handles) / 4)
    fig.tight_layout(rect=(0, 0.03 + 0.025 * legend_rows, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return plotted
