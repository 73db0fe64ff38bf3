"""Reproducible benchmarks (run each as ``python -m bench.<name> --help``); latest figures in bench/RESULTS.md."""
