"""The outputs of a sweep: a CSV of every run, a Markdown table per trace, a plot of hit rate vs size."""

from __future__ import annotations

import csv
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cache_policies.study.sweep_grid import LoadedTrace, SweepRow

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
    "bytes_moved",  # demand + prefetch copies; empty when the trace does not give the expert size
    "tokens_per_s",  # simulated, with --copy-gbps and --layer-compute-ms; empty otherwise
    "stall_fraction",
    "prefetch",  # none | history (Belady: always none, the demand-paging bound)
    "history_window",  # empty without prefetch
    "prefetch_issued",  # experts copied in by prefetches (not counted in misses)
    "prefetch_hits",  # of those, found resident by a demand access
    "prefetch_wasted",  # of those, evicted before any demand access used them
    "prefetch_late",  # prefetch hits whose copy had not landed yet: timing model only, else empty
    "host",  # off | auto: the copy-or-compute rule (with --host-gbps)
    "host_computed",  # misses computed on the host instead of copied (not counted in misses)
    # the RAM tier under the device tier (--host-fractions); empty for a device tier over all of RAM
    "host_fraction",
    "host_slots",  # host slots of one partition
    "host_tier_hit_rate",  # copies whose expert was in RAM, of all the RAM tier's accesses
    "disk_reads",  # experts read from disk (on demand, and ahead)
    "disk_bytes",  # whole 4 KiB-aligned rows; empty when the trace does not give the expert size
    "belady_disk_reads",  # an offline-optimal RAM tier of the same size on the same accesses
)


def _blank(value: object) -> object:
    return "" if value is None else value


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
                    r.prefetch,
                    _blank(r.history_window),
                    r.prefetch_issued,
                    r.prefetch_hits,
                    r.prefetch_wasted,
                    _blank(r.prefetch_late),
                    r.host,
                    r.host_computed,
                    *_tier_cells(row),
                ]
            )


def _tier_cells(row: SweepRow) -> list[object]:
    tier = row.result.host_tier
    if tier is None or row.host_fraction is None:
        return [""] * 6
    return [
        f"{row.host_fraction:g}",
        tier.capacity,
        f"{tier.hit_rate:.6f}",
        tier.disk_reads,
        _blank(tier.disk_bytes),
        tier.belady_disk_reads,
    ]


def _policies(rows: Sequence[SweepRow]) -> list[str]:
    """Labels (``lru``, ``lru+history``) in the order they were run, Belady first (it is the column the
    others are measured by)."""
    names = list(dict.fromkeys(row.result.label for row in rows))
    return ["belady", *(name for name in names if name != "belady")]


def _prefetches(rows: Sequence[SweepRow]) -> bool:
    return any(row.result.prefetch != "none" for row in rows)


