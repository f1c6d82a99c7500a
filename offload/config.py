"""Runtime options as one frozen, validated dataclass; device and dtype are normalized here and only here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from cache_policies import HOST_MODES, ONLINE_POLICIES, POLICIES, HostRates
from cache_policies.predictors import PREFETCH_CHOICES
from offload.errors import OffloadError
from offload.units import parse_size

PrefetchChoice = Literal["auto", "none", "history", "lookahead", "pre-attention"]

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}

KernelChoice = Literal["auto", "torch", "triton", "dequant", "int8pack", "int4pack"]
CPU_KERNELS = ("dequant", "int8pack", "int4pack")  # host kernels a CPU device may be told to run throughout
KERNEL_CHOICES = ("auto", "torch", "triton", *CPU_KERNELS)


def check_kernel_choice(choice: str, device: torch.device) -> None:
    """A known kernel choice, and no CPU kernel on a CUDA device (offload.kernels.selection says what each is)."""
    if choice not in KERNEL_CHOICES:
        raise OffloadError(f"kernel must be one of {', '.join(KERNEL_CHOICES)}, got {choice!r}")
    if choice in CPU_KERNELS and device.type == "cuda":
        raise OffloadError(
            f"kernel={choice!r} is a CPU kernel: on a CUDA device choose auto, triton or torch"
        )


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CUDA when present, else CPU. A bare ``cuda`` becomes the current CUDA device."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise OffloadError(f"unknown device {device!r}: use cuda, cuda:N or cpu") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OffloadError("device cuda was asked for, but this torch build sees no CUDA device")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise OffloadError(f"device {dev} is not supported: use cuda or cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Accepts ``bf16|fp16|fp32`` (and the torch spellings); ``None`` keeps the checkpoint's dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in _DTYPES.values():
            raise OffloadError(f"dtype {dtype} is not supported: use bf16, fp16 or fp32")
        return dtype
    found = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if found is None:
        raise OffloadError(f"unknown dtype {dtype!r}: use bf16, fp16 or fp32")
    return found


@dataclass(frozen=True)
class OffloadConfig:
    """Everything that shapes an offloaded model besides the checkpoint itself."""

    vram_budget: (
        int  # bytes the runtime may use on the device, all of it: weights, KV cache, workspace, slots
    )
    device: torch.device
    dtype: torch.dtype | None = None
    policy: str = "lru"
    cache_scope: Literal["global", "layer"] = "global"
    max_context: int = 4096  # tokens of KV cache the budget reserves (batch 1)
    # generate() prefills a prompt in chunks of this many tokens and the budget reserves the workspace of one
    # chunk (offload.runtime.budget.prefill_chunk_of); None: one forward over the whole prompt, whose
    # workspace the budget reserves for max_context tokens
    prefill_chunk: int | Literal["auto"] | None = "auto"
    kernel: KernelChoice = "auto"
    pin_memory: bool | None = None  # None: pin host experts when the device is CUDA
    workspace_bytes: int | None = None  # None: estimated from the model's shapes and max_context
    seed: int = 0  # for the random policy
    policy_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"half_life": 128} for lfru
    static_profile: str | None = None  # routing trace whose expert counts the static policy pins
    record_trace: bool = False  # keep the routing of every forward (offload.routing_trace)
    prefetch: PrefetchChoice = "auto"  # auto: pre-attention
    # where the model allows, else lookahead, else none; none when every expert fits (offload.hf.prefetch)
    history_window: int = 8  # layer accesses the history predictor remembers
    copy_engine: Literal["auto", "sync", "threaded"] = "auto"  # auto: the copy stream on CUDA; on CPU,
    # threaded when prefetching (copies overlap compute), else sync
    quantize: Literal["int4", "int8"] | None = None  # quantize full-precision experts while loading
    quantize_group: int = 64  # int4: input columns per scale and zero point
    dequantize: bool = False  # MXFP4/FP8 checkpoints: expand the experts to the compute dtype
    host_memory_limit: int | None = None  # bytes of host RAM the model may take; None: what is available
    host_compute: Literal["auto", "off", "always"] = "auto"  # compute a missed expert on the host instead of
    # copying it: auto (when the measured cost model says it is faster; off on a CPU device unless host_rates
    # are given), always, off
    host_threads: int = 2  # worker threads computing host experts (one expert each at a time)
    host_rates: HostRates | None = None  # the cost model's inputs, given instead of measured
    store_cache: bool = True  # keep a quantized store on disk (offload.user_cache) and read it next time
    disk_tier: Literal["auto", "off", "always"] = "auto"  # auto: experts that do not fit host RAM stay on
    # disk, under a cache of host slots (offload.runtime.host_tier); off: such a model is refused
    # (HostMemoryError); always: on disk under as many host slots as the limit allows, even if all would fit
    disk_read_ahead: bool = False  # the disk tier: a predictor's guesses start disk reads for the experts
    # they name that are not in RAM (off: measured to double the disk reads, docs/architecture.md)
    store_dir: str | None = None  # where disk stores live (the disk tier's, the compressed-store cache);
    # None: the user cache folder's "stores" (offload.user_cache)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policy in POLICIES and self.policy not in ONLINE_POLICIES:
            raise OffloadError(
                f"policy {self.policy!r} needs the future and runs only in the simulator (offload-bench sweep)"
            )
        if self.policy not in ONLINE_POLICIES:
            raise OffloadError(
                f"unknown policy {self.policy!r} for the runtime; choose one of: {', '.join(ONLINE_POLICIES)}"
            )
        if self.cache_scope not in ("global", "layer"):
            raise OffloadError(f"cache_scope must be 'global' or 'layer', got {self.cache_scope!r}")
        if self.max_context < 1:
            raise OffloadError(f"max_context must be at least 1 token, got {self.max_context}")
        chunk = self.prefill_chunk
        if (
            chunk != "auto"
            and chunk is not None
            and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1)
        ):
            raise OffloadError(f"prefill_chunk must be auto, a number of tokens >= 1 or None, got {chunk!r}")
        if self.prefetch not in PREFETCH_CHOICES:
            raise OffloadError(
                f"prefetch must be one of {', '.join(PREFETCH_CHOICES)}, got {self.prefetch!r}"
            )
        if self.history_window < 1:
            raise OffloadError(f"history_window must be at least 1, got {self.history_window}")
        if self.copy_engine not in ("auto", "sync", "threaded"):
            raise OffloadError(f"copy_engine must be auto, sync or threaded, got {self.copy_engine!r}")
        if self.quantize not in (None, "int4", "int8"):
            raise OffloadError(f"quantize must be int4, int8 or none, got {self.quantize!r}")
        if self.quantize_group not in (32, 64, 128, 256):
            raise OffloadError(
                f"quantize_group must be 32, 64, 128 or 256 columns, got {self.quantize_group}"
            )
        if self.host_memory_limit is not None and self.host_memory_limit < 1:
            raise OffloadError(f"host_memory_limit must be positive, got {self.host_memory_limit}")
        if self.host_compute not in HOST_MODES:
            raise OffloadError(
                f"host_compute must be one of {', '.join(HOST_MODES)}, got {self.host_compute!r}"
            )
        if (
            isinstance(self.host_threads, bool)
            or not isinstance(self.host_threads, int)
            or self.host_threads < 1
        ):
            raise OffloadError(
                f"host_threads must be a whole number of threads >= 1, got {self.host_threads!r}"
            )
        if self.host_rates is not None and not isinstance(self.host_rates, HostRates):
            raise OffloadError("host_rates must be a cache_policies.HostRates")
        if self.disk_tier not in ("auto", "off", "always"):
            raise OffloadError(f"disk_tier must be auto, off or always, got {self.disk_tier!r}")
        check_kernel_choice(self.kernel, self.device)
        if self.extra:
            raise OffloadError(f"unknown option(s): {', '.join(sorted(self.extra))}")

    @property
    def pin(self) -> bool:
        return self.device.type == "cuda" if self.pin_memory is None else self.pin_memory

    @classmethod
    def create(
        cls,
        vram_budget: str | int,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        **options: Any,
    ) -> OffloadConfig:
        """Build from user-facing values (size strings, device names), raising OffloadError on bad ones."""
        try:
            budget = parse_size(vram_budget)
        except ValueError as exc:
            raise OffloadError(str(exc)) from None
        known = {name for name in cls.__dataclass_fields__ if name != "extra"}
        extra = {k: v for k, v in options.items() if k not in known}
        kwargs = {k: v for k, v in options.items() if k in known}
        if kwargs.get("quantize") in ("none", "None"):
            kwargs["quantize"] = None
        if kwargs.get("prefill_chunk") in ("off", "none", "None"):
            kwargs["prefill_chunk"] = None
        if kwargs.get("host_memory_limit") is not None:
            try:
                kwargs["host_memory_limit"] = parse_size(kwargs["host_memory_limit"])
            except ValueError as exc:
                raise OffloadError(f"host_memory_limit: {exc}") from None
        return cls(
            vram_budget=budget,
            device=resolve_device(device),
            dtype=resolve_dtype(dtype),
            extra=extra,
            **kwargs,
        )
