"""Encode worker: runs the vision tower and forwards the request, embeddings attached, to decode."""
