"""GPU truth in one call: every GPU claim of the project measured in stages, in under 7 minutes on one GPU.

    python bench/gpu_check.py --out DIR          # writes DIR/gpu-check.json and DIR/gpu-check.md
    python bench/gpu_check.py --out DIR --smoke  # CPU, toy sizes, under 2 minutes: the same JSON keys

Runs from a checkout with nothing installed (the repository root goes on the path). The stages and what each
measures: offload_bench/gpu_check (its docstring) and docs/e2e.md. Results are committed under
bench/results/gpu/.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this folder is on sys.path (where bench/kernels.py would shadow transformers' probe for the
# "kernels" package) and the repository root is not: swap them.
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench")]

from offload_bench.gpu_check.driver import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
