"""Prefill worker: answers decode with a bootstrap room at once, then prefills into it."""
