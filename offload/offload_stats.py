"""Counters are part of the API: what the runtime did, in numbers a user can check."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class OffloadStats:
    expert_hits: int  # expert uses served from a resident slot
    expert_misses: int  # expert uses that had to be copied in first (demand misses, not host-computed)
    bytes_host_to_device: int
    copy_seconds: float  # time spent copying experts (on the copy stream on CUDA)
    slots: int
    total_experts: int
    budget_bytes: int
    planned_bytes: int  # what the budget planner reserved: resident + KV + workspace + slots
    peak_device_bytes: int | None  # torch.cuda.max_memory_allocated since load; None on CPU
    layer_calls: int  # MoE layer forward calls
    waves: int  # slot-pool waves run (more than layer_calls when a layer needs more experts than slots)
    evictions: int
    prefetch: str = "none"  # the predictor in effect (prefetch="auto" resolved for this model and budget)
    prefetch_issued: int = 0  # predicted experts copied in ahead of their layer
    prefetch_used: int = 0  # prefetched experts a layer then used, landed before it was needed
    prefetch_late: int = 0  # prefetched experts a layer needed while their copy was still in flight
    prefetch_wasted: int = 0  # prefetched experts evicted before any layer used them
    prefetch_recall: float | None = None  # of the experts layers used, the share their guess had named
    prefetch_precision: float | None = None  # of the experts guesses named, the share the layer then used
    stall_seconds: float = 0.0  # time compute waited for copies to land
    expert_format: str = ""  # how experts are stored: bf16, fp16, fp32, int8, int4, mxfp4, fp8
    expert_bytes: int = 0  # bytes of one expert, in the host store and in a slot (scales included)
    host_expert_calls: int = 0  # missed experts computed on the host instead of copied (not admitted)
    host_compute_seconds: float = 0.0  # worker time spent on them, summed over the workers
    host_wait_seconds: float = 0.0  # time the layer step waited for them after its own work
    host_compute: str = "off"  # the mode in effect: off, auto, always (auto on CPU without rates: off)
    host_kernel: str = ""  # the host kernels by token count (offload.kernels.kernel_table), "" when off
    prefill_chunk: int = 0  # tokens per prefill forward of generate(), as planned; 0: whole prompts
    kernels: str = ""  # what computes the experts in the slots: triton, torch, or a CPU device's host kernels
    # by token count ("int4pack up to 31 tokens, reference above on int4pack slots")
    host_kernel_copy_bytes: int = 0  # host RAM of the experts' copy for the int4pack kernel, 0: none
    store_source: str = (
        ""  # quantized experts or the disk tier: written while loading, or read from a disk store
    )
    host_tier_slots: int = 0  # the disk tier's host slots; 0: every expert is in host RAM
    host_tier_hits: int = 0  # device copies (and host-computed experts) whose expert was in a host slot
    host_tier_misses: int = 0  # those read from disk first (on demand, or ahead)
    host_tier_read_ahead: int = 0  # experts whose reads started before their copy was issued (a guess, or a
    # wave's misses read while the rest of the wave computed); disk_reads = demand reads + these
    disk_reads: int = 0  # experts read from disk
    disk_bytes: int = 0  # bytes read (whole 4 KiB-aligned rows)
    disk_seconds: float = 0.0  # wall time of the reads (reads in flight together count once)

    @property
    def expert_uses(self) -> int:
        return self.expert_hits + self.expert_misses + self.host_expert_calls

    @property
    def hit_rate(self) -> float:
        return self.expert_hits / self.expert_uses if self.expert_uses else 0.0

    @property
    def copy_gb_per_s(self) -> float:
        return self.bytes_host_to_device / self.copy_seconds / 1e9 if self.copy_seconds > 0 else 0.0

    @property
    def disk_gb_per_s(self) -> float:
        return self.disk_bytes / self.disk_seconds / 1e9 if self.disk_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(expert_uses=self.expert_uses, hit_rate=self.hit_rate, copy_gb_per_s=self.copy_gb_per_s)
        out.update(disk_gb_per_s=self.disk_gb_per_s)
        return out