def write_markdown(
    path: Path, rows: Sequence[SweepRow], traces: Sequence[tuple[str, str]], static_note: str
) -> None:
    """One table per trace: a row per (scope, fraction), each policy's hit rate and its share of Belady's;
    runs over a RAM tier get a table of their own."""
    tiered = [row for row in rows if row.host_fraction is not None]
    rows = [row for row in rows if row.host_fraction is None]
    policies = _policies(rows)
    prefetching = _prefetches(rows)
    if prefetching:
        window = next(r.result.history_window for r in rows if r.result.prefetch == "history")
        header = [
            "Hit rate = resident expert uses / all expert uses. `+history`: the policy with history prefetch",
            f"(each layer's most used experts over its last {window} accesses, top-k of them fetched while the",
            "layer before runs); without the suffix, demand paging. In parentheses: the share of Belady's hit",
            "rate at the same capacity. Belady is the demand-paging bound and never prefetches: a prefetching",
            "policy can exceed it (over 100%), which is expected, since a prefetch makes an expert resident",
            "before its use, which demand paging cannot. Bold: the best online policy of the row, for each",
            "prefetch mode. `slots`: per layer for scope `layer`; in total for scope `global` (the same memory).",
        ]
    else:
        header = [
            "Hit rate = resident expert uses / all expert uses (demand paging, no prefetch). In parentheses: the",
            "share of Belady's hit rate (the offline optimum at the same capacity). Bold: the best online policy of",
            "the row. `slots`: per layer for scope `layer`; in total for scope `global` (the same memory).",
        ]
    ran_static = any(row.result.policy == "static" for row in rows)
    lines = ["# Cache policy sweep", "", *header, *([f"Note: {static_note}."] if ran_static else []), ""]
    for label, description in traces:
        mine = [row for row in rows if row.trace == label]
        lines += [f"## {label}", "", f"{description}.", ""]
        lines.append("| scope | fraction | slots | " + " | ".join(policies) + " |")
        lines.append("|---|---:|---:|" + "---:|" * len(policies))
        groups: dict[tuple[str, float], dict[str, SweepRow]] = {}
        for row in mine:
            groups.setdefault((row.result.scope, row.fraction), {})[row.result.label] = row
        for (scope, fraction), by_policy in groups.items():
            best: dict[str, float] = {}  # the best online hit rate of each prefetch mode
            for name in policies:
                if name != "belady" and name in by_policy:
                    r = by_policy[name].result
                    best[r.prefetch] = max(best.get(r.prefetch, 0.0), r.hit_rate)
            any_row = next(iter(by_policy.values()))
            cells = [scope, f"{fraction:g}", str(any_row.result.capacity), f"{any_row.belady.hit_rate:.3f}"]
            for name in policies[1:]:
                if name not in by_policy:
                    cells.append("")
                    continue
                row = by_policy[name]
                cell = f"{row.result.hit_rate:.3f} ({100 * row.share_of_belady:.1f}%)"
                cells.append(f"**{cell}**" if row.result.hit_rate == best[row.result.prefetch] else cell)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if prefetching:
            lines += _prefetch_table(mine)
        if any(row.result.host != "off" for row in mine):
            lines += _host_table(mine)
        mine_tiered = [row for row in tiered if row.trace == label]
        if mine_tiered:
            lines += _tier_table(mine_tiered)
    path.write_text("\n".join(lines))


