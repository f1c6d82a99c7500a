"""Bytes of one expert in each storage format, relative to the 16-bit weights a routing trace records, so a
sweep's bytes moved and simulated tokens/s reflect compressed experts (``offload-bench sweep --format``).

Per weight, as :mod:`offload.memory.formats` packs them: int4 is two codes a byte plus an fp16 scale and
zero point per group of input columns; mxfp4 two codes a byte plus one e8m0 scale per 32; int8 one byte
plus one 16-bit scale per output row and fp8 one byte plus one fp32 scale per 128 x 128 block, both well
under 1% and left out. Alignment padding (256 bytes an expert) is left out too.
"""

from __future__ import annotations

BYTES_PER_WEIGHT = {
    "bf16": 2.0,
    "fp16": 2.0,
    "int8": 1.0,
    "fp8": 1.0,
    "int4": 0.5 + 4 / 64,  # groups of 64 (the runtime's default)
    "int4-g128": 0.5 + 4 / 128,
    "mxfp4": 0.5 + 1 / 32,
}
TRACE_BYTES_PER_WEIGHT = 2.0  # every shared trace gives the expert size of its bf16 checkpoint


def expert_bytes_in(fmt: str, trace_expert_bytes: int) -> int:
    """Bytes of one expert stored in ``fmt``, from the trace's (16-bit) expert size."""
    try:
        per_weight = BYTES_PER_WEIGHT[fmt]
    except KeyError:
        raise ValueError(
            f"unknown expert format {fmt!r}; choose one of {', '.join(BYTES_PER_WEIGHT)}"
        ) from None
    return round(trace_expert_bytes * per_weight / TRACE_BYTES_PER_WEIGHT)
