"""What ``offload-run`` and ``offload-serve`` share, written once so the two commands cannot drift: the
model, budget, runtime and sampling options, ``--config`` presets, their checks, and choosing the checkpoint
and its budget before any weight is read."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from cache_policies.predictors import PREFETCH_CHOICES
from cache_policies.study.presets import PresetParser, add_config_option
from offload.errors import OffloadError
from offload.units import parse_size

if TYPE_CHECKING:
    from offload.config import OffloadConfig


class UsageError(Exception):
    """Bad command-line input: reported in one line with exit code 2."""


class OneLineParser(PresetParser):
    """Usage errors raise :class:`UsageError`, which the command prints as one line (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def command_main(
    prog: str,
    parser: argparse.ArgumentParser,
    command: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None,
) -> int:
    """Parse, answer ``--list-architectures``, run ``command``: bad input is one line on stderr and exit
    code 2, an interrupt exit code 130."""
    try:
        args = parser.parse_args(argv)
        if args.list_architectures:
            from offload.hf.architectures import describe

            print(describe())
            return 0
        return command(args)
    except (UsageError, OffloadError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The model, its budget and runtime, and the sampling defaults (and ``--config``)."""
    add_config_option(parser)
    p = parser
    p.add_argument(
        "--model", help="checkpoint directory, or a hub id already in the local Hugging Face cache"
    )
    p.add_argument("--vram-budget", help="device memory the runtime may use, e.g. 12GB, 12GiB, 800MB, 1.5G")
    p.add_argument("--max-new-tokens", type=int, help="tokens to generate (default 48; the demo, 96)")
    p.add_argument("--policy", default="lru", help="expert cache policy (default lru)")
    p.add_argument(
        "--prefetch",
        choices=PREFETCH_CHOICES,
        default="auto",
        help="fetch a layer's experts before it needs them: pre-attention (its own router on its input, "
        "copied while its attention runs), lookahead (the next layer's router on this layer's MoE input), "
        "history (the next layer's recently used experts), none, or auto (default: pre-attention where the "
        "model allows, else lookahead, else none; none when every expert fits; docs/prediction.md)",
    )
    p.add_argument(
        "--cache-scope", choices=("global", "layer"), default="global", help="one cache or one per layer"
    )
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when present, else cpu")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: the checkpoint's dtype")
    p.add_argument(
        "--kernel",
        choices=("auto", "triton", "torch", "dequant", "int8pack", "int4pack"),
        default="auto",
        help="expert compute: auto (Triton on CUDA; on CPU the fastest host kernel per format and token "
        "count, measured), triton, the torch reference (dequantize then compute), or one CPU kernel",
    )
    p.add_argument(
        "--max-context",
        type=int,
        help="KV-cache tokens the budget reserves (default 4096; the demo, its model's 256 positions)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=prefill_chunk_arg,
        default="auto",
        help="prefill a prompt in chunks of N tokens, the budget reserving one chunk's workspace: auto "
        "(default: the smallest chunk that fills the kernels' tiles, 256 tokens or more), N, or off "
        "(one forward over the whole prompt)",
    )
    p.add_argument(
        "--quantize",
        choices=("int4", "int8", "none"),
        default="none",
        help="store full-precision experts compressed (in RAM, over PCIe and in VRAM): int4 (groups of "
        "--quantize-group with a scale and zero each) or int8 (a scale per output channel); default none",
    )
    p.add_argument(
        "--quantize-group", type=int, default=64, help="int4: input columns per scale and zero (default 64)"
    )
    p.add_argument(
        "--dequantize",
        action="store_true",
        help="MXFP4/FP8 checkpoints: expand the experts to the compute dtype instead of keeping their format",
    )
    p.add_argument(
        "--no-store-cache",
        action="store_true",
        help="with --quantize: quantize while loading every time, neither reading nor writing the compressed "
        "store kept in the user cache folder",
    )
    p.add_argument(
        "--host-memory-limit", help="host RAM the model may take, e.g. 48GB (default: what is available)"
    )
    p.add_argument(
        "--disk-tier",
        choices=("auto", "off", "always"),
        default="auto",
        help="auto (default): experts that do not fit host RAM stay on disk, read into a cache of host slots "
        "as the model runs; off: refuse such a model; always: on disk even when they would fit",
    )
    p.add_argument(
        "--disk-read-ahead",
        action="store_true",
        help="with the disk tier: a predictor's guesses also start disk reads for experts not in RAM "
        "(off by default: it measured more reads than it saved)",
    )
    p.add_argument(
        "--store-dir",
        help="folder for disk stores (the disk tier's, the compressed-store cache); default: the user cache "
        "folder's stores/ (put it on your fastest drive)",
    )
    p.add_argument(
        "--host-compute",
        choices=("auto", "off", "always"),
        default="auto",
        help="compute a missed expert on the CPU instead of copying it: auto (when the measured cost model "
        "says it is faster; off on --device cpu), always, or off (default auto)",
    )
    p.add_argument(
        "--host-threads", type=int, default=2, help="worker threads computing experts on the host (default 2)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        help="divide the logits of tokens already in the text by this (default 1, none; the demo, 1.3)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for sampling (default 0)")
    p.add_argument(
        "--list-architectures",
        action="store_true",
        help="print the model types this install supports, and exit",
    )
    p.add_argument("--stats-json", type=Path, help="write the run's counters and timings to this JSON file")
    p.add_argument(
        "--record-trace", type=Path, help="write this run's routing as a trace (native .npz format)"
    )
    p.add_argument(
        "--static-profile", type=Path, help="routing trace whose most used experts --policy static pins"
    )


def validate_model_options(args: argparse.Namespace) -> None:
    """Everything checkable before loading, so bad input fails in a second, not after minutes of loading.
    Then fills the options whose default depends on whether this is the demo."""
    if args.model is not None and args.vram_budget is None:
        raise UsageError("--vram-budget is required with --model (e.g. --vram-budget 12GB)")
    for flag, size in (("--vram-budget", args.vram_budget), ("--host-memory-limit", args.host_memory_limit)):
        if size is not None:
            try:
                parse_size(size)
            except ValueError as exc:
                raise UsageError(f"{flag}: {exc}") from None
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.max_context is not None and args.max_context < 1:
        raise UsageError(f"--max-context must be at least 1, got {args.max_context}")
    if args.host_threads < 1:
        raise UsageError(f"--host-threads must be at least 1, got {args.host_threads}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be 0 or more, got {args.temperature}")
    if args.repetition_penalty is not None and args.repetition_penalty <= 0:
        raise UsageError(f"--repetition-penalty must be positive, got {args.repetition_penalty}")
    for flag, path in (("--stats-json", args.stats_json), ("--record-trace", args.record_trace)):
        if path is not None:
            parent = path.expanduser().resolve().parent
            if not parent.is_dir():
                raise UsageError(f"{flag}: folder {parent} does not exist")
            if not os.access(parent, os.W_OK):
                raise UsageError(f"{flag}: folder {parent} is not writable")
    if args.static_profile is not None and not args.static_profile.expanduser().is_file():
        raise UsageError(f"--static-profile: {args.static_profile} does not exist")
    _fill_defaults(args)


def _fill_defaults(args: argparse.Namespace) -> None:
    from offload.hf import demo as demo_model

    demo = args.model is None
    if args.max_new_tokens is None:
        args.max_new_tokens = demo_model.DEMO_NEW_TOKENS if demo else 48
    if args.repetition_penalty is None:
        args.repetition_penalty = demo_model.DEMO_REPETITION_PENALTY if demo else 1.0
    if args.max_context is None:  # the demo model has 256 positions: reserving more KV cache would be waste
        args.max_context = demo_model.demo_max_context(demo_model.demo_checkpoint()) if demo else 4096


@dataclass(frozen=True)
class ModelChoice:
    path: str  # the checkpoint directory or hub id to load
    demo: bool  # no --model: the reference model in data/models/reference-moe
    config: OffloadConfig  # every option, the budget included, checked against the checkpoint


def choose_model(args: argparse.Namespace) -> ModelChoice:
    """The checkpoint (the demo's reference model when there is no ``--model``) and its config, with the
    budget checked against the checkpoint's survey: a dense model or too small a budget fails here, before the
    tokenizer or any weight is read. Sets ``args.vram_budget`` for the demo; call
    :func:`validate_model_options` first."""
    from offload.config import OffloadConfig
    from offload.hf.demo import DEMO_CACHE_FRACTION, demo_checkpoint
    from offload.hf.skeleton import survey_checkpoint
    from offload.runtime.budget import budget_for_slots, plan_budget

    options: dict[str, Any] = dict(
        device=args.device,
        dtype=args.dtype,
        policy=args.policy,
        max_context=args.max_context,
        prefill_chunk=args.prefill_chunk,
        cache_scope=args.cache_scope,
        kernel=args.kernel,
        prefetch=args.prefetch,
        seed=args.seed,
        static_profile=None if args.static_profile is None else str(args.static_profile),
        record_trace=args.record_trace is not None,
        quantize=None if args.quantize == "none" else args.quantize,
        quantize_group=args.quantize_group,
        dequantize=args.dequantize,
        store_cache=not args.no_store_cache,
        host_memory_limit=args.host_memory_limit,
        disk_tier=args.disk_tier,
        disk_read_ahead=args.disk_read_ahead,
        store_dir=args.store_dir,
        host_compute=args.host_compute,
        host_threads=args.host_threads,
    )
    demo = args.model is None
    path = str(demo_checkpoint()) if demo else args.model
    settings = OffloadConfig.create(1, **options)  # every option but the budget, validated
    model_survey = survey_checkpoint(path, settings.dtype, settings)
    if args.vram_budget is None:  # the demo: a budget for about a quarter of its experts
        slots = max(model_survey.top_k, round(DEMO_CACHE_FRACTION * model_survey.total_experts))
        args.vram_budget = str(budget_for_slots(model_survey, settings, slots))
    config = OffloadConfig.create(args.vram_budget, **options)
    plan_budget(model_survey, config)
    return ModelChoice(path, demo, config)


def demo_banner(choice: ModelChoice, args: argparse.Namespace) -> str:
    """What the demo says about itself, printed once the input is known to be good (an error stays one
    line)."""
    return (
        f"Demo: {choice.path}, a small Qwen3-MoE (6 MoE layers x 16 experts, top-4) trained on the Python "
        "standard library; it writes Python-like text, "
        f"{'greedily' if args.temperature == 0 else f'at temperature {args.temperature:g}'} with a "
        f"repetition penalty of {args.repetition_penalty:g}."
    )


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write next to the target and rename, so a failure never leaves half a file."""
    path = path.expanduser()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prefill_chunk_arg(value: str) -> int | str | None:
    """``--prefill-chunk``: ``auto``, ``off`` or a number of tokens >= 1."""
    if value in ("auto", "off"):
        return None if value == "off" else value
    try:
        tokens = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, off or a number of tokens, got {value!r}") from None
    if tokens < 1:
        raise argparse.ArgumentTypeError(f"a prefill chunk must be at least 1 token, got {tokens}")
    return tokens
