"""Benchmarks: `python -m bench.run --suite NAME` writes bench/results/NAME.json and NAME.png."""
