"""End to end: decode speed of offloaded MoE models of real shapes, demand paging vs prefetch vs accelerate.

    python bench/e2e.py                      # a CUDA GPU: writes bench/results/e2e-<device>.json
    python bench/e2e.py --smoke              # CPU, tiny shapes: proves the script runs; NOT performance

The same as ``offload-bench e2e``; the benchmark itself is :mod:`offload_bench.e2e` (see its docstring and
docs/e2e.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

# transformers probes for the hub "kernels" package with `import kernels`, which would find bench/kernels.py
# while this script's folder is on sys.path: keep it off.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from offload_bench.e2e import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
