"""The ``make bench-*`` benchmarks, each writing a report under docs/benchmarks."""
