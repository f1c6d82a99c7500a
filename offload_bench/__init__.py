"""Benchmark code: what measures the runtime, kept out of it.

Real model shapes (``shapes``), random-weight models of those shapes (``synthetic``), forced routing from
a trace (``forced_routing``), machine probes (``machine``), the end-to-end benchmark (``e2e``, ``e2e_runs``,
``e2e_report``) and the ``offload-bench`` command (``cli``). Scripts in ``bench/`` call into it; results go
to ``bench/results/``.
"""
