"""Stage ``budget``: a real-shape model (Qwen3-30B-A3B's expert and attention shapes, 4 MoE layers) at three
budgets, generating from the longest prompt the KV-cache reserve allows. Peak device memory against the
budget and against the planner's figure, term by term: what loading took against resident weights + slots,
and what generating added against workspace + KV cache; allocated (``max_memory_allocated``) and reserved
(``max_memory_reserved``), each judged against the budget as soon as its row is done, and the driver's view
(``mem_get_info``, polled on a side thread while the row loads and generates: its peak above the reading taken
before the load). torch and the runtime are imported inside the stage, so a package missing on the GPU machine
fails this stage alone, with its error."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from offload_bench.gpu_check.part import Part

if TYPE_CHECKING:
    import torch

LAYERS = 4
FRACTIONS = (0.125, 0.25, 0.5)  # of all experts, in slots
NEW_TOKENS = 8
# Each row's targets: (target, the row's field judged against its budget)
TARGETS = (
    ("peak allocated device memory <= budget", "peak_allocated_bytes"),
    ("peak reserved device memory <= budget", "peak_reserved_bytes"),
)
DRIVER_INTERVAL_S = 0.005  # between two mem_get_info readings


def run(part: Part, seconds: float) -> None:
    import torch

    from offload.config import OffloadConfig
    from offload.runtime.budget import budget_for_slots
    from offload_bench.shapes import SHAPES, SMOKE_SHAPES
    from offload_bench.synthetic import shape_survey

    cuda = torch.cuda.is_available() and not part.smoke
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    shape = (SMOKE_SHAPES if part.smoke else SHAPES)["qwen3-30b-a3b"]
    hf_config = shape.build_config(LAYERS)
    dtype = torch.float32 if part.smoke else torch.bfloat16
    max_context = 64 if part.smoke else 4096
    survey = shape_survey(hf_config, dtype)
    part.set(
        device=str(device),
        shape=f"{shape.name}, {LAYERS} of {shape.layers} layers",
        max_context=max_context,
        prompt_tokens=max_context - NEW_TOKENS,
        new_tokens=NEW_TOKENS,
        rows=[],
    )
    for fraction in FRACTIONS:
        sizing = OffloadConfig.create(1, device=device, dtype=dtype, max_context=max_context)
        slots = max(survey.top_k, round(fraction * survey.total_experts))
        budget = budget_for_slots(survey, sizing, slots)
        row = measure(hf_config, device, dtype, budget, max_context, fraction)
        part.add("rows", row)
        judge(part, row)  # at once: a stage cut short keeps every finished row's verdicts


def judge(part: Part, row: dict[str, Any]) -> None:
    """One row's targets: its peak allocated and its peak reserved device memory, each against its budget
    (N/A where the row has no such figure: no CUDA allocator off a GPU). Each name carries the row's slot
    fraction: a target judged again under the same name would replace the earlier row's verdict."""
    budget = row["budget_bytes"]
    for target, key in TARGETS:
        peak = row.get(key)
        inputs: dict[str, Any] = dict(budget_bytes=budget, slot_fraction=row["slot_fraction"])
        inputs[key] = peak
        if peak is None:
            inputs["why"] = "no CUDA device (smoke run): torch's CUDA allocator has no peak"
        part.target(
            f"{target} ({row['slot_fraction']:g} of the experts in slots)",
            None if peak is None else round(peak / budget, 4),
            None if peak is None else peak <= budget,
            invariant=True,  # the planner's promise: the budget is all the device memory the model takes
            **inputs,
        )


