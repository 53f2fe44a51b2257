"""Benchmark and soak harness (``make bench``, ``make soak``); not tests: they measure."""
