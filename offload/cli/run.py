"""``offload-run``: generate text with an offloaded MoE model and print what the offloading cost.

Bad input gets one line on stderr and exit code 2; nothing is written unless the run succeeds.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from offload.cli.options import (
    OneLineParser,
    UsageError,
    add_model_options,
    choose_model,
    command_main,
    demo_banner,
    validate_model_options,
    write_json,
)
from offload.units import format_size

PROG = "offload-run"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Run a Hugging Face MoE checkpoint whose experts do not fit in the VRAM budget. "
        "With no --model, runs the demo: the reference MoE trained on Python source (data/models/reference-moe).",
    )
    add_model_options(p)
    p.add_argument(
        "--prompt", help="text to continue (default: the demo's prompt, 'import os' and a newline)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    return command_main(PROG, build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    validate_model_options(args)
    import torch

    import offload
    from offload.hf.demo import DEMO_PROMPT
    from offload.hf.generation import encode_prompt, generate_timed, load_tokenizer
    from offload.hf.load import load_offloaded

    choice = choose_model(args)
    tokenizer = load_tokenizer(choice.path)
    prompt = args.prompt if args.prompt is not None else DEMO_PROMPT
    inputs = encode_prompt(tokenizer, prompt)
    prompt_tokens = int(inputs["input_ids"].shape[1])
    if prompt_tokens + args.max_new_tokens > args.max_context:
        raise UsageError(
            f"prompt ({prompt_tokens} tokens) plus --max-new-tokens ({args.max_new_tokens}) exceeds "
            f"--max-context ({args.max_context})"
        )
    if choice.demo:
        print(demo_banner(choice, args), file=sys.stderr)
    torch.manual_seed(args.seed)
    model = load_offloaded(choice.path, choice.config)
    if choice.demo:  # the continuation reads as one piece of code with its prompt in front
        print(prompt, end="", flush=True)
    result = generate_timed(
        model,
        tokenizer,
        inputs.to(model.device),
        args.max_new_tokens,
        args.temperature,
        args.repetition_penalty,
    )
    stats = offload.stats(model)
    print(_summary(result, stats), file=sys.stderr)
    if args.record_trace is not None:
        offload.routing_trace(model).save(args.record_trace.expanduser())
    if args.stats_json is not None:
        write_json(args.stats_json, {"model": choice.path, "demo": choice.demo, **result, **stats.as_dict()})
    return 0


def _summary(result: dict[str, Any], stats: Any) -> str:
    peak = (
        f"peak {format_size(stats.peak_device_bytes)} of {format_size(stats.budget_bytes)} budget"
        if stats.peak_device_bytes is not None
        else f"peak n/a on CPU, budget {format_size(stats.budget_bytes)}"
    )
    return "\n".join(
        [
            "",
            "--- offload-run summary ---",
            f"prefill : {result['prompt_tokens']} tokens in {result['prefill_seconds']:.3f} s "
            f"({result['prefill_tokens_per_s']:.1f} tok/s)"
            + (f", in chunks of {stats.prefill_chunk}" if stats.prefill_chunk else ""),
            f"decode  : {result['new_tokens']} tokens, {result['decode_tokens_per_s']:.2f} tok/s after the first",
            f"experts : hit rate {stats.hit_rate:.1%} ({stats.expert_hits} hits, {stats.expert_misses} copied, "
            f"{stats.host_expert_calls} computed on host)",
            f"kernels : {stats.kernels}",
            *(
                [
                    f"host    : {stats.host_compute}, kernels {stats.host_kernel}"
                    + (
                        f" (on a {format_size(stats.host_kernel_copy_bytes)} copy of the experts)"
                        if stats.host_kernel_copy_bytes
                        else ""
                    )
                    + f", {stats.host_compute_seconds:.3f} s computing, {stats.host_wait_seconds:.3f} s waited for",
                ]
                if stats.host_compute != "off"
                else []
            ),
            f"copied  : {stats.bytes_host_to_device / 1e9:.3f} GB at {stats.copy_gb_per_s:.2f} GB/s achieved",
            f"slots   : {stats.slots} / {stats.total_experts} experts, {stats.expert_format}, "
            f"{format_size(stats.expert_bytes)} each "
            + (
                "(on disk, in a host slot, in a slot)"
                if stats.host_tier_slots
                else "(in host RAM and in a slot)"
            ),
            *(
                [
                    f"disk    : {stats.disk_bytes / 1e9:.3f} GB read at {stats.disk_gb_per_s:.2f} GB/s achieved "
                    f"({stats.disk_reads} reads); {stats.host_tier_slots} / {stats.total_experts} experts in "
                    f"host RAM, hit rate {stats.host_tier_hits / max(1, stats.host_tier_hits + stats.host_tier_misses):.1%}"
                ]
                if stats.host_tier_slots
                else []
            ),
            *([f"store   : {stats.store_source}"] if stats.store_source else []),
            f"prefetch: {stats.prefetch}"
            + (
                f", {stats.prefetch_issued} issued, {stats.prefetch_used} used in time, "
                f"{stats.prefetch_late} late, {stats.prefetch_wasted} wasted; guesses named "
                f"{stats.prefetch_recall or 0:.1%} of the experts used"
                if stats.prefetch != "none"
                else ""
            ),
            f"stalled : {stats.stall_seconds:.3f} s waiting for copies",
            f"memory  : {peak} (planned {format_size(stats.planned_bytes)})",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
