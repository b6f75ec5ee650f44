"""Foredeck benchmarks: each prints its figures and its ratio to a baseline from the same run."""
