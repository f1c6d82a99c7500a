"""The GPU check's markdown summary: every figure beside its target, then each stage's numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

GB = 1e9


def _f(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def write_summary(path: Path, result: dict[str, Any]) -> None:
    lines = [
        f"# {result['what']}",
        "",
        f"- device: {result.get('device') or '-'}; commit {result.get('commit')}; {result.get('date')}",
        f"- command: `{result['command']}`",
        f"- wall time: {_f(result.get('wall_seconds'), '.0f')} s of {_f(result.get('total_cap_seconds'), '.0f')} s",
        f"- verdict: {_verdict(result['stages'])}",
        "",
        "| stage | status | seconds | cap |",
        "|---|---|---:|---:|",
    ]
    for name, stage in result["stages"].items():
        why = "; ".join([*([stage["error"]] if stage.get("error") else []), *stage.get("failures", [])])
        why = f" ({why})" if why else ""
        lines.append(
            f"| {name} | {stage['status']}{why} | {_f(stage.get('seconds'), '.0f')} | {_f(stage.get('cap_seconds'), '.0f')} |"
        )
    targets = [dict(t, stage=name) for name, s in result["stages"].items() for t in s.get("targets", [])]
    lines += ["", "## Targets", "", "| stage | target | value | status |", "|---|---|---|---|"]
    lines += [
        f"| {t['stage']} | {t['target']}{' (invariant)' if t.get('invariant') else ''} | {_f(t['value'])} | {t['status']} |"
        for t in targets
    ]
    stages = result["stages"]
    for name, section in (
        ("machine", _machine),
        ("tests", _tests),
        ("budget", _budget),
        ("kernels", _kernels),
        ("e2e", _e2e),
        ("host", _host),
    ):
        if name in stages:
            lines += ["", f"## {name}", "", *section(stages[name])]
    path.write_text("\n".join(lines) + "\n")


def _verdict(stages: dict[str, Any]) -> str:
    bad = [f"{name} {s['status']}" for name, s in stages.items() if s["status"] != "ok"]
    return "every stage ok" if not bad else "NOT OK: " + ", ".join(bad)


def _machine(s: dict[str, Any]) -> list[str]:
    out = [f"- device: {s.get('device')}", f"- versions: {s.get('versions')}"]
    h2d = s.get("h2d") or {}
    if h2d:

        def pinned(name: str, label: str) -> str:  # a figure only from memory that really is page-locked
            if h2d.get(f"{name}_gb_per_s") is not None:
                return f"{label} {_f(h2d.get(f'{name}_gb_per_s'))} GB/s"
            return f"{label}: {h2d.get(f'{name}_note') or '-'}"

        out.append(
            f"- host to device, one {h2d.get('bytes', 0) / 2**20:.0f} MiB copy: {pinned('registered', 'registered')}, "
            f"{pinned('torch_pinned', 'torch pinned')}, pageable {_f(h2d.get('pageable_gb_per_s'))} GB/s ({h2d.get('how')})"
        )
    for shape, c in (s.get("h2d_expert_copies") or {}).items():
        out.append(
            f"- {shape} experts ({c['expert_bytes'] / 1e6:.1f} MB) back to back through the copy engine, host "
            f"memory {c.get('host_memory', '-')}: {_f(c.get('engine_gb_per_s'))} GB/s (engine), "
            f"{_f(c.get('wall_gb_per_s'))} GB/s (wall), {c['copies']} copies"
        )
    bw = s.get("device_bandwidth") or {}
    if bw:
        out.append(f"- device memory: {_f(bw.get('gb_per_s'), '.0f')} GB/s ({bw.get('how')})")
    return out


def _tests(s: dict[str, Any]) -> list[str]:
    counts = ", ".join(f"{n} {k}" for k, n in (s.get("counts") or {}).items()) or "none"
    out = [f"- `{s.get('command')}`", f"- {s.get('collected')} collected: {counts}"]
    out += [f"- collection error in {e['test']}: {e['message']}" for e in s.get("collect_errors", [])]
    out += [
        f"- {t['outcome'].upper()} {t['test']} ({_f(t['seconds'], '.1f')} s): {t['message']}"
        for t in s.get("tests", [])
        if t["outcome"] in ("failed", "error", "timeout")
    ]
    ran = [t for t in s.get("tests", []) if t["outcome"] != "skipped"]
    slowest = sorted(ran, key=lambda t: -t["seconds"])[:5]
    if slowest:
        out.append("- slowest: " + ", ".join(f"{t['test']} {_f(t['seconds'], '.1f')} s" for t in slowest))
    return out


def _budget(s: dict[str, Any]) -> list[str]:
    out = [
        f"{s.get('shape')}; prompt {s.get('prompt_tokens')} + {s.get('new_tokens')} new tokens, max_context {s.get('max_context')}",
        "",
        "| slots | budget GB | planned GB | peak alloc GB | peak reserved GB | driver peak over pre-load GB (samples) | loaded - (resident + slots) MB | generate added GB | planned workspace + KV GB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in s.get("rows", []):

        def g(key: str, r: dict[str, Any] = r) -> float | None:
            return None if r.get(key) is None else r[key] / GB

        delta = r.get("loaded_vs_planned_resident_and_slots")
        driver = f"{_f(g('driver_peak_used_over_baseline_bytes'))} ({_f(r.get('driver_samples'), 'd')})"
        out.append(
            f"| {r['planned']['slots']} | {_f(g('budget_bytes'))} | {_f(g('planned_bytes'))} | {_f(g('peak_allocated_bytes'))} | "
            f"{_f(g('peak_reserved_bytes'))} | {driver} | {_f(None if delta is None else delta / 1e6, '.1f')} | "
            f"{_f(g('generate_added_bytes'))} | {_f(g('planned_workspace_and_kv_bytes'))} |"
        )
    out += [
        f"- {r['planned']['slots']} slots: driver sampler: {r['driver_sampler_error']}"
        for r in s.get("rows", [])
        if r.get("driver_sampler_error")
    ]
    return out


def _kernels(s: dict[str, Any]) -> list[str]:
    out = [
        f"dtype {s.get('dtype')}; peak {_f((s.get('peak_bytes_per_s') or 0) / GB, '.0f')} GB/s ({s.get('peak_measured_with')})",
        "",
        "| model | tokens | impl | kernel us | call us | GB/s | % peak | TFLOP/s | max abs err | ok |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in s.get("rows", []):
        if "error" in r:
            out.append(f"| {r['model']} | {r['tokens']} | {r['impl']} | error: {r['error']} | | | | | | |")
            continue
        out.append(
            f"| {r['model']} | {r['tokens']} | {r['impl']} | {_f(r.get('kernel_us'), '.1f')} | {_f(r.get('call_us'), '.1f')} | "
            f"{_f(r.get('gbps'), '.0f')} | {_f(r.get('pct_peak'), '.1f')} | {_f(r.get('tflops'))} | "
            f"{_f(r.get('max_abs_err_vs_torch'), '.1e')} | {r.get('within_tolerance')} |"
        )
    out += [f"- skipped {k['model']} T={k['tokens']}: {k['reason']}" for k in s.get("skipped", [])]
    return out


def _e2e(s: dict[str, Any]) -> list[str]:
    out = [
        "| shape | variant | decode tok/s | s/token | floor s/token | time/floor | hit rate | on host | copy GB/s | peak dev GB | budget GB | est. s | took s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in s.get("results", []):
        for r in result.get("rows", []):
            est = (r.get("estimate") or {}).get("total_s")
            if r.get("status") != "ran":
                why = str(r.get("reason", r.get("error", "")))[:120]
                out.append(
                    f"| {r.get('shape')} | {r.get('variant')} | {r.get('status')}: {why} ||||||||| {_f(est, '.0f')} | |"
                )
                continue
            d = r.get("decode") or {}
            budget = r.get("budget_bytes") or r.get("cap_bytes")
            host = (
                None
                if r["variant"] == "accelerate"
                else f"{r.get('host_compute')} {d.get('host_expert_calls')}"
            )
            out.append(
                f"| {r['shape']} | {r['variant']} | {_f(r.get('decode_tok_per_s'))} | {_f(r.get('s_per_token'), '.4f')} | "
                f"{_f(r.get('floor_s_per_token'), '.4f')} | {_f(r.get('time_over_floor'))} | {_f(d.get('hit_rate'), '.3f')} | "
                f"{_f(host)} | {_f(d.get('copy_gb_per_s'), '.1f')} | "
                f"{_f(None if r.get('peak_device_bytes') is None else r['peak_device_bytes'] / GB)} | "
                f"{_f(None if budget is None else budget / GB)} | {_f(est, '.0f')} | {_f(r.get('wall_s'), '.0f')} |"
            )
    for result in s.get("results", []):
        if result.get("host_rates_gbps"):
            out.append(f"- host rates behind the estimates (GB/s): {result['host_rates_gbps']}")
        for name, shape in (result.get("shapes") or {}).items():
            out.append(f"- {name}: {shape.get('budget')}; {shape.get('routing')}")
    return out


def _host(s: dict[str, Any]) -> list[str]:
    reads = ", ".join(f"{t} threads {_f(g)}" for t, g in (s.get("host_read_gbps") or {}).items())
    out = [
        f"host streaming read {_f(s.get('host_read_peak_gbps'))} GB/s ({reads}); each row against a read "
        "taken right before its format's kernels",
        "",
        "| shape | format | kernel | torch threads | tokens | ms | GB/s | read GB/s | % read |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    out += [
        f"| {r['shape']} | {r['format']} | {r['kernel']} | {r['torch_threads']} | {r['tokens']} | {_f(r['ms'])} | "
        f"{_f(r['gbps'])} | {_f(r['read_gbps'])} | {_f(100 * r['share_of_read'], '.0f')} |"
        for r in s.get("rows", [])
    ]
    conversion = s.get("int4pack_conversion")
    if conversion:
        blocks = conversion.get("fast_layout_blocks_of")
        out += [
            "",
            f"int4pack copy on {conversion.get('capability')}: "
            + (f"laid out by uint8 ops in blocks of {blocks} rows" if blocks else "torch's converter")
            + "; ms per expert: "
            + ", ".join(
                f"{r['format']} {_f(r['ms_per_expert'])} (torch's converter {_f(r['torch_converter_ms_per_expert'])})"
                for r in conversion.get("rows", [])
            ),
        ]
    return out
