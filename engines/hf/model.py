"""The language model of a VLM checkpoint: loading it, and prefilling one sequence.

Prefill runs transformers' own text-model forward, so its numbers are those of ``generate()``.
Decode steps over a static KV pool live in `decoder`.
"""

from dataclasses import dataclass, field
from typing import Any, cast

import torch
from transformers import AutoConfig, DynamicCache

from triptych.engines.hf.kv_cache import KVShape
from triptych.models.mrope import Grid, rope_index, vision_mask

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer: keys and values, each [1, kv_heads, tokens, head_dim]."""
Prompt = tuple[list[int], list[Grid], torch.Tensor | None]
"""Token ids, image and video grids (prompt order) and their embeddings: what
`LanguageModel.prefill` takes."""


def _model_class(model_type: str) -> Any:
    if model_type == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration
    if model_type == "qwen2_vl":
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


@dataclass
class SequenceKV:
    """One sequence's KV cache and M-RoPE offset."""

    kv: KV
    rope_delta: int = 0
    length: int = field(init=False)

    def __post_init__(self) -> None:
        self.length = int(self.kv[0][0].shape[2]) if self.kv else 0


class LanguageModel:
    """Loads the checkpoint's language model (without the vision tower unless asked)."""

    def __init__(
        self,
        model_path: str,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        keep_vision: bool = False,
    ) -> None:
        config = AutoConfig.from_pretrained(model_path)
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype or getattr(config, "dtype", None) or torch.float32
        model = _model_class(config.model_type).from_pretrained(model_path, dtype=self.dtype)
        if hasattr(model, "model") and hasattr(model.model, "visual") and not keep_vision:
            model.model.visual = None  # the encode stage owns the tower; free its weights
        self.model = model.to(self.device).eval()
        self.vlm = hasattr(self.model.model, "language_model")
        self.text = self.model.model.language_model if self.vlm else self.model.model
        text_config = getattr(config, "text_config", config)
        self.image_token_id: int | None = getattr(config, "image_token_id", None)
        self.video_token_id: int | None = getattr(config, "video_token_id", None)
        self.num_layers = int(text_config.num_hidden_layers)
        self.kv_heads = int(text_config.num_key_value_heads)
        self.head_dim = int(
            getattr(text_config, "head_dim", None)
            or text_config.hidden_size // text_config.num_attention_heads
        )
        self.hidden_size = int(text_config.hidden_size)
        self.num_heads = int(text_config.num_attention_heads)
        self.vocab_size = int(text_config.vocab_size)
        self.context_length = int(text_config.max_position_embeddings)
        self.kv_shape = KVShape(self.num_layers, self.kv_heads, self.head_dim, self.dtype)

    @torch.inference_mode()
    def prefill(
        self,
        token_ids: list[int],
        image_grids: list[Grid],
        embeddings: torch.Tensor | None,
    ) -> tuple[SequenceKV, torch.Tensor]:
        """Run the prompt; image and video embeddings take the placeholders' places.

        Returns the sequence's KV cache and the last position's final hidden state.
        """
        embeds, positions, rope_delta = self._inputs(token_ids, image_grids, embeddings)
        cache = DynamicCache(config=self.text.config)
        output = self.text(
            inputs_embeds=embeds, position_ids=positions, past_key_values=cache, use_cache=True
        )
        kv = cast(KV, [(layer.keys, layer.values) for layer in cache.layers])  # type: ignore[union-attr]
        return SequenceKV(kv, rope_delta), output.last_hidden_state[0, -1]

    @torch.inference_mode()
    def prefill_batch(self, prompts: list[Prompt]) -> list[tuple[SequenceKV, torch.Tensor]]:
        """Several prompts in one forward, right-padded to the longest under a padding mask.

        Each sequence's KV cache and last hidden state equal its own `prefill` up to the
        rounding of batched kernels (so the token-exact CPU path prefills one at a time).
        """
        if len(prompts) == 1:
            return [self.prefill(*prompts[0])]
        inputs = [self._inputs(*prompt) for prompt in prompts]
        lengths = [len(prompt[0]) for prompt in prompts]
        longest = max(lengths)
        embeds = torch.zeros(
            len(prompts), longest, self.hidden_size, dtype=inputs[0][0].dtype, device=self.device
        )
        rows = 3 if self.vlm else 1
        positions = torch.zeros(rows, len(prompts), longest, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(prompts), longest, dtype=torch.long, device=self.device)
        for row, ((embed, position, _), length) in enumerate(zip(inputs, lengths, strict=True)):
            embeds[row, :length] = embed[0]
            positions[:, row, :length] = position.view(rows, -1)
            mask[row, :length] = 1
        cache = DynamicCache(config=self.text.config)
        output = self.text(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions if self.vlm else positions[0],
            past_key_values=cache,
            use_cache=True,
        )
        layers = cast(KV, [(layer.keys, layer.values) for layer in cache.layers])  # type: ignore[union-attr]
        hidden = cast(torch.Tensor, output.last_hidden_state)
        results = []
        for row, ((_, _, rope_delta), length) in enumerate(zip(inputs, lengths, strict=True)):
            kv = cast(
                KV,
                [(k[row : row + 1, :, :length], v[row : row + 1, :, :length]) for k, v in layers],
            )
            results.append((SequenceKV(kv, rope_delta), hidden[row, length - 1]))
        return results

    def _inputs(
        self,
        token_ids: list[int],
        image_grids: list[Grid],
        embeddings: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A prompt's input embeddings [1, T, hidden], rope positions and M-RoPE offset."""
        ids = torch.tensor([token_ids], device=self.device)
        embeds = self.text.embed_tokens(ids)
        if embeddings is None or not image_grids:
            positions = torch.arange(len(token_ids), device=self.device).view(1, 1, -1)
            return embeds, positions.expand(3, 1, -1) if self.vlm else positions.view(1, -1), 0
        assert self.image_token_id is not None, "images given to a text-only model"
        mask = vision_mask(ids, self.image_token_id, self.video_token_id)
        rows = int(mask.sum())
        if rows != embeddings.shape[0]:
            raise ValueError(f"{embeddings.shape[0]} embedding rows for {rows} image tokens")
        embeds = embeds.masked_scatter(mask[..., None], embeddings.to(self.device, embeds.dtype))
        positions, delta = rope_index(
            self.model.model, ids, image_grids, self.image_token_id, self.video_token_id
        )
        return embeds, positions, delta

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, hidden] → float32 logits [B, vocab]."""
        return self.model.lm_head(hidden).float()  # type: ignore[no-any-return]
