"""The processes of a triptych stack; each runs as ``python -m triptych.components.<name>``."""

if __name__ != "triptych.components":  # the folder is reached only through the package
    raise ImportError(f"import triptych.components, not {__name__} (docs/architecture.md)")
