"""Pick the expert kernel for a device: ``kernel="auto" | "torch" | "triton" | "dequant" | "int8pack" | "int4pack"``,
and the layout its slots hold (:func:`device_layout`).

- ``auto``: Triton on CUDA. On CPU the host kernels (:mod:`offload.kernels.host_experts`) through the kernel
  table measured on the machine (:mod:`offload.kernels.kernel_table`), the same table the experts computed on
  the host beside a GPU use, and for bf16 int4 and MXFP4 experts slots in the int4pack packing torch's CPU
  kernel reads (``docs/host-compute.md``: 4-60 times the dequantizing kernels at one token);
  until the runtime has measured the table, the torch reference. ``torch.nn.functional.grouped_mm`` was measured on
  CPU (torch 2.13, 2 cores, OLMoE and Qwen3-30B-A3B expert shapes, 1/16/256 tokens, fp32 and bf16; see
  docs/kernels.md): its outputs are bitwise equal to the reference and it is not consistently faster
  (within about 20% either way, slower at one token), so it brings nothing on CPU. It is the GPU
  baseline of ``bench/kernels.py`` (:mod:`offload.kernels.grouped_mm`).
- ``torch``: the reference, :func:`offload.kernels.expert_pairs_torch`, on any device: the
  dequantize-then-compute oracle of compressed experts.
- ``dequant``, ``int8pack``, ``int4pack``: that host kernel for every expert, on a CPU device (for tests and
  comparisons; ``int4pack`` puts the slots in its packing).
- ``triton``: the fused Triton kernels. On CPU only through Triton's interpreter, which must be switched on
  with ``TRITON_INTERPRET=1`` in the environment before triton is imported (see :func:`interpreter_ready`);
  it is meant for tests, not speed.

Triton is imported here lazily, so ``import offload`` never compiles or defines a kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from offload.config import CPU_KERNELS, KernelChoice, check_kernel_choice
from offload.errors import OffloadError
from offload.kernels.kernel_table import HostKernelPairs, KernelTable
from offload.kernels.torch_reference import expert_pairs_torch
from offload.memory.int4pack import int4pack_unsupported, packed_layout
from offload.memory.layout import ExpertLayout

ExpertKernel = Callable[..., None]  # the signature of offload.kernels.expert_pairs_torch


def select_kernel(
    choice: KernelChoice | str, device: torch.device | str, table: KernelTable | None = None
) -> ExpertKernel:
    """The expert kernel for ``choice`` on ``device``; ``table``: the measured kernel table ``auto`` runs on a
    CPU device (None: not measured yet, the reference stands in).

    Raises:
        offload.OffloadError (a ValueError): an unknown choice; a CPU kernel on a CUDA device; ``triton`` when
            triton cannot be imported; ``triton`` on a CPU without Triton's interpreter (``TRITON_INTERPRET=1``
            set before triton's import).
    """
    device = torch.device(device)
    check_kernel_choice(choice, device)
    if choice in CPU_KERNELS:
        return HostKernelPairs(KernelTable.single(choice))
    if choice == "torch":
        return expert_pairs_torch
    if choice == "auto" and device.type != "cuda":
        return expert_pairs_torch if table is None else HostKernelPairs(table)
    return _triton_kernel(device)


def device_layout(layout: ExpertLayout, device: torch.device | str, choice: str) -> ExpertLayout:
    """The layout the slots hold (and the host store that fills them) for kernel ``choice`` on ``device``: the
    int4pack packing where a CPU device runs that kernel on the experts, else ``layout``.

    Raises:
        offload.OffloadError: a CPU kernel that cannot compute these experts.
    """
    device = torch.device(device)
    check_kernel_choice(choice, device)
    if device.type == "cuda" or choice in ("torch", "triton"):
        return layout
    why_not = int4pack_unsupported(layout)
    if choice == "int4pack" and why_not is not None:
        raise OffloadError(f"kernel='int4pack' cannot compute these experts: {why_not}")
    if choice in ("auto", "int4pack") and why_not is None:
        return packed_layout(layout)
    if choice == "int8pack" and layout.format != "int8":
        raise OffloadError(f"kernel='int8pack' computes int8 experts, these are {layout.format_name}")
    if choice == "dequant" and layout.format == "float":
        raise OffloadError(f"kernel='dequant' computes compressed experts, these are {layout.format_name}")
    return layout


def interpreter_ready() -> bool:
    """Whether Triton kernels can run on CPU tensors in this process.

    ``TRITON_INTERPRET`` is read when a ``@triton.jit`` decorator runs, and triton's own library
    (``tl.zeros``, ``tl.sum``, ...) is decorated when triton is first imported; ``import torch._dynamo`` (which
    ``import offload`` reaches through transformers) imports triton. So the variable must be in the
    environment before triton is imported: in practice, before Python starts.
    """
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return bool(triton.knobs.runtime.interpret) and isinstance(tl.zeros, InterpretedFunction)


def _triton_kernel(device: torch.device) -> ExpertKernel:
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # no triton wheel for this platform
        raise OffloadError(f"kernel='triton' needs the triton package: {exc}") from None
    # On a GPU both builds run (interpreted kernels copy CUDA tensors to the host and back: a debugging
    # aid); on a CPU only the interpreted one does.
    if device.type != "cuda" and not interpreter_ready():
        raise OffloadError(
            f"kernel='triton' on {device} needs a CUDA device, or Triton's CPU interpreter: set "
            "TRITON_INTERPRET=1 in the environment before starting Python (slow; meant for tests)"
        )
    from offload.kernels.triton import launch

    if device.type != "cuda" and not launch.INTERPRETED:  # the variable changed after the kernels' import
        raise OffloadError(
            "the Triton kernels were built for the GPU in this process: set TRITON_INTERPRET=1 before starting Python"
        )
    return launch.expert_pairs_triton
