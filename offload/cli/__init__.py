"""Command-line entry points: offload-run and offload-bench."""
