"""Offline study of cache policies: routing traces and their importers, the trace-replay simulator, and the
sweeps of ``offload-bench sweep`` with their reports. Imports the cache and policies, never the reverse."""
