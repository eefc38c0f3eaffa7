"""Decode worker: the entry point of disaggregation (or an aggregated prefill+decode worker)."""
