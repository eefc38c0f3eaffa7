"""Benchmarks: load clients and recorded results for the serving stack."""
