"""One MoE layer call, start to end: route -> plan -> serve -> compute -> combine.

::

    before   (pre-attention prefetch only, when the decoder layer starts, before its attention) the layer's
             own router on the layer's input guesses its experts; their copies run while attention computes

    route    the router's choices (transformers' code, before this step), then the routing override if one
             is set; a router predictor's ids for a coming layer (on the device); pairs grouped by expert, with
             the layer's one device-to-host read (RoutedTokens); the recorder
    plan     ExpertCache.access: hits, misses, victims, slots and waves (pure Python), and with the
             copy-or-compute rule (cache_policies.copy_or_compute) the misses to compute on the host, which
             are not admitted; the prefetcher settles the experts it prefetched for this layer
    serve    the host experts go to the host workers first (offload.runtime.host_compute); per wave: every
             miss is copied into its slot (the copy engine). After the first wave's demand copies are
             issued, the prefetcher guesses a coming layer's experts and their copies queue behind
    compute  per wave: wait for exactly the wave's slots, run the kernel over the slot pool, release the slots
    join     the host experts' rows are written into the same per-pair buffer, each pair's row by one party
    combine  per-(token, k) rows summed over k in the promoted dtype, cast back, as transformers does

The step owns the order of these stages and the per-call bookkeeping; it decides nothing itself (the cache
and the prefetcher do) and computes nothing itself (the kernel does). A new way of serving a missed expert
belongs in ``serve``. The runtime (:mod:`offload.runtime.runtime`) builds the parts and hands them over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from cache_policies import AccessPlan, CopyOrCompute, ExpertCache, HostChoice, Prefetch, Prefetcher, Wave
from offload.kernels import ExpertActivation, RoutedTokens
from offload.kernels.routing import read_to_host
from offload.kernels.selection import ExpertKernel
from offload.memory.copy_engines import CopyEngine
from offload.memory.slot_pool import SlotPool
from offload.runtime.expert_source import ExpertSource
from offload.runtime.host_compute import HostCompute
from offload.runtime.recorder import RoutingRecorder
from offload.runtime.router_predictors import PreAttentionPredictor, RouterPredictor

# Per-pair output buffers up to this many rows (a decode step's top-k, or a few tokens') are reused by the next
# call of the same shape instead of allocated (LayerStep._pairs_buffer).
_REUSED_ROWS = 64
# A call with more experts than slots (a prefill chunk) computes each wave in up to this many groups of its
# copied experts, each as soon as its own copies land (LayerStep._stream_waves); 1: a wave at a time.
STREAM_GROUPS = 4
# (layer, top_k_index [T, k], top_k_weights [T, k]) -> the routing to use instead
RoutingOverride = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class LayerStep:
    def __init__(
        self,
        cache: ExpertCache,
        source: ExpertSource,
        pool: SlotPool,
        engine: CopyEngine,
        kernel: ExpertKernel,
        num_experts: int,
        recorder: RoutingRecorder | None = None,
    ) -> None:
        self.cache = cache
        self.source = source
        self.pool = pool
        self.engine = engine
        self.kernel = kernel
        self.num_experts = num_experts
        self.recorder = recorder
        self.prefetcher: Prefetcher | None = None
        self.routing_override: RoutingOverride | None = None
        # Copy or compute on the host: both set, or neither (host compute off).
        self.rule: CopyOrCompute | None = None
        self.host: HostCompute | None = None
        # Each layer's row of the device slot table, as views made once (making one costs host time).
        self._table_rows = list(pool.table.unbind(0))
        self._pair_buffers: dict[tuple, torch.Tensor] = {}  # decode steps' per-pair outputs, by shape
        self.stream_groups = STREAM_GROUPS
        self.layer_calls = 0
        self.waves = 0

    def __call__(
        self,
        layer: int,
        activation: ExpertActivation,
        hidden_states: torch.Tensor,  # [T, H]
        top_k_index: torch.Tensor,  # [T, k]
        top_k_weights: torch.Tensor,  # [T, k]
    ) -> torch.Tensor:  # [T, H]
        if torch.is_grad_enabled():  # generate() runs without; a direct call may not
            with torch.no_grad():
                return self(layer, activation, hidden_states, top_k_index, top_k_weights)
        routed = self.route(layer, hidden_states, top_k_index, top_k_weights)
        plan = self.plan(layer, routed)
        tokens, top_k = routed.top_k_index.shape
        # Same accumulation as transformers: weighted pairs in the promoted dtype, summed over k, cast back.
        out_dtype = torch.promote_types(hidden_states.dtype, top_k_weights.dtype)
        pairs_out = self._pairs_buffer(tokens * top_k, hidden_states, out_dtype, routed.complete)
        # A single wave holds every expert of the call: the kernel may look slots up in the device slot
        # table instead of a per-wave table copied from the host (offload.memory.slot_pool).
        slot_row = self._table_rows[layer] if len(plan.waves) == 1 else None
        jobs = None
        if plan.host:  # started first: the host works while the link copies and the device computes
            assert self.host is not None
            self.source.hold(layer, plan.host)  # in RAM until joined: the host tier must not reuse them
            try:
                jobs = self.host.submit(layer, routed, plan.host, activation, out_dtype)
            except BaseException:
                self.source.unhold(layer, plan.host)
                raise
        try:
            if len(plan.waves) > 1 and self.source.all_in_ram and self.stream_groups > 1:
                self._stream_waves(layer, routed, plan, activation, pairs_out)
            else:
                self._run_waves(layer, routed, plan, activation, pairs_out, slot_row)
        finally:
            if jobs is not None:  # joined even when the device side failed: no worker outlives the call
                assert self.host is not None
                try:
                    self.host.join(jobs, pairs_out)
                finally:
                    self.source.unhold(layer, plan.host)
        self.layer_calls += 1
        # The sum over k; for one token the same reduction (bitwise) without the view's dispatch.
        out = (
            pairs_out.sum(dim=0, keepdim=True)
            if tokens == 1
            else pairs_out.view(tokens, top_k, -1).sum(dim=1)
        )
        return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)

    def _run_waves(
        self,
        layer: int,
        routed: RoutedTokens,
        plan: AccessPlan,
        activation: ExpertActivation,
        pairs_out: torch.Tensor,
        slot_row: torch.Tensor | None,
    ) -> None:
        """Each wave in turn: its copies, then its compute once they have all landed. The prefetch follows the
        last wave's copies (the first's, with one wave): the slots of the waves before it are free then."""
        last = len(plan.waves) - 1
        for i, wave in enumerate(plan.waves):
            # Misses still on disk (the disk tier): their reads start now, and the rest of the wave is
            # copied and computed while they run; they follow (invariant wave-independence).
            later = self.source.start_reads(layer, [wave.experts[j] for j in wave.loads])
            now, rest = _split(wave, later)
            self.serve(layer, now)
            if i == last and self.prefetcher is not None:
                self.serve_prefetch(self.guess(layer, routed, plan))
            if now.experts:  # every expert of the call may be on the host
                self.compute(routed, now, activation, pairs_out, slot_row)
            if rest.experts:
                self.serve(layer, rest)
                self.compute(routed, rest, activation, pairs_out, slot_row)

    def _stream_waves(
        self,
        layer: int,
        routed: RoutedTokens,
        plan: AccessPlan,
        activation: ExpertActivation,
        pairs_out: torch.Tensor,
    ) -> None:
        """A call with more experts than slots (a prefill chunk), every expert in RAM: the waves' own plan (so
        every decision and every result is theirs), with copies and compute overlapped. A wave's experts are
        computed in groups in the order their copies were issued, hits first, each group as soon as its own
        copies land; the next wave's copy into a slot is issued as soon as nothing in this wave will read that
        slot (at once for slots this wave does not use, else when the group that read it releases it). The
        prefetch protocol's guess for the next layer is copied in behind the last wave's copies, while that wave
        computes (cache_policies.prefetch: after a multi-wave access)."""
        waves = plan.waves
        issued: list[set[int]] = [set() for _ in waves]  # per wave, positions of its loads already copied

        def issue(i: int, positions: Sequence[int]) -> None:
            todo = [j for j in positions if j not in issued[i]]
            if todo:
                issued[i].update(todo)
                wave = waves[i]
                self._copy(layer, [wave.experts[j] for j in todo], [wave.slots[j] for j in todo])

        for i, wave in enumerate(waves):
            issue(i, wave.loads)  # what the previous wave could not start early
            if i == len(waves) - 1 and self.prefetcher is not None:
                self.serve_prefetch(self.guess(layer, routed, plan))
            after: dict[int, int] = {}  # the next wave's loads into slots this wave reads: slot -> position
            if i + 1 < len(waves):
                following, reading = waves[i + 1], set(wave.slots)
                issue(i + 1, [j for j in following.loads if following.slots[j] not in reading])
                after = {following.slots[j]: j for j in following.loads if following.slots[j] in reading}
            for group in _stream_groups(wave, self.stream_groups):
                slots = [wave.slots[j] for j in group]
                self._compute_in(routed, [wave.experts[j] for j in group], slots, activation, pairs_out, None)
                issue(i + 1, sorted(after[s] for s in slots if s in after))
            self.waves += 1

    def before_layer(self, layer: int, hidden_states: torch.Tensor) -> None:
        """Before decoder layer ``layer`` runs (its attention not yet launched): a pre-attention predictor's
        guess of its experts, copied in while the attention computes. ``hidden_states`` ``[..., H]``: the
        layer's input. One device-to-host read (the guessed ids)."""
        prefetcher = self.prefetcher
        if prefetcher is None or not isinstance(prefetcher.predictor, PreAttentionPredictor):
            return
        with torch.no_grad():
            ids = prefetcher.predictor.early_ids(layer, hidden_states.reshape(-1, hidden_states.shape[-1]))
        self.serve_prefetch(prefetcher.before_layer(layer, read_to_host(ids.reshape(-1))))

    def route(
        self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> RoutedTokens:
        if self.routing_override is not None:
            top_k_index, top_k_weights = self.routing_override(layer, top_k_index, top_k_weights)
        predictor = None if self.prefetcher is None else self.prefetcher.predictor
        along = predictor.router_ids(layer, hidden) if isinstance(predictor, RouterPredictor) else None
        routed = RoutedTokens.build(hidden, top_k_index, top_k_weights, self.num_experts, along=along)
        if self.recorder is not None:
            self.recorder.record(layer, np.asarray(routed.ids).reshape(top_k_index.shape), top_k_weights)
        return routed

    def plan(self, layer: int, routed: RoutedTokens) -> AccessPlan:
        plan = self.cache.access(layer, routed.experts, self._host_choice(layer, routed))
        if self.prefetcher is not None:
            self.prefetcher.settle(plan, lambda expert: self._landed(layer, expert))
        return plan

    def serve(self, layer: int, wave: Wave) -> None:
        """Copy the wave's misses into their slots (asynchronously where the engine can)."""
        if wave.loads:
            self._copy(layer, [wave.experts[i] for i in wave.loads], [wave.slots[i] for i in wave.loads])

    def _copy(self, layer: int, experts: list[int], slots: list[int]) -> None:
        """Copy ``experts`` of ``layer`` (ascending) into ``slots`` from the source's host rows, at most the
        source's batch at a time (the host tier reads missing ones from disk first)."""
        base, batch = layer * self.num_experts, self.source.batch
        for start in range(0, len(experts), batch):
            chunk = experts[start : start + batch]
            rows = self.source.rows(layer, chunk)
            self.engine.load(
                list(zip(slots[start : start + batch], rows, strict=True)), [base + e for e in chunk]
            )
            self.source.copied(layer, chunk, self.engine.mark)

    def guess(self, layer: int, routed: RoutedTokens, plan: AccessPlan) -> Prefetch | None:
        if self.prefetcher is None:
            return None
        # The hint: what a router predictor computed on the device, read to the host with the routing.
        return self.prefetcher.after_access(layer, routed.experts, plan, hint=routed.along)

    def serve_prefetch(self, prefetch: Prefetch | None) -> None:
        """Copy a prefetch in behind the demand copies: it lands while this layer computes."""
        if prefetch is not None and prefetch.experts:
            self._copy(prefetch.layer, list(prefetch.experts), list(prefetch.slots))

    def compute(
        self,
        routed: RoutedTokens,
        wave: Wave,
        activation: ExpertActivation,
        pairs_out: torch.Tensor,
        slot_row: torch.Tensor | None,
    ) -> None:
        """Compute one wave's experts' pairs."""
        self._compute_in(routed, wave.experts, wave.slots, activation, pairs_out, slot_row)
        self.waves += 1

    def _compute_in(
        self,
        routed: RoutedTokens,
        experts: Sequence[int],
        slots: Sequence[int],
        activation: ExpertActivation,
        pairs_out: torch.Tensor,
        slot_row: torch.Tensor | None,
    ) -> None:
        """Wait for exactly ``slots``' copies, compute their experts' pairs, then let the slots be reused
        (invariant *slot-safety*)."""
        self.engine.acquire(slots)
        self.kernel(routed, experts, slots, self.pool, activation, pairs_out, slot_row=slot_row)
        self.engine.release(slots)

    def _pairs_buffer(
        self, rows: int, hidden_states: torch.Tensor, dtype: torch.dtype, complete: bool
    ) -> torch.Tensor:
        """The per-pair output ``[rows, H]``. Every row is written by exactly one wave unless some pair has a
        padding id: zeros only then. A decode step's (at most ``_REUSED_ROWS`` rows) is kept for the next call
        of its shape: making one costs about 5 us of host time, a tenth of a layer call's. Reuse is safe: a
        call's last reader of it (the sum over k) is ordered before the next call's first writer, on one
        stream or thread, and no call returns it."""
        shape = (rows, hidden_states.shape[-1])
        if rows > _REUSED_ROWS:
            alloc = torch.empty if complete else torch.zeros
            return alloc(shape, dtype=dtype, device=hidden_states.device)
        key = (shape, dtype, hidden_states.device)
        buffer = self._pair_buffers.get(key)
        if buffer is None:
            buffer = self._pair_buffers[key] = torch.empty(shape, dtype=dtype, device=hidden_states.device)
        if not complete:
            buffer.zero_()
        return buffer

    def _host_choice(self, layer: int, routed: RoutedTokens) -> HostChoice | None:
        rule = self.rule
        if rule is None:
            return None
        spans, source = routed.spans, self.source

        def choose(missing: Sequence[int], hits: int) -> list[int]:
            in_ram = [e for e in missing if source.in_ram(layer, e)]  # the host tier: no disk read for these
            # The rest are read from disk and copied on the device path meanwhile: time the host can use.
            on_disk = len(missing) - len(in_ram)
            busy = on_disk * (source.read_seconds + rule.copy_s) if on_disk and rule.rates else 0.0
            return rule.choose(in_ram, [spans[e][1] - spans[e][0] for e in in_ram], hits, busy)

        return choose

    def _landed(self, layer: int, expert: int) -> bool:
        slot = self.cache.slot_of(layer, expert)
        return slot is not None and self.engine.landed(slot)


def _split(wave: Wave, later: Sequence[int]) -> tuple[Wave, Wave]:
    """``wave`` as two: its experts but ``later``, then ``later`` (all among its loads)."""
    if not later:
        return wave, Wave()
    now, rest = Wave(evicted=wave.evicted), Wave()
    loads = set(wave.loads)
    for i, (expert, slot) in enumerate(zip(wave.experts, wave.slots, strict=True)):
        part = rest if expert in later else now
        if i in loads:
            part.loads.append(len(part.experts))
        part.experts.append(expert)
        part.slots.append(slot)
    return now, rest


def _stream_groups(wave: Wave, groups: int) -> list[list[int]]:
    """Positions of ``wave``'s experts in the order :meth:`LayerStep._stream_waves` computes them: its hits in
    one group (resident, nothing to wait for), then its loads in copy order in up to ``groups`` groups."""
    loads = set(wave.loads)
    hits = [j for j in range(len(wave.experts)) if j not in loads]
    size = -(-len(wave.loads) // groups) if wave.loads else 1
    copied = [list(wave.loads[k : k + size]) for k in range(0, len(wave.loads), size)]
    return ([hits] if hits else []) + copied
