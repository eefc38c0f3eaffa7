"""triptych: disaggregated Encode / Prefill / Decode serving of vision-language models."""

__version__ = "0.1.0"
