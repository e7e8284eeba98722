"""Measurement on the host and reporting: the benchmark's engines, weight bytes per token,
quality, op profiles, the perf table, the sweep summary."""
