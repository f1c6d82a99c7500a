"""The torch reference: one expert at a time, straight out of the slot pool. CPU path and test oracle."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from offload.kernels.activation import ExpertActivation
from offload.kernels.routing import RoutedTokens
from offload.memory.layout import ExpertLayout
from offload.memory.slot_pool import SlotPool


def expert_pairs_torch(
    routed: RoutedTokens,
    experts: Sequence[int],
    slots: Sequence[int],
    pool: SlotPool,
    activation: ExpertActivation,
    out: torch.Tensor,
    slot_row: torch.Tensor | None = None,
) -> None:
    """Write the routing-weighted output of every pair routed to ``experts`` into ``out`` ``[T*k, H]``.

    ``slots[i]`` is the slot of ``experts[i]``. ``slot_row`` (``[E]`` int32 on the device, or None) is the
    layer's row of the pool's slot table, given when ``experts`` are every expert of the call: a kernel may
    read slots there instead of copying ``slots`` to the device; this one uses the lists.

    Each expert sees all of its tokens at once and in token order, whatever wave it runs in, so results do
    not depend on the slot count (bitwise). Compressed experts are read back to the compute dtype one expert
    at a time (:meth:`offload.memory.layout.ExpertLayout.weight`): the dequantize-then-matmul oracle.
    """
    expert_pairs_by(lambda tokens: expert_rows, routed, experts, slots, pool, activation, out)


def expert_pairs_by(
    kernel_for: Callable[[int], Callable[..., torch.Tensor]],
    routed: RoutedTokens,
    experts: Sequence[int],
    slots: Sequence[int],
    pool: SlotPool,
    activation: ExpertActivation,
    out: torch.Tensor,
) -> None:
    """:func:`expert_pairs_torch` with each expert's rows from ``kernel_for(its token count)``, a function
    with the contract of :func:`expert_rows` (:mod:`offload.kernels.kernel_table` picks them)."""
    k = routed.top_k
    weights = routed.top_k_weights.reshape(-1)  # [T*k]
    layout = pool.layout
    for expert, slot in zip(experts, slots, strict=True):
        span = routed.spans.get(expert)
        if span is None:
            continue
        pairs = routed.pairs_by_expert[span[0] : span[1]]
        rows = kernel_for(pairs.numel())
        out[pairs] = rows(
            routed.hidden[pairs // k], weights[pairs], pool.slot_fields(slot), layout, activation, out.dtype
        )


def expert_rows(
    x: torch.Tensor,  # [n, H]: the expert's tokens, in token order
    w: torch.Tensor,  # [n]: their routing weights
    fields: dict[str, torch.Tensor],  # one expert's views (a slot's, or the host store's)
    layout: ExpertLayout,
    activation: ExpertActivation,
    out_dtype: torch.dtype,
) -> torch.Tensor:  # [n, H] in out_dtype
    """One expert's routing-weighted rows: the reference math, shared by the device path above and the host
    path (:mod:`offload.kernels.host_experts`), so both give the same bits on one machine."""
    gate_up, down = layout.weight(fields, "gate_up"), layout.weight(fields, "down")  # [G*I, H], [H, I]
    h = F.linear(x, gate_up, fields.get("gate_up_bias"))  # [n, G*I]
    h = activation.fn(h)  # [n, I]
    y = F.linear(h, down, fields.get("down_bias"))  # [n, H]
    return (y * w[:, None]).to(out_dtype)
