"""The three outputs of a sweep: a CSV of every run, a Markdown table per trace, a plot of hit rate vs size."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no import cycle at run time: sweep imports this module
    from cache_policies.sweep import SweepRow

CSV_COLUMNS = (
    "trace",
    "policy",
    "scope",
    "cache_fraction",
    "slots",  # slots of one partition: per layer for scope "layer", all of them for "global"
    "total_slots",
    "accesses",
    "hits",
    "misses",
    "hit_rate",
    "belady_hit_rate",
    "share_of_belady",
    "evictions",
    "bytes_moved",  # empty when the trace does not give the expert size
    "tokens_per_s",  # simulated, with --copy-gbps and --layer-compute-ms; empty otherwise
    "stall_fraction",
)


def write_csv(path: Path, rows: Sequence[SweepRow]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            r = row.result
            writer.writerow(
                [
                    row.trace,
                    r.policy,
                    r.scope,
                    f"{row.fraction:g}",
                    r.capacity,
                    r.slots,
                    r.accesses,
                    r.hits,
                    r.misses,
                    f"{r.hit_rate:.6f}",
                    f"{row.belady.hit_rate:.6f}",
                    f"{row.share_of_belady:.6f}",
                    r.evictions,
                    "" if r.bytes_moved is None else r.bytes_moved,
                    "" if r.tokens_per_s is None else f"{r.tokens_per_s:.4g}",
                    "" if r.stall_fraction is None else f"{r.stall_fraction:.4f}",
                ]
            )


def _policies(rows: Sequence[SweepRow]) -> list[str]:
    """Policies in the order they were run, Belady first (it is the column the others are measured by)."""
    names = list(dict.fromkeys(row.result.policy for row in rows))
    return ["belady", *(name for name in names if name != "belady")]


def write_markdown(
    path: Path, rows: Sequence[SweepRow], traces: Sequence[tuple[str, str]], static_note: str
) -> None:
    """One table per trace: a row per (scope, fraction), each policy's hit rate and its share of Belady's."""
    policies = _policies(rows)
    lines = [
        "# Cache policy sweep",
        "",
        "Hit rate = resident expert uses / all expert uses (demand paging, no prefetch). In parentheses: the",
        "share of Belady's hit rate (the offline optimum at the same capacity). Bold: the best online policy of",
        "the row. `slots`: per layer for scope `layer`; in total for scope `global` (the same memory).",
        f"Note: {static_note}.",
        "",
    ]
    for label, description in traces:
        mine = [row for row in rows if row.trace == label]
        lines += [f"## {label}", "", f"{description}.", ""]
        lines.append("| scope | fraction | slots | " + " | ".join(policies) + " |")
        lines.append("|---|---:|---:|" + "---:|" * len(policies))
        groups: dict[tuple[str, float], dict[str, SweepRow]] = {}
        for row in mine:
            groups.setdefault((row.result.scope, row.fraction), {})[row.result.policy] = row
        for (scope, fraction), by_policy in groups.items():
            online = [name for name in policies if name != "belady" and name in by_policy]
            best = max((by_policy[name].result.hit_rate for name in online), default=None)
            any_row = next(iter(by_policy.values()))
            cells = [scope, f"{fraction:g}", str(any_row.result.capacity), f"{any_row.belady.hit_rate:.3f}"]
            for name in policies[1:]:
                if name not in by_policy:
                    cells.append("")
                    continue
                row = by_policy[name]
                cell = f"{row.result.hit_rate:.3f} ({100 * row.share_of_belady:.1f}%)"
                cells.append(f"**{cell}**" if row.result.hit_rate == best else cell)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    path.write_text("\n".join(lines))


def write_plot(path: Path, rows: Sequence[SweepRow]) -> None:
    """Hit rate against cache fraction, one panel per (trace, scope), Belady drawn as the bound."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib only for the plot
    from matplotlib.figure import Figure

    panels = list(dict.fromkeys((row.trace, row.result.scope) for row in rows))
    policies = _policies(rows)
    cols = 2 if len(panels) > 1 else 1
    nrows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(6.0 * cols, 4.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False)
    markers = "osD^v<>ph*"
    for ax, (trace, scope) in zip(axes.flat, panels, strict=False):
        mine = [row for row in rows if row.trace == trace and row.result.scope == scope]
        for i, name in enumerate(policies):
            points = sorted((row.fraction, row.result.hit_rate) for row in mine if row.result.policy == name)
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            if name == "belady":
                ax.plot(
                    xs, ys, "k--", linewidth=2.2, marker="*", markersize=9, label="belady (offline bound)"
                )
                ax.fill_between(xs, ys, 1.0, color="0.93", zorder=0, label="unreachable without prefetch")
            else:
                ax.plot(xs, ys, marker=markers[i % len(markers)], linewidth=1.4, label=name)
        ax.set_title(f"{trace} - {scope} cache", fontsize=10)
        ax.set_xlabel("cache fraction (slots per layer / experts)")
        ax.set_ylabel("hit rate")
        ax.set_xscale("log", base=2)
        fractions = sorted({row.fraction for row in mine})
        ax.minorticks_off()
        ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=9)
    fig.savefig(path, dpi=110)
