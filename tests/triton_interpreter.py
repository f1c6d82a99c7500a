"""Triton's interpreter without its repeated set-up inside a launch: the kernel tests' largest cost on CPU.

In the interpreter every call of a ``@triton.jit`` helper from a kernel patches the language's builtins again
(an ``inspect.getmembers`` over ``triton.language`` and its tensor class), once per program of the grid and
per call: for the kernels' tiny test shapes, a third of their time. The launch has already patched the same
builtins with the same builder, so a helper whose language modules the launch has patched runs straight away;
the first helper of a launch that reaches another module (``triton.language.standard``'s ``zeros``, which uses
``triton.language.core``) patches as before. Nothing else changes: same builder, same semantics, the kernels'
results still compared with their oracles.

Written against triton 3.6's interpreter (``constraints.txt`` pins it); with any other version, or where its
internals have moved, the interpreter runs unchanged.
"""

from __future__ import annotations

from typing import Any


def speed_up_helper_calls() -> bool:
    """Install the shortcut; True if it was installed."""
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    grid_executor = getattr(interpreter, "GridExecutor", None)
    function = getattr(interpreter, "InterpretedFunction", None)
    if (
        not triton.__version__.startswith("3.6.")
        or grid_executor is None
        or function is None
        or not hasattr(function, "rewrite")
    ):
        return False
    patched: list[set[int]] = []  # per launch in progress: the language modules whose builtins are patched

    def languages(fn: Any) -> set[int]:
        return {id(value) for value in fn.__globals__.values() if value is tl or value is tl.core}

    launch = grid_executor.__call__
    call = function.__call__

    def launch_tracking_patches(self: Any, *args: Any, **kwargs: Any) -> Any:
        patched.append(languages(self.fn))
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.pop()

    def call_without_patching_again(self: Any, *args: Any, **kwargs: Any) -> Any:
        needed = languages(self.fn)
        if not patched or not needed <= patched[-1]:
            if patched:
                patched[-1] |= needed
            return call(self, *args, **kwargs)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as e:  # as the interpreter reports a helper's failure
            raise interpreter.InterpreterError(repr(e)) from e

    grid_executor.__call__ = launch_tracking_patches
    function.__call__ = call_without_patching_again
    return True
