"""Speed and memory benchmarks; each prints its figures (run as `python -m benchmarks.NAME`)."""
