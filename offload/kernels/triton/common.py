"""Device functions shared by the decode and prefill Triton kernels: activations and the epilogue.

Importing this module defines ``@triton.jit`` functions, which become interpreter functions or GPU functions
depending on ``TRITON_INTERPRET`` at import time (and triton's own library, at triton's import: see
:func:`offload.kernels.selection.interpreter_ready`). Only the kernel selection imports it, lazily.

Both paths compute, for every token-expert pair whose expert has a slot in this wave, in two stages:

- stage 1 (``STAGE == 1``): ``h = act(x @ gate.T + b_gate) * (x @ up.T + b_up)`` -> ``h`` workspace
  ``[rows, I]`` in the weights' dtype, one row per position in ``pairs_by_expert`` (minus ``pos_base``);
- stage 2 (``STAGE == 2``): ``y = (h @ down.T + b_down) * routing_weight`` -> ``out[pair]``.

Accumulation is fp32 everywhere; only ``h`` and ``out`` are rounded, like the torch reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Activation codes, a constexpr of every kernel. The host side maps ExpertActivation.kind with ACT_CODES.
ACT_SILU: tl.constexpr = tl.constexpr(0)
ACT_GELU_TANH: tl.constexpr = tl.constexpr(1)
ACT_GELU: tl.constexpr = tl.constexpr(2)
ACT_RELU: tl.constexpr = tl.constexpr(3)
ACT_GPT_OSS: tl.constexpr = tl.constexpr(4)

ACT_CODES: dict[str, int] = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3, "gpt_oss": 4}


@triton.jit
def _act(x, ACT: tl.constexpr):
    """One of silu, gelu_tanh, gelu, relu on an fp32 tile."""
    if ACT == ACT_SILU:
        y = x * tl.sigmoid(x)
    elif ACT == ACT_GELU_TANH:
        # 0.5 x (1 + tanh(z)) = x sigmoid(2z): the interpreter and every GPU backend have sigmoid
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = x * tl.sigmoid(2.0 * z)
    elif ACT == ACT_GELU:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    else:
        y = tl.maximum(x, 0.0)
    return y


@triton.jit
def gated_activation(gate, up, alpha, limit, ACT: tl.constexpr, HAS_GATE: tl.constexpr):
    """fp32 gate and up pre-activations -> the down projection's input, as ExpertActivation.fn does it:
    ``act(gate) * up`` with a gate, ``act(up)`` without (``gate`` is then ignored), and gpt-oss's clamped
    sigmoid GLU ``(clamp(up) + 1) * g * sigmoid(alpha * g)``, ``g = min(gate, limit)``."""
    if ACT == ACT_GPT_OSS:
        g = tl.minimum(gate, limit)
        u = tl.minimum(tl.maximum(up, -limit), limit)
        h = (u + 1.0) * (g * tl.sigmoid(g * alpha))
    elif HAS_GATE:
        h = _act(gate, ACT) * up
    else:
        h = _act(up, ACT)
    return h


@triton.jit
def epilogue(
    gate,  # fp32 [..., BLOCK_N] gate accumulator (stage 1 with a gate only)
    acc,  # fp32 [..., BLOCK_N] up accumulator (stage 1) or down accumulator (stage 2)
    n,  # int [..., BLOCK_N] output columns
    n_mask,
    store_mask,
    row,  # int64 [...] workspace row (stage 1 destination)
    pair,  # int64 [...] pair id (stage 2 destination and routing weight)
    slot_bias_ptr,  # bias field of this slot (already moved there by dequant.at_slot)
    weight_ptr,  # [T*k] routing weights
    c_ptr,  # stage 1: h workspace [rows, N]; stage 2: out [T*k, N]
    alpha,
    limit,
    N: tl.constexpr,
    UP_OFF: tl.constexpr,  # first bias row of "up" (I with a gate, else 0); 0 in stage 2
    STAGE: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
):
    if STAGE == 1:
        if HAS_BIAS:
            acc += tl.load(slot_bias_ptr + UP_OFF + n, mask=n_mask, other=0.0).to(tl.float32)
            if HAS_GATE:
                gate += tl.load(slot_bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
        h = gated_activation(gate, acc, alpha, limit, ACT, HAS_GATE)
        tl.store(c_ptr + row * N + n, h.to(c_ptr.dtype.element_ty), mask=store_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(slot_bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
        y = acc * tl.load(weight_ptr + pair).to(tl.float32)
        tl.store(c_ptr + pair * N + n, y.to(c_ptr.dtype.element_ty), mask=store_mask)