def _tier_table(rows: Sequence[SweepRow]) -> list[str]:
    """Two tiers: the RAM tier's hit rate and disk reads per token, against a Belady RAM tier's reads."""
    lines = [
        "Two tiers (`--host-fractions`): the device tier as above over a RAM tier holding that fraction of the",
        "experts (the disk tier; the same policy). RAM hit rate: the device tier's copies whose expert was in",
        "RAM; disk reads per token, the policy's and an offline-optimal (Belady) RAM tier's on the same accesses.",
        "",
        "| scope | fraction | RAM fraction | policy | RAM hit rate | disk reads/token | Belady reads/token |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        r, tier = row.result, row.result.host_tier
        assert tier is not None and row.host_fraction is not None
        tokens = r.tokens or 1
        lines.append(
            f"| {r.scope} | {row.fraction:g} | {row.host_fraction:g} | {r.label} | {tier.hit_rate:.3f} | "
            f"{tier.disk_reads / tokens:.2f} | {tier.belady_disk_reads / tokens:.2f} |"
        )
    lines.append("")
    return lines


def _host_table(rows: Sequence[SweepRow]) -> list[str]:
    """Each policy with the copy-or-compute rule beside itself without: the split and simulated decode speed."""
    lines = [
        "Copy or compute (`+host`): each miss is copied or computed on the host, whichever the rule "
        "(cache_policies/copy_or_compute.py) finds faster; hits / copied / on host are shares of expert uses.",
        "",
        "| scope | fraction | policy | hits | copied | on host | tok/s copy only | tok/s with host |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    by_key = {
        (r.result.scope, r.fraction, r.result.policy, r.result.prefetch, r.result.host): r for r in rows
    }
    for (scope, fraction, policy, prefetch, host), row in by_key.items():
        if host == "off":
            continue
        base = by_key.get((scope, fraction, policy, prefetch, "off"))
        r = row.result
        uses = r.accesses or 1
        lines.append(
            f"| {scope} | {fraction:g} | {r.label} | {r.hits / uses:.3f} | {r.misses / uses:.3f} | "
            f"{r.host_computed / uses:.3f} | {_fmt(base.result.tokens_per_s if base else None, '.4g')} | "
            f"{_fmt(r.tokens_per_s, '.4g')} |"
        )
    lines.append("")
    return lines


def _prefetch_table(rows: Sequence[SweepRow]) -> list[str]:
    """What prefetch buys and costs, per (scope, fraction, policy) that ran with a prefetch mode."""
    timed = any(row.result.seconds is not None for row in rows)
    demand = {
        (r.result.scope, r.fraction, r.result.policy): r.result for r in rows if r.result.prefetch == "none"
    }
    lines = [
        "Prefetch: hit rate without and with it; prefetch copies per token; of those, the share a demand access",
        "used (`used`) and the share evicted unused (`wasted`; the rest were still resident at the end); expert",
        "copies (demand misses + prefetches) against demand paging's.",
        "",
    ]
    head = "| scope | fraction | policy | prefetch | hit rate | with prefetch | prefetches/token | used | wasted | copies |"
    rule = "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"
    if timed:
        head += " tokens/s | with prefetch | stall | with prefetch |"
        rule += "---:|---:|---:|---:|"
    lines += [head, rule]
    for row in rows:
        r = row.result
        if r.prefetch == "none":
            continue
        base = demand.get((r.scope, row.fraction, r.policy))
        issued = r.prefetch_issued
        cells = [
            r.scope,
            f"{row.fraction:g}",
            r.policy,
            r.prefetch,
            "" if base is None else f"{base.hit_rate:.3f}",
            f"{r.hit_rate:.3f}",
            f"{issued / r.tokens:.2f}" if r.tokens else "",
            f"{100 * r.prefetch_hits / issued:.1f}%" if issued else "",
            f"{100 * r.prefetch_wasted / issued:.1f}%" if issued else "",
            f"x{(r.misses + issued) / base.misses:.3f}" if base is not None and base.misses else "",
        ]
        if timed:
            cells += [
                _fmt(base.tokens_per_s if base else None, ".4g"),
                _fmt(r.tokens_per_s, ".4g"),
                _fmt(base.stall_fraction if base else None, ".3f"),
                _fmt(r.stall_fraction, ".3f"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def write_plot(path: Path, rows: Sequence[SweepRow]) -> None:
    """Hit rate against cache fraction, one panel per (trace, scope), Belady drawn as the bound."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib only for the plot
    from matplotlib.figure import Figure

    rows = [row for row in rows if row.host_fraction is None]  # the device tier's curves
    panels = list(dict.fromkeys((row.trace, row.result.scope) for row in rows))
    policies = _policies(rows)
    prefetching = _prefetches(rows)
    cols = 2 if len(panels) > 1 else 1
    nrows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(6.0 * cols, 4.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False)
    markers = "osD^v<>ph*"
    base_names = list(dict.fromkeys(row.result.policy for row in rows if row.result.policy != "belady"))
    for ax, (trace, scope) in zip(axes.flat, panels, strict=False):
        mine = [row for row in rows if row.trace == trace and row.result.scope == scope]
        for name in policies:
            points = sorted((row.fraction, row.result.hit_rate) for row in mine if row.result.label == name)
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            if name == "belady":
                bound = "belady (demand-paging bound)" if prefetching else "belady (offline bound)"
                ax.plot(xs, ys, "k--", linewidth=2.2, marker="*", markersize=9, label=bound)
                ax.fill_between(xs, ys, 1.0, color="0.93", zorder=0, label="unreachable without prefetch")
            else:  # one colour and marker per policy; dotted with prefetch
                policy, _, mode = name.partition("+")
                i = base_names.index(policy)
                style = ":" if mode else "-"
                ax.plot(
                    xs,
                    ys,
                    linestyle=style,
                    color=f"C{i % 10}",
                    marker=markers[i % len(markers)],
                    markerfacecolor="none" if mode else None,
                    linewidth=1.4,
                    label=name,
                )
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


def write_outputs(
    out: Path, rows: list[SweepRow], traces: Sequence[LoadedTrace], static_note: str
) -> list[str]:
    """Write the files beside ``out`` first, then move them in: never a half-written ``out``. Returns the names
    written; ``sweep.png`` only where matplotlib is installed."""
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        write_csv(tmp / "sweep.csv", rows)
        write_markdown(tmp / "sweep.md", rows, [(t.label, t.trace.describe()) for t in traces], static_note)
        names = ["sweep.csv", "sweep.md"]
        try:
            write_plot(tmp / "sweep.png", rows)
            names.append("sweep.png")
        except ImportError:  # matplotlib is an optional extra: the numbers do not need it
            pass
        if not out.exists():
            tmp.rename(out)
            return names
        for name in names:
            (tmp / name).replace(out / name)
        return names
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
