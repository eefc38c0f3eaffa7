"""Cross-cutting instrumentation (NVTX ranges); a leaf every layer may use."""
