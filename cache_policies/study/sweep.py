"""``offload-bench sweep``: hit rates of every policy x cache size x scope on routing traces, Belady beside them.

    offload-bench sweep --trace olmoe.jsonl --trace flame.npz --policies lru,lfu,fifo,belady \\
        --cache-fractions 0.125,0.25,0.5 --scope both --prefetch none,history --out results/

Capacity: per-layer slots = round(fraction x experts) (halves round up); global slots = that x layers, so
both scopes get the same device memory. Belady, the offline optimum, is always run: every policy is
reported as a share of its hit rate. Writes ``sweep.csv``, ``sweep.md`` and ``sweep.png`` into ``--out``.
With ``--copy-gbps`` and ``--layer-compute-ms`` (and the expert size, from the trace or ``--expert-bytes``)
the CSV also gets simulated tokens/s and stall fraction (the timing model of :mod:`cache_policies.study.simulator`).
``--host-gbps`` adds a run of every policy with the copy-or-compute rule at that host rate (``lru+host``): the
CSV gets the split (``host_computed``) and ``sweep.md`` a table of hits / copied / on host and tokens/s.
``--format int4`` (or int8, mxfp4, fp8) counts each expert in that format's bytes instead of the trace's 16-bit
size, and names the trace ``<label>-int4`` in the outputs.

``--host-fractions 0.25,0.5`` also runs every online policy over a RAM tier under the device tier (the disk
tier: host slots for that fraction of the experts, the same policy; counted, not timed): the CSV gains the RAM
tier's hit rate, disk reads and bytes, and the disk reads of a Belady RAM tier on the same accesses; ``sweep.md``
gains a table of them (:mod:`cache_policies.study.two_tier`).

``--prefetch none,history`` runs every policy once per prefetch mode (``history``: the history predictor of
``--history-window`` accesses, by the runtime's protocol, see :mod:`cache_policies.study.simulator`); the tables
and the plot name a prefetching policy ``lru+history``. Belady runs without prefetch only: it is the bound of
demand paging, and a prefetching policy can beat it.

Everything is validated (traces read, policies and fractions checked) before anything is written, and the
files are written to a temporary directory and moved into place at the end, so a failed sweep leaves
``--out`` as it was. Bad input: one line on stderr and exit code 2. The plot needs matplotlib (the ``plot``
extra); without it the sweep writes the CSV and the tables and says so.

``--config FILE`` reads a sweep grid from TOML whose keys are the long options (``trace = ["a.jsonl"]``,
``policies = "lru,lfu,lfru"``, ``cache-fractions = "0.125,0.25"``): the grids in ``configs/sweeps/``. Options
on the command line win.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from cache_policies.cache import Scope
from cache_policies.registry import POLICIES
from cache_policies.study.access import AccessSequence, expert_counts
from cache_policies.study.expert_formats import BYTES_PER_WEIGHT, expert_bytes_in
from cache_policies.study.importers import load_trace
from cache_policies.study.presets import PresetParser, add_config_option
from cache_policies.study.simulator import SimPrefetch, TimingModel, check_prefetch
from cache_policies.study.sweep_grid import CapacityError, LoadedTrace, check_capacities, load_traces, sweep
from cache_policies.study.sweep_report import write_outputs
from cache_policies.study.trace import TraceError

DEFAULT_POLICIES = ("lru", "lfu", "fifo", "random", "lfru", "static", "belady")
DEFAULT_FRACTIONS = (0.125, 0.25, 0.5)


class UsageError(ValueError):
    """Bad command-line input."""


class OneLineParser(PresetParser):
    """argparse that reports a usage error as one line (``prog: error: ...``) and exits with code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_option(parser)  # a sweep grid in TOML: configs/sweeps/
    parser.add_argument(
        "--trace", action="append", required=True, metavar="FILE", help="routing trace (repeatable)"
    )
    parser.add_argument(
        "--policies",
        default=",".join(DEFAULT_POLICIES),
        help=f"comma-separated, from: {', '.join(POLICIES)} (default: all). Belady is always run.",
    )
    parser.add_argument(
        "--cache-fractions",
        default=",".join(map(str, DEFAULT_FRACTIONS)),
        help="comma-separated fractions of each layer's experts (default: 0.125,0.25,0.5)",
    )
    parser.add_argument("--scope", default="both", choices=("layer", "global", "both"))
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random policy (default: 0)")
    parser.add_argument(
        "--lfru-half-life",
        type=float,
        default=256.0,
        metavar="ACCESSES",
        help="half-life of lfru's score in layer accesses (default: 256)",
    )
    parser.add_argument(
        "--expert-bytes", type=int, metavar="N", help="bytes of one expert (overrides the traces' own)"
    )
    parser.add_argument(
        "--format",
        choices=tuple(BYTES_PER_WEIGHT),
        default="bf16",
        help="how experts are stored: bytes moved and simulated tokens/s count the expert in this format, "
        "from the trace's 16-bit expert size (default bf16: as recorded)",
    )
    parser.add_argument(
        "--copy-gbps",
        type=float,
        metavar="GB/S",
        help="host-to-device bandwidth: with --layer-compute-ms, adds simulated tokens/s to sweep.csv",
    )
    parser.add_argument(
        "--layer-compute-ms",
        type=float,
        metavar="MS",
        help="compute time of one layer access besides expert copies (timing model, see simulator.py)",
    )
    parser.add_argument(
        "--host-gbps",
        type=float,
        metavar="GB/S",
        help="host expert throughput (GB of expert weights read per second): with the timing model, every "
        "policy also runs with the copy-or-compute rule (a miss computed on the host when that is faster)",
    )
    parser.add_argument(
        "--prefetch",
        default="none",
        metavar="MODES",
        help="comma-separated prefetch modes to compare: none, history (default: none; lookahead needs the "
        "model, not a trace: runtime only)",
    )
    parser.add_argument(
        "--host-fractions",
        default="",
        metavar="F[,F...]",
        help="fractions of the experts in a RAM tier under the device tier (the disk tier): every online "
        "policy also runs over it (default: none)",
    )
    parser.add_argument(
        "--history-window",
        type=int,
        default=8,
        metavar="N",
        help="accesses of a layer the history predictor counts (default: 8)",
    )
    parser.add_argument(
        "--static-profile",
        metavar="FILE",
        help="trace whose expert counts the static policy pins (default: each trace profiles itself)",
    )


