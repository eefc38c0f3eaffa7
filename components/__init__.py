"""The processes of a triptych stack; each runs as ``python -m triptych.components.<name>``."""
