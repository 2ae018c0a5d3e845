"""lmx benchmarks: synthetic models, the raw BatchGenerator ceiling, an HTTP load generator.

Run from the repository root, e.g. `python -m bench.run_throughput --preset tiny`; see
bench/README.md. Nothing under lmx/ imports this package.
"""