def in_format(t: LoadedTrace, fmt: str) -> LoadedTrace:
    """The trace with its expert size in ``fmt`` (unchanged for bf16 or an unknown size)."""
    if fmt == "bf16" or t.trace.expert_bytes is None:
        return t
    trace = replace(t.trace, expert_bytes=expert_bytes_in(fmt, t.trace.expert_bytes))
    return replace(t, label=f"{t.label}-{fmt}", trace=trace)


def main(argv: Sequence[str] | None = None, prog: str = "offload-bench sweep") -> int:
    parser = OneLineParser(prog=prog, description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_arguments(parser)
    return run(parser.parse_args(argv), prog)


def run(args: argparse.Namespace, prog: str = "offload-bench sweep") -> int:
    """Run a parsed sweep command; returns the exit code."""
    try:
        policies = parse_policies(args.policies)
        fractions = parse_fractions(args.cache_fractions)
        host_fractions = (
            parse_fractions(args.host_fractions, "--host-fractions") if args.host_fractions else []
        )
        prefetch = parse_prefetch(args.prefetch)
        if args.history_window < 1:
            raise UsageError(f"--history-window must be at least 1 access, got {args.history_window}")
        scopes: tuple[Scope, ...] = ("layer", "global") if args.scope == "both" else (args.scope,)
        if not args.lfru_half_life > 0 or not math.isfinite(args.lfru_half_life):
            raise UsageError(f"--lfru-half-life must be a positive number, got {args.lfru_half_life}")
        timing = parse_timing(args.copy_gbps, args.layer_compute_ms)
        if args.host_gbps is not None:
            if timing is None:
                raise UsageError("--host-gbps needs the timing model: --copy-gbps and --layer-compute-ms")
            if not (args.host_gbps > 0 and math.isfinite(args.host_gbps)):
                raise UsageError(f"--host-gbps must be a positive number of GB/s, got {args.host_gbps}")
        if args.expert_bytes is not None and args.expert_bytes < 1:
            raise UsageError(f"--expert-bytes must be positive, got {args.expert_bytes}")
        traces = [in_format(t, args.format) for t in load_traces(args.trace, args.expert_bytes)]
        profile = None if args.static_profile is None else load_trace(args.static_profile)
        for t in traces:
            check_capacities(t, [*fractions, *host_fractions])
            if timing is not None and t.trace.expert_bytes is None:
                raise UsageError(f"trace {t.label} does not give the expert size: pass --expert-bytes")
            if profile is not None and (profile.num_layers, profile.num_experts) != (
                t.trace.num_layers,
                t.trace.num_experts,
            ):
                raise UsageError(
                    f"--static-profile has {profile.num_layers} layers x {profile.num_experts} experts, "
                    f"trace {t.label} has {t.trace.num_layers} x {t.trace.num_experts}"
                )
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a directory")
    except (UsageError, CapacityError, TraceError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    profile_seq = None if profile is None else AccessSequence.from_trace(profile)
    rows = sweep(
        traces,
        policies,
        fractions,
        scopes,
        seed=args.seed,
        half_life=args.lfru_half_life,
        static_profile=None if profile_seq is None else expert_counts(profile_seq),
        timing=timing,
        prefetch=prefetch,
        history_window=args.history_window,
        host_gbps=args.host_gbps,
        host_fractions=host_fractions,
    )
    static_note = (
        f"static pins the most used experts of {Path(args.static_profile).name}"
        if args.static_profile
        else "static is profiled on the trace it is evaluated on: an optimistic upper bound for pinning"
    )
    try:
        written = write_outputs(out, rows, traces, static_note)
    except OSError as e:
        print(f"{prog}: error: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {out / written[0]}, {', '.join(written[1:])} ({len(rows)} rows)")
    if "sweep.png" not in written:
        print(f"{prog}: sweep.png not drawn: matplotlib is not installed (pip install 'moe-offload[plot]')")
    return 0


# -- input ------------------------------------------------------------------------------------------------
def parse_policies(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UsageError("--policies is empty")
    unknown = [name for name in names if name not in POLICIES]
    if unknown:
        raise UsageError(f"unknown policy {unknown[0]!r}; choose from: {', '.join(POLICIES)}")
    names = list(dict.fromkeys(names))  # drop repeats, keep order
    return names if "belady" in names else [*names, "belady"]


def parse_prefetch(text: str) -> list[SimPrefetch]:
    modes = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not modes:
        raise UsageError("--prefetch is empty")
    try:
        return [check_prefetch(mode) for mode in modes]
    except ValueError as e:
        raise UsageError(str(e)) from None


def parse_fractions(text: str, flag: str = "--cache-fractions") -> list[float]:
    fractions = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise UsageError(f"{flag}: {item.strip()!r} is not a number") from None
        if not (0 < value <= 1):
            raise UsageError(f"{flag}: {value} must be in (0, 1]")
        fractions.append(value)
    return sorted(set(fractions))


def parse_timing(copy_gbps: float | None, layer_compute_ms: float | None) -> TimingModel | None:
    if copy_gbps is None and layer_compute_ms is None:
        return None
    if copy_gbps is None or layer_compute_ms is None:
        raise UsageError("the timing model needs both --copy-gbps and --layer-compute-ms")
    try:
        return TimingModel(bandwidth_gbps=copy_gbps, compute_s_per_layer=layer_compute_ms / 1e3)
    except ValueError as e:
        raise UsageError(str(e)) from None


if __name__ == "__main__":
    sys.exit(main())
