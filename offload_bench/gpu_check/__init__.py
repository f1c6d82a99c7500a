"""The GPU check: every GPU claim of the project measured in one command, in stages, in under 6 minutes.

    python bench/gpu_check.py --out DIR          (or: make gpu-check OUT=DIR)
    python bench/gpu_check.py --out DIR --smoke  (CPU, toy sizes: the same JSON keys, in under 2 minutes)

``driver`` runs each stage in its own process with its own time cap (``stage`` is that process's entry), so a
stage that fails, hangs or crashes the device is recorded with its error and the next one runs; ``summary``
writes the markdown. The stages: ``machine`` (device, versions, host-to-device and device bandwidth),
``tests`` (the gpu-marked tests), ``budget`` (peak device memory against the budget, term by term),
``kernels`` (Triton bf16 correctness and speed against a torch loop and grouped_mm), ``e2e`` (decode at real
shapes against the copy floor and accelerate). Nothing here needs anything installed beyond what a GPU image
has (torch, triton, transformers, accelerate, safetensors, psutil, pytest, numpy).
"""
