"""Copy a missed expert into a slot, or compute it on the host: the rule, given rates.

At decode a missed expert serves one token or a few. Copying it moves all its bytes over the link and then the
device computes it; computing it on the host reads the same bytes from RAM, runs beside the device, and evicts
nothing. One layer access, with ``h`` hits and the misses ``m_i`` (each with ``n_i`` tokens), costs

    device path   copies x copy_s + (h + copies) x device_s         the link and the device, in sequence
    host path     sum of host_s(n_i) over the misses on the host     worker threads, beside the device
    layer         max(device path, host path)

``auto`` starts with every miss copied and moves misses to the host, cheapest host time first (ties: lower
expert id), while that lowers the layer's time; ``always`` computes every miss on the host; ``off`` copies every
miss. The rule looks at one access only: an expert computed on the host is not admitted, so it will miss again
next time, which the rule does not weigh (llama.cpp and Fiddler decide per access the same way).

The runtime (measured rates, :mod:`offload.runtime.host_rates`) and the simulator (given rates) run this one
rule, so a recorded run replays with the same split (invariant *same-decisions*). Pure Python: no torch.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

HostMode = Literal["auto", "off", "always"]
HOST_MODES: tuple[HostMode, ...] = ("auto", "off", "always")


@dataclass(frozen=True)
class HostRates:
    """What the rule weighs, for one expert format and shape. 1 GB = 1e9 bytes.

    ``host_gbps`` gives the host's expert throughput (GB of expert bytes read per second) at some token counts,
    as ``((tokens, GB/s), ...)`` ascending: between two points the time is interpolated linearly in tokens,
    below the first the first rate holds, past the last the time grows in proportion to the tokens.
    """

    link_gbps: float  # host -> device copy rate of one expert
    host_gbps: tuple[tuple[int, float], ...]  # host expert throughput by tokens per expert
    device_s: float = 0.0  # device compute seconds of one expert call (hit or copied)
    source: str = "given"  # where the numbers came from: "given", "measured", "cached"

    def __post_init__(self) -> None:
        if not (self.link_gbps > 0 and math.isfinite(self.link_gbps)):
            raise ValueError(f"link rate must be a positive number of GB/s, got {self.link_gbps}")
        if not self.host_gbps:
            raise ValueError("host rates need at least one (tokens, GB/s) point")
        tokens = [t for t, _ in self.host_gbps]
        if tokens != sorted(set(tokens)) or tokens[0] < 1:
            raise ValueError(f"host rate points need ascending, distinct token counts >= 1, got {tokens}")
        for _, rate in self.host_gbps:
            if not (rate > 0 and math.isfinite(rate)):
                raise ValueError(f"host rate must be a positive number of GB/s, got {rate}")
        if not (self.device_s >= 0 and math.isfinite(self.device_s)):
            raise ValueError(f"device compute time must be >= 0 seconds, got {self.device_s}")

    @classmethod
    def flat(cls, link_gbps: float, host_gbps: float, device_s: float = 0.0) -> HostRates:
        """One host rate at every token count (what a decode sweep with ``--host-gbps`` gives)."""
        return cls(link_gbps, ((1, host_gbps),), device_s)


@dataclass
class CopyOrCompute:
    """The rule for one expert size; :meth:`choose` is what the cache asks for each access with misses."""

    mode: HostMode
    expert_bytes: int
    rates: HostRates | None = None  # needed by auto
    _host_cache: dict[int, float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in HOST_MODES:
            raise ValueError(f"host compute must be one of {', '.join(HOST_MODES)}, got {self.mode!r}")
        if self.mode == "auto" and self.rates is None:
            raise ValueError("host compute 'auto' needs rates (link, host, device)")
        if self.expert_bytes < 1:
            raise ValueError(f"expert size must be positive, got {self.expert_bytes}")

    @property
    def copy_s(self) -> float:
        assert self.rates is not None
        return self.expert_bytes / (self.rates.link_gbps * 1e9)

    def host_s(self, tokens: int) -> float:
        """Seconds the host takes to compute one expert for ``tokens`` tokens."""
        cached = self._host_cache.get(tokens)
        if cached is not None:
            return cached
        assert self.rates is not None
        points = self.rates.host_gbps
        times = [self.expert_bytes / (rate * 1e9) for _, rate in points]
        counts = [t for t, _ in points]
        if tokens <= counts[0]:
            seconds = times[0]
        elif tokens >= counts[-1]:
            seconds = times[-1] * tokens / counts[-1]
        else:
            i = bisect.bisect_right(counts, tokens)
            t0, t1 = counts[i - 1], counts[i]
            seconds = times[i - 1] + (times[i] - times[i - 1]) * (tokens - t0) / (t1 - t0)
        self._host_cache[tokens] = seconds
        return seconds

    def choose(
        self, missing: Sequence[int], tokens: Sequence[int], hits: int, busy_s: float = 0.0
    ) -> list[int]:
        """Which of ``missing`` (ascending experts, ``tokens[i]`` tokens each) to compute on the host.
        ``busy_s``: device-path time besides these experts and the hits (the disk tier: experts that are
        not candidates, being on disk, read and copied meanwhile)."""
        if self.mode == "off" or not missing:
            return []
        if self.mode == "always":
            return list(missing)
        assert self.rates is not None
        copy_s, device_s = self.copy_s, self.rates.device_s
        copies = len(missing)
        device = busy_s + copies * copy_s + (hits + copies) * device_s
        host = 0.0
        chosen: list[int] = []
        for seconds, expert in sorted((self.host_s(n), e) for e, n in zip(missing, tokens, strict=True)):
            moved_device = device - copy_s - device_s
            moved_host = host + seconds
            if max(moved_device, moved_host) >= max(device, host):
                break
            device, host = moved_device, moved_host
            chosen.append(expert)
        chosen.sort()
        return chosen

    def layer_seconds(self, copies: int, host_tokens: Sequence[int], hits: int) -> tuple[float, float]:
        """(device path, host path) of one access split this way: what the simulator's timing charges."""
        assert self.rates is not None
        device = copies * self.copy_s + (hits + copies) * self.rates.device_s
        return device, sum(self.host_s(n) for n in host_tokens)
