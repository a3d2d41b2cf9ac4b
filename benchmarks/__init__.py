"""Benchmarks that compare asymlora with the alternatives in one run (see run_all.py)."""
