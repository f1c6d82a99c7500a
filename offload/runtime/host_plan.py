"""Host RAM, planned before a byte of a checkpoint is read (invariant *planned-memory*).

A load needs, at its peak::

    host store (every expert, in the store's format)
    + one MoE layer in flight (its experts in full precision as transformers converts them, and the same
      layer packed, before the full-precision copy is freed)
    + on a CPU device, everything the device budget plans (resident weights, KV cache, workspace, slots)
    + where host compute can use it, the int4 or MXFP4 experts' copy for torch's int4pack CPU kernel
      (:mod:`offload.memory.int4pack`)

It is compared with what psutil says is available and with ``host_memory_limit`` when given. The int4pack
copy is a speed-up, not a need: when the plan does not fit with it but fits without, the load goes on without
it, with a warning (host experts then run the dequantizing kernel).

When the store does not fit and ``disk_tier`` is ``auto``, the experts stay on disk and host RAM holds a
fixed pool of host slots instead of the store (:mod:`offload.runtime.host_tier`): as many as the limit leaves
beside one layer in flight and the CPU device's budget (and, when the limit is psutil's, ``TIER_HEADROOM``
for everything else), at least one access's worth (``top_k``, per layer with ``cache_scope="layer"``). Non-expert
weights bound for a GPU pass through host RAM one tensor at a time and are not counted; nor is the Python
process itself (a few hundred MB): keep that much headroom.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import psutil

from offload.config import OffloadConfig
from offload.errors import HostMemoryError
from offload.memory.disk_store import row_stride
from offload.memory.formats import NATIVE_FORMATS
from offload.memory.int4pack import int4pack_expert_bytes, int4pack_unsupported
from offload.memory.layout import ExpertLayout
from offload.runtime.model_survey import ModelSurvey
from offload.units import format_size

log = logging.getLogger(__name__)

TIER_HEADROOM = 1 << 30  # host RAM the disk tier leaves to the process and the OS when no limit is given


@dataclass(frozen=True)
class HostPlan:
    store_bytes: int  # every expert, in the store's format
    loading_bytes: int  # one MoE layer in flight while loading
    device_bytes: int  # what the device budget plans, when the device is the CPU (else 0)
    format_name: str
    int4pack_bytes: int = 0  # the int4/MXFP4 experts' copy for the int4pack host kernel, when made
    host_tier_slots: int | None = None  # the disk tier's host slots (store_bytes is theirs); None: all in RAM
    total_experts: int = 0

    @property
    def total_bytes(self) -> int:
        return self.store_bytes + self.loading_bytes + self.device_bytes + self.int4pack_bytes

    def describe(self) -> str:
        if self.host_tier_slots is None:
            parts = [f"experts {format_size(self.store_bytes)} in {self.format_name}"]
        else:
            parts = [
                f"{self.host_tier_slots} of {self.total_experts} experts in host slots "
                f"({format_size(self.store_bytes)} in {self.format_name}), the rest on disk"
            ]
        parts.append(f"one layer being loaded {format_size(self.loading_bytes)}")
        if self.device_bytes:
            parts.append(f"the CPU device's budget {format_size(self.device_bytes)}")
        if self.int4pack_bytes:
            parts.append(f"their copy for the int4pack host kernel {format_size(self.int4pack_bytes)}")
        return ", ".join(parts)


def int4pack_copy_bytes(model_survey: ModelSurvey, config: OffloadConfig, slots: int | None = None) -> int:
    """Host bytes of the experts' copy for torch's int4pack CPU kernel, or 0 where none would be made: it is
    made on a CUDA device (on a CPU device the host kernel is the device's own) with host compute on, for
    int4 or MXFP4 experts that kernel takes (:func:`offload.memory.int4pack.int4pack_unsupported`), unless ``slots``
    hold every expert (nothing misses)."""
    layout = model_survey.layout
    if config.device.type != "cuda" or config.host_compute == "off" or int4pack_unsupported(layout):
        return 0
    if slots is not None and slots >= model_survey.total_experts:
        return 0
    return model_survey.total_experts * int4pack_expert_bytes(layout)


def int4pack_copy_fits(copy_bytes: int, config: OffloadConfig, available: int | None = None) -> bool:
    """Whether a model already in host RAM (``offload.wrap``) has room for the int4pack copy besides; a
    warning says so when it has not."""
    if not copy_bytes:
        return False
    _, limit = _host_limit(config, available)
    if copy_bytes <= limit:
        return True
    _warn_no_int4pack(copy_bytes, limit)
    return False


def _host_limit(config: OffloadConfig, available: int | None) -> tuple[int, int]:
    """(bytes free, bytes the model may take): psutil's ``available`` unless given, capped by
    ``host_memory_limit``."""
    free = psutil.virtual_memory().available if available is None else available
    return free, free if config.host_memory_limit is None else min(free, config.host_memory_limit)


def _warn_no_int4pack(copy_bytes: int, limit: int) -> None:
    log.warning(
        "host RAM: no room for the experts' copy for the int4pack host kernel (%s, %s allowed); "
        "experts computed on the host use the slower dequantizing kernel",
        format_size(copy_bytes),
        format_size(limit),
    )


def plan_host(model_survey: ModelSurvey, device_bytes: int, int4pack_bytes: int = 0) -> HostPlan:
    """Host RAM of loading ``model_survey`` (its layout in the store's format); ``device_bytes``: the planned
    device memory when that device is the CPU, else 0; ``int4pack_bytes``: the int4pack copy, when made."""
    layout = model_survey.layout
    one_layer = model_survey.num_experts * layout.nbytes
    if layout.format == "float":  # the converted layer, copied into the store and freed
        in_flight = one_layer
    elif layout.format in NATIVE_FORMATS:  # the checkpoint's bytes as read, and the same layer packed
        in_flight = model_survey.num_experts * layout.canonical.nbytes + one_layer
    else:  # quantized while loading: the layer converted to full precision, and packed beside it
        in_flight = model_survey.num_experts * _full_precision(layout).nbytes + one_layer
    return HostPlan(
        store_bytes=model_survey.total_experts * layout.nbytes,
        loading_bytes=in_flight,
        device_bytes=device_bytes,
        format_name=layout.format_name,
        int4pack_bytes=int4pack_bytes,
    )


def check_host_memory(
    model_survey: ModelSurvey,
    config: OffloadConfig,
    device_bytes: int,
    available: int | None = None,
    slots: int | None = None,
) -> HostPlan:
    """The load's host plan, or a :class:`HostMemoryError` in one line: what is needed, what is available, and
    the smallest format that would fit. ``available``: bytes free (default: psutil's ``available``). The plan
    holds the int4pack copy where one would be made (``slots``: the budget's) and it fits."""
    copy_bytes = int4pack_copy_bytes(model_survey, config, slots)
    plan = plan_host(model_survey, device_bytes if config.device.type == "cpu" else 0, copy_bytes)
    free, limit = _host_limit(config, available)
    given = config.host_memory_limit is not None and config.host_memory_limit <= free
    room = limit if given else limit - TIER_HEADROOM  # what the disk tier may take
    if config.disk_tier == "always":  # on disk whatever fits: as many host slots as the limit allows
        tier, fits = plan_disk_tier(model_survey, config, plan, room)
        if fits:
            return tier
    elif plan.total_bytes <= limit:
        return plan
    elif copy_bytes and plan.total_bytes - copy_bytes <= limit:
        _warn_no_int4pack(copy_bytes, limit - (plan.total_bytes - copy_bytes))
        return replace(plan, int4pack_bytes=0)
    plan = replace(plan, int4pack_bytes=0)  # what the model needs; the copy is never why it does not fit
    what = f"host_memory_limit is {format_size(limit)}" if given else f"{format_size(limit)} available"
    message = f"host RAM: the model needs {format_size(plan.total_bytes)} ({plan.describe()}), {what}"
    message += _what_would_fit(model_survey, config, plan, limit)
    if config.disk_tier == "off":
        raise HostMemoryError(message + "; disk_tier='auto' would keep the experts on disk", plan.total_bytes)
    # "always" that did not fit above gets the same minimum here and is refused with it
    tier, fits = plan_disk_tier(model_survey, config, plan, room)
    if not fits:  # tier holds the minimum
        minimum = tier.total_bytes + (0 if given else TIER_HEADROOM)
        raise HostMemoryError(
            f"{message}; keeping the experts on disk needs at least {format_size(minimum)} ({tier.describe()})",
            minimum,
        )
    log.warning(
        "host RAM: the experts take %s, %s: keeping them on disk, %s (disk_tier='off' refuses instead)",
        format_size(plan.store_bytes),
        what,
        tier.describe(),
    )
    return tier


def plan_disk_tier(
    model_survey: ModelSurvey, config: OffloadConfig, plan: HostPlan, room: int
) -> tuple[HostPlan, bool]:
    """The disk tier's plan in ``room`` bytes, and whether it fits: as many host slots as fit beside ``plan``'s
    layer in flight and device bytes, or (not fitting) the minimum, one access's worth of slots."""
    stride = row_stride(model_survey.layout)
    per_layer = config.cache_scope == "layer"
    layers = model_survey.num_layers
    minimum = model_survey.top_k * (layers if per_layer else 1)
    loading = _tier_loading(model_survey, plan)
    slots = min(max(0, room - loading - plan.device_bytes) // stride, model_survey.total_experts)
    if per_layer:
        slots -= slots % layers  # every layer gets the same share
    fits = slots >= minimum
    slots = slots if fits else minimum
    tier = replace(
        plan,
        store_bytes=slots * stride,
        loading_bytes=loading,
        host_tier_slots=slots,
        total_experts=model_survey.total_experts,
        int4pack_bytes=0,
    )
    return tier, fits


def disk_tier_limit(model_survey: ModelSurvey, host_slots: int, device_bytes: int = 0) -> int:
    """The ``host_memory_limit`` that gives the disk tier exactly ``host_slots`` host slots (a multiple of the
    layers with ``cache_scope="layer"``), beside ``device_bytes`` of a CPU device's budget:
    :func:`plan_disk_tier` inverted."""
    plan = plan_host(model_survey, device_bytes)
    return device_bytes + _tier_loading(model_survey, plan) + host_slots * row_stride(model_survey.layout)


def _tier_loading(model_survey: ModelSurvey, plan: HostPlan) -> int:
    """The disk tier's loading bytes: each layer packed into a staging buffer, beside the layer in flight,
    before it is written to disk."""
    return plan.loading_bytes + model_survey.num_experts * model_survey.layout.nbytes


def _what_would_fit(model_survey: ModelSurvey, config: OffloadConfig, plan: HostPlan, limit: int) -> str:
    layout = model_survey.layout
    if layout.format in ("mxfp4", "fp8", "int4"):
        return "; no smaller expert format exists: free RAM or use a machine with more"
    if layout.format == "float" and config.dequantize:
        return "; without dequantize (--dequantize) the checkpoint's own format is smaller"
    options = [("int8", 0), ("int4", config.quantize_group)]
    if layout.format == "int8":
        options = options[1:]
    needs = []
    for name, group in options:
        smaller = replace(model_survey, layout=replace(layout, format=name, group_size=group))
        candidate = plan_host(smaller, plan.device_bytes)
        needs.append((name, candidate.total_bytes))
        if candidate.total_bytes <= limit:
            break
    name, need = needs[-1]
    verdict = "it needs" if need <= limit else "it would still need"
    return f"; with quantize='{name}' (--quantize {name}) {verdict} {format_size(need)}"


def _full_precision(layout: ExpertLayout) -> ExpertLayout:
    """The layout of the same expert in the compute dtype: how transformers hands a layer to the store."""
    return layout if layout.format == "float" else replace(layout, format="float", group_size=0, packing="")
