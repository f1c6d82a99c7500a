"""The experts as two ``torch.nn.functional.grouped_mm`` calls over the whole slot pool.

The pool's ``gate_up`` field ``[S, G*I, H]`` transposed is exactly the ``(num_groups, K, N)`` column-major
operand grouped_mm wants, so no weight is copied: the groups are *all* slots, in slot order, and a slot
with no pairs in this wave is an empty group. Only the pair rows are gathered (sorted by slot).

Used as the speed baseline in ``bench/kernels.py`` and selectable with :func:`offload.kernels.selection
.select_kernel`. Each pair's row depends only on its expert's group, whose rows (that expert's pairs in
token order) are the same in every wave.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from offload.kernels.activation import ExpertActivation
from offload.kernels.routing import RoutedTokens
from offload.memory.slot_pool import SlotPool


def expert_pairs_grouped_mm(
    routed: RoutedTokens,
    experts: Sequence[int],
    slots: Sequence[int],
    pool: SlotPool,
    activation: ExpertActivation,
    out: torch.Tensor,
    slot_row: torch.Tensor | None = None,
) -> None:
    """Same contract as :func:`offload.kernels.expert_pairs_torch` (``slot_row`` unused)."""
    prepare_grouped_mm(routed, experts, slots, pool, activation, out)()


def prepare_grouped_mm(
    routed: RoutedTokens,
    experts: Sequence[int],
    slots: Sequence[int],
    pool: SlotPool,
    activation: ExpertActivation,
    out: torch.Tensor,
) -> Callable[[], None]:
    """Do the host work and the table copy now; return the device work alone (what a CUDA graph captures:
    a host-to-device copy cannot be captured)."""
    if pool.layout.format != "float":
        raise ValueError(f"grouped_mm reads float experts only, not {pool.layout.format}")
    spans = routed.spans
    live = sorted((s, e) for e, s in zip(experts, slots, strict=True) if e in spans)
    if not live:
        return lambda: None
    k = routed.top_k
    counts = [0] * pool.num_slots
    for s, e in live:
        counts[s] = spans[e][1] - spans[e][0]
    ends, total = [], 0
    for c in counts:
        total += c
        ends.append(total)
    live_slots = [s for s, _ in live]
    table = _to_device(ends + live_slots + [counts[s] for s in live_slots], out.device)
    offs = table[: pool.num_slots]
    order = [(spans[e][0], spans[e][1]) for _, e in live]
    n_live = len(live)

    def run() -> None:
        pairs = torch.cat([routed.pairs_by_expert[start:end] for start, end in order])  # [n]
        x = routed.hidden[pairs // k]  # [n, H]
        h = F.grouped_mm(x, pool.field("gate_up").transpose(1, 2), offs=offs)  # [n, G*I]
        if pool.layout.has_bias:
            row_slot = torch.repeat_interleave(
                table[pool.num_slots : pool.num_slots + n_live].long(),
                table[pool.num_slots + n_live :],
                output_size=total,
            )
            h = h + pool.field("gate_up_bias")[row_slot]
        h = activation.fn(h)  # [n, I]
        y = F.grouped_mm(h, pool.field("down").transpose(1, 2), offs=offs)  # [n, H]
        if pool.layout.has_bias:
            y = y + pool.field("down_bias")[row_slot]
        weights = routed.top_k_weights.reshape(-1)[pairs]
        out[pairs] = (y * weights[:, None]).to(out.dtype)

    return run


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=torch.int32)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)  # queued on the stream; the host does not wait
