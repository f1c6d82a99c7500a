"""Missed experts computed on the host: worker threads read them from the host store and compute their rows
while the device computes the resident experts and the copy engine brings in the copied ones.

Per layer call: :meth:`HostCompute.submit` gathers the host experts' tokens and routing weights (on a CUDA
device one device-to-host read of the ``[n, H]`` rows and ``[n]`` weights together, one sync; on a CPU device
nothing moves), hands one job per expert to the workers, and returns at once; :meth:`HostCompute.join` waits for
the jobs, in expert order, and writes each expert's rows into the call's per-pair output, where the sum over k
then runs exactly as for device rows (invariant *wave-independence*: a pair's row never depends on where or
when it was computed, only its kernel).

On a CUDA device each worker runs torch with its share of the process's intra-op threads
(:func:`torch_threads_per_worker`): workers that each start a pool of every core's threads oversubscribe the
CPU, and a GEMV whose threads wait for a descheduled one runs several times slower (measured in
``docs/host-compute.md``). On a CPU device the workers keep the process's count, so their kernels split the
work as the device path does and give the same bits.

A job that fails raises in :meth:`join`, on the caller's thread, as a :class:`HostComputeError` naming the layer
and expert; the other jobs of the call are waited for first, so nothing still writes when the error surfaces.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from offload.kernels import ExpertActivation, RoutedTokens
from offload.kernels.kernel_table import KernelTable
from offload.kernels.routing import read_tensors_to_host
from offload.memory.int4pack import Int4PackCopy
from offload.runtime.expert_source import ExpertSource
from offload.torch_threads import torch_thread_pool


def torch_threads_per_worker(workers: int) -> int:
    """Intra-op torch threads for each of ``workers`` host workers: the process's count shared among them."""
    return max(1, torch.get_num_threads() // workers)


class HostComputeError(RuntimeError):
    """A host worker failed to compute an expert."""


@dataclass(slots=True)
class HostJobs:
    """The host experts of one layer call, in flight."""

    layer: int
    experts: list[int]
    pairs: list[torch.Tensor]  # per expert: its pair ids [n] on the output's device
    futures: list[Future[tuple[torch.Tensor, float]]]


class HostCompute:
    def __init__(
        self,
        store: ExpertSource,
        table: KernelTable,
        threads: int,
        torch_threads: int | None = None,
        int4pack: Int4PackCopy | None = None,
    ) -> None:
        """``threads`` workers; each runs torch on ``torch_threads`` intra-op threads (None: as the process),
        each expert through ``table``'s kernel for its token count. ``int4pack``: the experts' copy for the
        int4pack kernel, whose fields join the store's in each job."""
        if threads < 1:
            raise ValueError(f"host threads must be at least 1, got {threads}")
        self.store = store
        self.int4pack = int4pack
        self.table = table
        self.threads = threads
        self.torch_threads = torch_threads
        self._pool = (
            ThreadPoolExecutor(threads, "offload-host")
            if torch_threads is None
            else torch_thread_pool(threads, torch_threads, "offload-host")
        )
        self.calls = 0  # expert calls computed on the host
        self.seconds = 0.0  # time the workers spent computing them, summed over workers
        self.wait_seconds = 0.0  # time the layer step waited for them after its device work

    def submit(
        self,
        layer: int,
        routed: RoutedTokens,
        experts: Sequence[int],
        activation: ExpertActivation,
        out_dtype: torch.dtype,
    ) -> HostJobs:
        """Start computing ``experts`` (ascending, each with pairs in ``routed``) on the workers."""
        k = routed.top_k
        weights = routed.top_k_weights.reshape(-1)  # [T*k]
        pairs = [routed.pairs_by_expert[slice(*routed.spans[e])] for e in experts]
        if routed.hidden.device.type == "cpu":
            inputs = [(routed.hidden[p // k], weights[p]) for p in pairs]
        else:  # one read of every host token's row and weight together, then per-expert views on the host
            everything = torch.cat(pairs)
            # [n, H] and [n]: one device sync, like the routing read
            x, w = read_tensors_to_host(routed.hidden[everything // k], weights[everything])
            sizes = [p.numel() for p in pairs]
            inputs = list(zip(x.split(sizes), w.split(sizes), strict=True))
        futures = [
            self._pool.submit(self._job, layer, e, xe, we, activation, out_dtype)
            for e, (xe, we) in zip(experts, inputs, strict=True)
        ]
        return HostJobs(layer, list(experts), pairs, futures)

    def join(self, jobs: HostJobs, out: torch.Tensor) -> None:
        """Wait for ``jobs`` and write their rows into ``out`` ``[T*k, H]``, expert by expert."""
        began = time.perf_counter()
        results: list[tuple[torch.Tensor, float] | BaseException] = []
        for future in jobs.futures:  # every job finishes before any error is raised: no writer left behind
            try:
                results.append(future.result())
            except BaseException as exc:
                results.append(exc)
        self.wait_seconds += time.perf_counter() - began
        for expert, pairs, result in zip(jobs.experts, jobs.pairs, results, strict=True):
            if isinstance(result, BaseException):
                raise HostComputeError(
                    f"computing expert {expert} of MoE layer {jobs.layer} on the host failed: "
                    f"{type(result).__name__}: {result}"
                ) from result
            rows, seconds = result
            out[pairs] = rows.to(out.device, non_blocking=True)
            self.calls += 1
            self.seconds += seconds

    def _job(
        self,
        layer: int,
        expert: int,
        x: torch.Tensor,  # [n, H] on the host
        w: torch.Tensor,  # [n]
        activation: ExpertActivation,
        out_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, float]:
        began = time.perf_counter()
        fields = self.store.views(layer, expert)
        if self.int4pack is not None:
            fields |= self.int4pack.views(layer, expert)
        with torch.no_grad():
            rows = self.table.kernel_for(x.shape[0])(x, w, fields, self.store.layout, activation, out_dtype)
        return rows, time.perf_counter() - began

    def close(self) -> None:
        """Wait for jobs in flight (they read the store), then stop the workers. Idempotent."""
        self._pool.shutdown(wait=True)
