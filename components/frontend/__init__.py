"""Frontend: the OpenAI-compatible HTTP server; tokenizes, expands images, streams tokens back."""
