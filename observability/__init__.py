"""Cross-cutting instrumentation (NVTX ranges); a leaf every layer may use."""

if __name__ != "triptych.observability":  # the folder is reached only through the package
    raise ImportError(f"import triptych.observability, not {__name__} (docs/architecture.md)")
