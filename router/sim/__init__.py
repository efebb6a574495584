"""Trace-driven discrete-event cluster simulator driving the same scheduler and planner code.

`trace` loads request traces and assigns tiers, `cluster` is the event loop (groups, prefill
chunks, decode steps, reconfigurations), `policies` defines Nitsum and the baselines, `report`
turns finished runs into per-tier figures, sweeps and plots.
"""
