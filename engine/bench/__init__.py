"""Benchmark protocol: measure the disk and the engine so the search can compare against rooflines."""