class PeakSampler:
    """The peak of ``read()`` (bytes in use) between :meth:`start` and :meth:`stop`: the first reading, taken
    by :meth:`start` on the caller's thread, is the baseline; a daemon thread then reads every ``interval``
    seconds; :meth:`stop` ends and joins it and takes a last reading. As a context manager it is stopped and
    joined however the block ends. A reading that raises ends the polling and is kept in ``error``. A
    transient shorter than ``interval`` can fall between two readings."""

    def __init__(self, read: Callable[[], int], interval: float = DRIVER_INTERVAL_S) -> None:
        self.read = read
        self.interval = interval
        self.baseline: int | None = None
        self.peak: int | None = None
        self.samples = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        value = int(self.read())
        self.samples += 1
        self.peak = value if self.peak is None else max(self.peak, value)

    def _poll(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self._sample()
        except Exception as exc:  # recorded; the row goes on without further readings
            self.error = f"{type(exc).__name__}: {exc}"

    def start(self) -> PeakSampler:
        self._sample()
        self.baseline = self.peak
        self._thread = threading.Thread(target=self._poll, name="driver-peak-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.error is None and self.baseline is not None:
            try:
                self._sample()
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def peak_over_baseline(self) -> int | None:
        return None if self.peak is None or self.baseline is None else self.peak - self.baseline

    def __enter__(self) -> PeakSampler:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def driver_used(device: torch.device) -> Callable[[], int]:
    """Bytes in use on ``device`` as the driver reports them (total - free of ``cudaMemGetInfo``): every
    process's and every allocator's, the CUDA context included."""
    import torch

    def read() -> int:
        free, total = torch.cuda.mem_get_info(device)
        return int(total - free)

    return read


def measure(
    hf_config: Any, device: torch.device, dtype: torch.dtype, budget: int, max_context: int, fraction: float
) -> dict:
    import torch

    import offload
    from offload.config import OffloadConfig
    from offload.hf.install import runtime_of
    from offload_bench.synthetic import random_offloaded

    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
        base_reserved = torch.cuda.memory_reserved(device)
    config = OffloadConfig.create(budget, device=device, dtype=dtype, max_context=max_context)
    # Off a GPU there is no driver reading: the sampler runs on a constant so that its thread, start and
    # stop are exercised, and no figure is recorded.
    sampler = PeakSampler(driver_used(device) if cuda else lambda: 0)
    with sampler:
        model: Any = random_offloaded(hf_config, config, progress=False)
        plan = runtime_of(model).budget
        row: dict = dict(
            slot_fraction=fraction,
            budget_bytes=budget,
            planned_bytes=plan.planned_bytes,
            planned=dict(
                resident_bytes=plan.resident_bytes,
                kv_cache_bytes=plan.kv_cache_bytes,
                workspace_bytes=plan.workspace_bytes,
                slot_table_bytes=plan.slot_table_bytes,
                slots=plan.slots,
                slot_bytes=plan.slots * plan.expert_bytes,
            ),
        )
        if cuda:
            loaded = torch.cuda.memory_allocated(device) - base_alloc
            row["loaded_bytes"] = loaded
            row["loaded_vs_planned_resident_and_slots"] = loaded - (
                plan.resident_bytes + plan.slots * plan.expert_bytes
            )
        prompt = torch.randint(3, int(hf_config.get_text_config().vocab_size), (1, max_context - NEW_TOKENS))
        with torch.inference_mode():
            model.generate(
                prompt.to(device), max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS
            )
        if cuda:
            torch.cuda.synchronize(device)
    row.update(
        driver_samples=sampler.samples,
        driver_sample_interval_s=sampler.interval,
        driver_baseline_used_bytes=sampler.baseline if cuda else None,
        driver_peak_used_over_baseline_bytes=sampler.peak_over_baseline if cuda else None,
    )
    if sampler.error is not None:
        row["driver_sampler_error"] = sampler.error
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base_alloc
        reserved = torch.cuda.max_memory_reserved(device) - base_reserved
        row.update(
            peak_allocated_bytes=peak,
            peak_reserved_bytes=reserved,
            generate_added_bytes=peak - row["loaded_bytes"],
            planned_workspace_and_kv_bytes=plan.workspace_bytes + plan.kv_cache_bytes,
            allocated_within_budget=peak <= budget,
            reserved_within_budget=reserved <= budget,
            over_planned_bytes=peak - plan.planned_bytes,
        )
    offload.close(model)
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row
