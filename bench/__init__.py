"""Benchmarks: tunebook beside what users would run instead, ratios measured in one run (README.md).
Run each from the repository root: `python -m bench.NAME`."""
