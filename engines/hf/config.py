"""How the ``hf`` engine runs its model: the flags of the engine group, resolved."""

from dataclasses import dataclass

DEFAULT_MAX_LEN = 8192
"""Tokens per sequence when neither ``--max-model-len`` nor a shorter model context sets it."""


@dataclass(frozen=True)
class HfConfig:
    """Everything the model thread needs besides the checkpoint and the device."""

    max_len: int = 0
    """Tokens one sequence may hold, prompt included (``--max-model-len``, alias
    ``--context-length``); 0 means the model's context length, at most `DEFAULT_MAX_LEN`."""
    max_running: int = 128
    """Sequences admitted at once (``--max-running-requests``); decode batches are no larger."""
    mem_fraction_static: float = 0.9
    """Fraction of the device's memory the process may hold, weights and KV cache together
    (``--mem-fraction-static``, alias ``--mem-fraction``)."""
    kv_tokens: int | None = None
    """The KV cache's size in tokens, instead of sizing it from the fraction
    (``--kv-cache-tokens``)."""
    page_size: int = 16
    """Token positions per KV block (``--page-size``)."""
    chunked_prefill_size: int = 2048
    """Prompt positions one prefill step runs at most (``--chunked-prefill-size``): a running
    decode batch waits for one such step at most."""
    prefill_batch: int = 8
    """Whole prompts that may share one prefill step on CUDA (``--max-prefill-batch``); the
    CPU prefills one at a time, so that its output equals ``generate()`` exactly."""
    cuda_graphs: bool = True
    """Replay decode steps as CUDA graphs (``--disable-cuda-graph`` turns it off)."""
    prefix_cache: bool = True
    """Reuse the KV cache of a prompt's prefix computed before in this process (text and
    images by content key), a block at a time (``--disable-prefix-cache`` turns it off). A
    prefill-only engine then keeps a paged KV cache for that alone."""
