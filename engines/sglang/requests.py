"""What an ``sglang.Engine`` is asked per request: sampling parameters and the image item.

Every field of `SamplingOptions` is either forwarded to SGLang's ``SamplingParams`` or the
request is refused with a 400 naming it; nothing is dropped on the way.
"""

from typing import Any

import torch

from triptych.engines.grammar import JSON_OBJECT_SCHEMA
from triptych.protocol import ErrorCode, GenerateRequest, ServiceError
from triptych.transfer import ImageEmbeddings

TOP_K_ALL = -1
"""SGLang's "no top-k" (triptych says 0)."""


def sampling_params(request: GenerateRequest) -> dict[str, Any]:
    """SGLang's ``sampling_params`` for `request`; a 400 for what SGLang cannot honour.

    SGLang applies ``sampling_seed`` only under ``--enable-deterministic-inference``, so a
    seeded request that samples is refused rather than silently unseeded (a greedy one does
    not need its seed). The model's EOS ids travel as stop ids (unless ``ignore_eos``) so that
    the frontend's view of the tokenizer decides, not SGLang's copy of it; ``min_new_tokens``
    holds them back as it does the other stop ids. A response format travels as SGLang's
    ``json_schema`` (``{"type":"object"}`` for ``json_object``), which its grammar backend
    enforces.
    """
    options = request.sampling
    if options.seed is not None and not options.greedy:
        raise ServiceError(
            ErrorCode.BAD_REQUEST,
            "'seed' is not supported by the sglang engine (SGLang seeds sampling only under "
            "--enable-deterministic-inference); drop it or use temperature 0",
        )
    stops = set(options.stop_token_ids)
    if not options.ignore_eos:
        stops.update(request.eos_token_ids)
    return {
        "max_new_tokens": options.max_tokens,
        "temperature": options.temperature,
        "top_p": options.top_p,
        "top_k": options.top_k or TOP_K_ALL,
        "min_p": options.min_p,
        "stop": list(options.stop) or None,
        "stop_token_ids": sorted(stops) or None,
        "min_new_tokens": options.min_tokens,
        "ignore_eos": options.ignore_eos,
        "presence_penalty": options.presence_penalty,
        "frequency_penalty": options.frequency_penalty,
        "repetition_penalty": options.repetition_penalty,
        "no_stop_trim": True,
        "json_schema": json_schema(request),
    }


def json_schema(request: GenerateRequest) -> str | None:
    """The schema SGLang's grammar backend is to enforce, as JSON text (None: free text)."""
    fmt = request.sampling.response_format
    if fmt is None:
        return None
    return fmt.schema_text if fmt.type == "json_schema" else JSON_OBJECT_SCHEMA


def image_item(request: GenerateRequest, embeddings: ImageEmbeddings | None) -> dict[str, Any]:
    """The request's images as one precomputed ``processor_output`` item.

    ``input_ids`` already hold each image's expanded ``<|image_pad|>`` run; SGLang finds the
    runs, places the rows there and computes Qwen's M-RoPE positions from the grids. Without
    `embeddings` (the decode side of E/P/D, where SGLang embeds nothing and only needs the
    grids for M-RoPE) the item carries a zero tensor of the right shape that SGLang never
    reads, instead of a second copy of the embeddings.
    """
    if request.videos:
        raise ServiceError(
            ErrorCode.BAD_REQUEST,
            "the sglang engine does not serve videos yet; serve videos with --engine hf",
        )
    rows = sum(image.num_tokens for image in request.images)
    if embeddings is not None and embeddings.tensor is not None:
        if embeddings.num_tokens != rows:
            raise ServiceError(
                ErrorCode.INTERNAL, f"{embeddings.num_tokens} embedding rows for {rows} tokens"
            )
        tensor = embeddings.tensor
    else:
        hidden = embeddings.hidden_size if embeddings is not None else 1
        tensor = torch.zeros(1, hidden).expand(rows, hidden)
    return {
        "format": "processor_output",
        "modality": "IMAGE",
        "precomputed_embeddings": tensor,
        "image_grid_thw": torch.tensor([list(image.grid_thw) for image in request.images]),
    }
