"""The built-in engine: PyTorch + transformers, on CPU or a CUDA device."""
