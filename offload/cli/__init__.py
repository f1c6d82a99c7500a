"""Command-line entry points: offload-run, offload-serve (and offload-bench, in offload_bench)."""
