"""Pick the expert kernel for a device: ``kernel="auto" | "torch" | "triton"``.

- ``auto``: Triton on CUDA; the torch reference on CPU. ``torch.nn.functional.grouped_mm`` was measured on
  CPU (torch 2.13, 2 cores, OLMoE and Qwen3-30B-A3B expert shapes, 1/16/256 tokens, fp32 and bf16; see
  docs/kernels.md): its outputs are bitwise equal to the reference and it is not consistently faster
  (within about 20% either way, slower at one token), so it brings nothing on CPU. It is the GPU
  baseline of ``bench/kernels.py`` (:mod:`offload.kernels.grouped_mm`).
- ``torch``: the reference, :func:`offload.kernels.expert_pairs_torch`, on any device.
- ``triton``: the fused Triton kernels. On CPU only through Triton's interpreter, which must be switched on
  with ``TRITON_INTERPRET=1`` in the environment before triton is imported (see :func:`interpreter_ready`);
  it is meant for tests, not speed.

Triton is imported here lazily, so ``import offload`` never compiles or defines a kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from offload.errors import OffloadError
from offload.kernels.torch_reference import expert_pairs_torch

ExpertKernel = Callable[..., None]  # the signature of offload.kernels.expert_pairs_torch
KernelName = Literal["auto", "torch", "triton"]


def select_kernel(choice: KernelName | str, device: torch.device | str) -> ExpertKernel:
    """The expert kernel for ``choice`` on ``device``.

    Raises:
        offload.OffloadError (a ValueError): an unknown choice; ``triton`` when triton cannot be imported;
            ``triton`` on a CPU without Triton's interpreter (``TRITON_INTERPRET=1`` set before triton's
            import).
    """
    device = torch.device(device)
    if choice not in ("auto", "torch", "triton"):
        raise OffloadError(f"kernel must be auto, torch or triton, got {choice!r}")
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return expert_pairs_torch
    return _triton_kernel(device)


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
