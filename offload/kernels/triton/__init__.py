"""The Triton fused MoE over the slot pool: ``launch`` (host side), ``launch_plan`` (path and tiles),
``decode`` and ``prefill`` (the kernels), ``common`` (activations, epilogue), ``aot`` (compile for a GPU that
is not here). Importing ``launch`` defines the kernels, for the GPU or for Triton's interpreter depending on
``TRITON_INTERPRET`` at that moment: see :func:`offload.kernels.selection.interpreter_ready`.
"""
