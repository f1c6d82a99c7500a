"""Load test of offload-serve: N concurrent clients, latency percentiles and tokens/s (loopback only).

    python bench/serve_load.py --server-args "--device cpu" --clients 4 --requests 32 --out bench/results/serve_load-cpu-demo.json
    python bench/serve_load.py --url http://127.0.0.1:8000     # a server already running on this machine

The load test itself is :mod:`offload_bench.serve_load` (see its docstring).
"""

from __future__ import annotations

import sys
from pathlib import Path

# transformers probes for the hub "kernels" package with `import kernels`, which would find bench/kernels.py
# while this script's folder is on sys.path: keep it off.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from offload_bench.serve_load import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
