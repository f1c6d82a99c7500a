"""Which host kernel computes an expert's rows, by how many tokens the expert has in the call.

At decode an expert sees one token and the kernels that read compressed codes as they are (``int4pack``,
``int8pack``) are fastest; in a prefill chunk it sees tens or hundreds, and reading the matrix back to the
compute dtype once and running one GEMM wins (measured in ``docs/host-compute.md``). A :class:`KernelTable`
holds the fastest kernel at a few token counts, measured on the machine (:mod:`offload.runtime.host_rates`),
and answers for any count with the kernel of the nearest measured count on a log scale.

One table serves both places a host kernel runs: the experts computed on the host beside a CUDA device
(:mod:`offload.runtime.host_compute`), and every expert of a CPU device, whose slots the kernel reads
(:class:`HostKernelPairs`). A pair's kernel depends only on its expert's token count in the call, which no
budget changes, so results stay bitwise equal across budgets (invariant *wave-independence*).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from offload.kernels.activation import ExpertActivation
from offload.kernels.host_experts import HostKernel, host_kernel
from offload.kernels.routing import RoutedTokens
from offload.kernels.torch_reference import expert_pairs_by
from offload.memory.slot_pool import SlotPool


@dataclass(frozen=True)
class KernelTable:
    """``points``: ``(tokens, kernel name)``, ascending in tokens: the fastest kernel measured there."""

    points: tuple[tuple[int, str], ...]
    _bounds: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a kernel table needs at least one point")
        counts = [n for n, _ in self.points]
        if counts != sorted(set(counts)) or counts[0] < 1:
            raise ValueError(
                f"kernel table points must be distinct positive token counts, ascending: {counts}"
            )
        for _, name in self.points:
            host_kernel(name)  # an unknown name fails here, not in a forward
        # between two measured counts, the geometric mean splits them: nearest on a log scale
        bounds = tuple(math.sqrt(a * b) for a, b in itertools.pairwise(counts))
        object.__setattr__(self, "_bounds", bounds)

    @classmethod
    def single(cls, name: str) -> KernelTable:
        """One kernel at every token count."""
        return cls(((1, name),))

    def name_for(self, tokens: int) -> str:
        for (_, name), bound in zip(self.points, self._bounds, strict=False):
            if tokens < bound:
                return name
        return self.points[-1][1]

    def kernel_for(self, tokens: int) -> HostKernel:
        return host_kernel(self.name_for(tokens))

    @property
    def names(self) -> tuple[str, ...]:
        """The kernels the table uses, in order of first use."""
        return tuple(dict.fromkeys(name for _, name in self.points))

    def describe(self) -> str:
        """``int4pack`` for one kernel; ``int4pack up to 32 tokens, reference above`` for two or more."""
        runs: list[tuple[str, int]] = []  # (kernel, the last token count it serves, 0: no end)
        for i, (_, name) in enumerate(self.points):
            end = math.ceil(self._bounds[i]) - 1 if i < len(self._bounds) else 0
            if runs and runs[-1][0] == name:
                runs[-1] = (name, end)
            else:
                runs.append((name, end))
        if len(runs) == 1:
            return runs[0][0]
        parts = [f"{name} up to {end} tokens" for name, end in runs[:-1]]
        return ", ".join(parts) + f", {runs[-1][0]} above"

    def to_json(self) -> list[list[int | str]]:
        return [[n, name] for n, name in self.points]

    @classmethod
    def from_json(cls, data: object) -> KernelTable:
        if not isinstance(data, list):
            raise ValueError(f"a kernel table is a list of [tokens, kernel], got {data!r}")
        return cls(tuple((int(n), str(name)) for n, name in data))


class HostKernelPairs:
    """The expert kernel of a CPU device: each expert's pairs through the table's kernel for their count,
    straight out of the slots (an :data:`offload.kernels.selection.ExpertKernel`, the signature of
    :func:`offload.kernels.expert_pairs_torch`)."""

    def __init__(self, table: KernelTable) -> None:
        self.table = table

    def __call__(
        self,
        routed: RoutedTokens,
        experts: Sequence[int],
        slots: Sequence[int],
        pool: SlotPool,
        activation: ExpertActivation,
        out: torch.Tensor,
        slot_row: torch.Tensor | None = None,
    ) -> None:
        expert_pairs_by(self.table.kernel_for, routed, experts, slots, pool, activation, out)
