"""The language model of a VLM checkpoint: loading it, and running prompts (prefill).

Prefill runs transformers' own text-model forward, so its numbers are those of ``generate()``:
a prompt's embeddings (image embeddings in the placeholders' places) and rope positions are
made once (`prepare`), then run whole, several prompts in one right-padded forward
(`prefill_together`), or a chunk at a time on top of the earlier chunks' cache
(`prefill_chunk`). Decode steps over the paged cache live in `decoder`.
"""

from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import AutoConfig, DynamicCache

from triptych.engines.hf.kv_cache import KVShape
from triptych.engines.hf.sequence import Prompt
from triptych.models import family
from triptych.models.mrope import rope_index, vision_mask


@dataclass(eq=False)
class PrefillState:
    """A prompt on its way through prefill."""

    embeds: torch.Tensor
    """[1, T, hidden] input embeddings."""
    positions: torch.Tensor
    """Rope positions: [3, 1, T] (M-RoPE) or [1, T]."""
    rope_delta: int
    done: int = 0
    """Positions run so far."""
    cache: DynamicCache | None = None
    """Keys and values of the positions run so far (chunked prompts only)."""

    @property
    def length(self) -> int:
        """The prompt's length."""
        return int(self.embeds.shape[1])


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
        self.path = model_path
        self.device = torch.device(device)
        self.dtype = dtype or getattr(config, "dtype", None) or torch.float32
        model_class = family(config.model_type).model_class.load()
        model = model_class.from_pretrained(model_path, dtype=self.dtype)
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
    def prepare(self, prompt: Prompt) -> PrefillState:
        """A prompt's input embeddings and rope positions (without waiting for the device)."""
        ids = torch.tensor([prompt.token_ids])
        embeds = self.text.embed_tokens(ids.to(self.device, non_blocking=True))
        if prompt.embeddings is None or not prompt.image_grids:
            positions = torch.arange(len(prompt.token_ids)).view(1, 1, -1)
            positions = positions.expand(3, 1, -1) if self.vlm else positions.view(1, -1)
            return PrefillState(embeds, positions.to(self.device, non_blocking=True), 0)
        assert self.image_token_id is not None, "images given to a text-only model"
        mask = vision_mask(ids, self.image_token_id, self.video_token_id)
        rows = int(mask.sum())
        if rows != prompt.embeddings.shape[0]:
            raise ValueError(f"{prompt.embeddings.shape[0]} embedding rows for {rows} image tokens")
        embeds = embeds.masked_scatter(
            mask.to(self.device, non_blocking=True)[..., None],
            prompt.embeddings.to(self.device, embeds.dtype),
        )
        # on the host: the index is integer work with loops, which would wait for the device
        positions, delta = rope_index(
            self.model.model, ids, prompt.image_grids, self.image_token_id, self.video_token_id
        )
        return PrefillState(embeds, positions.to(self.device, non_blocking=True), delta)

    @torch.inference_mode()
    def resume(self, state: PrefillState, kv: torch.Tensor) -> None:
        """Start `state` after its first ``kv.shape[2]`` positions, whose keys and values
        `kv` [layers, 2, tokens, kv_heads, head_dim] holds (a cached prefix): prefill then
        runs only the rest, at the full prompt's positions."""
        cache = DynamicCache(config=self.text.config)
        for layer in range(self.num_layers):
            keys, values = (kv[layer, i].transpose(0, 1).unsqueeze(0) for i in (0, 1))
            cache.update(keys, values, layer)
        state.cache = cache
        state.done = int(kv.shape[2])

    @torch.inference_mode()
    def prefill_chunk(self, state: PrefillState, end: int) -> tuple[DynamicCache, torch.Tensor]:
        """Run positions ``state.done..end-1`` on top of the cache of those before them.

        Returns the cache (every position so far) and the final hidden state of the chunk's
        last position, [1, hidden].
        """
        if state.cache is None:
            state.cache = DynamicCache(config=self.text.config)
        start = state.done
        output = self.text(
            inputs_embeds=state.embeds[:, start:end],
            position_ids=state.positions[..., start:end],
            past_key_values=state.cache,
            use_cache=True,
        )
        state.done = end
        return state.cache, output.last_hidden_state[:, -1]

    @torch.inference_mode()
    def prefill_together(self, states: list[PrefillState]) -> tuple[DynamicCache, torch.Tensor]:
        """Whole prompts in one forward, right-padded to the longest under a padding mask.

        Returns the batched cache (row ``i`` is prompt ``i``, padded) and each prompt's last
        hidden state, [n, hidden]. Each equals the prompt's own `prefill_chunk` up to the
        rounding of batched kernels (so the token-exact CPU path runs prompts one at a time).
        """
        if len(states) == 1:
            state = states[0]
            return self.prefill_chunk(state, state.length)
        lengths = [state.length for state in states]
        longest = max(lengths)
        embeds = states[0].embeds.new_zeros(len(states), longest, self.hidden_size)
        rows = 3 if self.vlm else 1
        positions = torch.zeros(rows, len(states), longest, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(states), longest, dtype=torch.long, device=self.device)
        for row, (state, length) in enumerate(zip(states, lengths, strict=True)):
            embeds[row, :length] = state.embeds[0]
            positions[:, row, :length] = state.positions.view(rows, -1)
            mask[row, :length] = 1
            state.done = length
        cache = DynamicCache(config=self.text.config)
        output = self.text(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions if self.vlm else positions[0],
            past_key_values=cache,
            use_cache=True,
        )
        hidden = cast(torch.Tensor, output.last_hidden_state)
        ends = torch.tensor([length - 1 for length in lengths]).to(self.device, non_blocking=True)
        return cache, hidden[torch.arange(len(states), device=self.device), ends]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, hidden] → float32 logits [B, vocab]."""
        return self.model.lm_head(hidden).float()  # type: ignore[no-any-return]


def stacked_kv(cache: DynamicCache, start: int, end: int) -> torch.Tensor:
    """Keys and values of positions ``start..end-1`` of every layer and row of `cache`, as one
    new tensor [layers, 2, rows, kv_heads, end - start, head_dim] (one copy)."""
    layers = cast(list[Any], cache.layers)
    parts = [t[:, :, start:end] for layer in layers for t in (layer.keys, layer.values)]
    stacked = torch.stack(parts)
    return stacked.view(len(layers), 2, *stacked.shape[1:])
