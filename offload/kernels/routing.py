"""One MoE layer call's routing, grouped by expert once and shared by every wave and kernel.

The host needs to know which experts the call uses (the cache decides on them) and where each expert's pairs
lie in the expert-sorted order (the kernels launch over them); everything else stays on the device. So
:meth:`RoutedTokens.build` makes exactly one device-to-host read per layer call: the flat expert ids ``[T*k]``,
with the ids a router predictor computed for a coming layer riding along when there is one. From them the
host builds ``spans`` (expert -> its range of pair positions) in O(T*k): never a loop over all experts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

# Up to this many pairs (a decode step, or a few tokens) plain Python over the ids is faster than numpy's calls.
_SMALL = 64
# Where read_tensors_to_host starts each tensor in its buffer: the CPU allocator's alignment, so a host kernel
# reads each one as it would a tensor of its own.
_HOST_ALIGN = 64


def read_to_host(tensor: torch.Tensor) -> np.ndarray:
    """The one way the layer step reads device data on the host: a blocking device-to-host copy (a sync on
    CUDA). Kept in one place so tests can count the reads a code path makes."""
    return tensor.cpu().numpy()


def read_tensors_to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """:func:`read_to_host` for several tensors of any dtypes in one transfer (one sync on CUDA, where a read
    each would wait for the device once per tensor): their bytes packed into one device buffer, copied once,
    and viewed back on the host with their own shapes and dtypes, bitwise. Each starts at a multiple of
    ``_HOST_ALIGN`` bytes, as a tensor of its own would."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    starts, total = [], 0
    for size in sizes:
        starts.append(total)
        total += -(-size // _HOST_ALIGN) * _HOST_ALIGN
    packed = torch.empty(total, dtype=torch.uint8, device=tensors[0].device)
    for tensor, start, size in zip(tensors, starts, sizes, strict=True):
        packed[start : start + size].copy_(tensor.reshape(-1).view(torch.uint8))
    host = packed.cpu()
    return [
        host[start : start + size].view(tensor.dtype).view(tensor.shape)
        for tensor, start, size in zip(tensors, starts, sizes, strict=True)
    ]


def read_list_to_host(tensor: torch.Tensor) -> list[int]:
    """:func:`read_to_host` for a few integers, flattened to a list: ``tolist`` is one read, as ``cpu()`` is,
    and costs a third of ``cpu().numpy().tolist()`` in host time."""
    rows = tensor.tolist()
    if tensor.dim() == 1:
        return rows
    return rows[0] if len(rows) == 1 else [i for row in rows for i in row]


@dataclass(slots=True)  # not frozen: built once per layer call, and a frozen init costs 2 us of host time
class RoutedTokens:
    """Token-expert pairs of one layer call. Pair ``p = t * top_k + j`` is token ``t``'s ``j``-th choice.
    Read-only once built."""

    hidden: torch.Tensor  # [T, H]
    top_k_index: torch.Tensor  # [T, k] int64
    top_k_weights: torch.Tensor  # [T, k]
    pairs_by_expert: torch.Tensor  # [T*k] int64: pair ids sorted by expert, stable (token order inside one)
    spans: dict[int, tuple[int, int]]  # expert -> [start, end) of its pairs in pairs_by_expert
    experts: list[int]  # experts with at least one pair, ascending
    num_experts: int  # E: ids >= E are padding
    ids: np.ndarray | list[int]  # [T*k] host copy of the expert ids (the recorder stores them)
    complete: bool  # every pair has an expert (no padding ids): the kernels write every row of the output
    along: np.ndarray | list[int] | None = None  # host copy of the tensor that rode along with the ids, flat

    @property
    def top_k(self) -> int:
        return self.top_k_index.shape[1]

    @property
    def max_pairs_per_expert(self) -> int:
        return max((end - start for start, end in self.spans.values()), default=0)

    @classmethod
    def build(
        cls,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        num_experts: int,
        along: torch.Tensor | None = None,  # integer tensor on the same device, read to the host too
    ) -> RoutedTokens:
        n = top_k_index.numel()
        source = top_k_index
        if along is not None:
            flat = top_k_index.reshape(-1)
            source = torch.cat((flat, along.reshape(-1).to(flat.dtype)))
        # the layer's one device-to-host read: a decode step's few ids as a list, more as an array
        host = read_list_to_host(source) if n <= _SMALL else read_to_host(source).reshape(-1)
        ids, extra = (host, None) if along is None else (host[:n], host[n:])
        if isinstance(ids, list):
            if n == top_k_index.shape[-1] and len(set(ids)) == n:  # one token, distinct experts
                spans = {expert: (p, p + 1) for p, expert in enumerate(sorted(ids))}
            else:
                spans = _spans(Counter(ids))
            if spans and next(iter(spans)) < 0:
                raise ValueError(f"expert ids must be non-negative, got {next(iter(spans))}")
        else:
            # a negative id raises ValueError, as it should
            counts = np.bincount(ids, minlength=num_experts)
            present = np.flatnonzero(counts)
            ends = np.cumsum(counts[present])
            spans = dict(
                zip(
                    present.tolist(),
                    zip((ends - counts[present]).tolist(), ends.tolist(), strict=True),
                    strict=True,
                )
            )
        if top_k_index.is_cpu:  # sorted on the host, stable: token order inside one expert
            order = (
                np.array(sorted(range(n), key=ids.__getitem__), dtype=np.int64)
                if isinstance(ids, list)
                else np.argsort(ids, kind="stable")
            )
            pairs_by_expert = torch.from_numpy(order)
        else:  # sorted on the device, asynchronously: no host-to-device copy on the compute stream
            pairs_by_expert = torch.argsort(top_k_index.reshape(-1), stable=True)
        # Ids >= E are padding some models route to a non-expert: they have no pairs to compute. They sort last.
        complete = True
        while spans and next(reversed(spans)) >= num_experts:
            spans.popitem()
            complete = False
        return cls(
            hidden,
            top_k_index,
            top_k_weights,
            pairs_by_expert,
            spans,
            list(spans),
            num_experts,
            ids,
            complete,
            extra,
        )


def _spans(counts: Counter[int]) -> dict[int, tuple[int, int]]:
    """``[start, end)`` of each id's pairs in id order, from how many pairs each id has."""
    spans: dict[int, tuple[int, int]] = {}
    start = 0
    for expert in sorted(counts):
        end = start + counts[expert]
        spans[expert] = (start, end)
        start = end
    return spans
