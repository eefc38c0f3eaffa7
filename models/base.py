"""The model-adapter interface: what triptych must know about a VLM family."""

import abc
from dataclasses import dataclass


@dataclass(frozen=True)
class ImageLayout:
    """How one image appears in the prompt and to the vision tower."""

    grid_thw: tuple[int, int, int]
    """Patch grid (temporal, height, width) of the resized image."""
    num_tokens: int
    """Placeholder tokens (= embedding rows) the image occupies."""
    resized: tuple[int, int]
    """(height, width) in pixels after resizing."""


class ModelAdapter(abc.ABC):
    """Per-family knowledge: placeholders, token counts, positions, the vision tower."""

    image_token_id: int
    """The placeholder token repeated once per embedding row."""
    image_start_token_id: int | None = None
    """Token that opens an image run (Qwen: ``<|vision_start|>``; None when there is none)."""
    image_end_token_id: int | None = None
    """Token that closes an image run."""

    @abc.abstractmethod
    def image_layout(self, height: int, width: int) -> ImageLayout:
        """Token count and patch grid for an image of this size."""

    def expand_placeholders(
        self, token_ids: list[int], layouts: list[ImageLayout]
    ) -> tuple[list[int], list[int]]:
        """Repeat each image's single placeholder to its token count.

        Returns the expanded ids and each image's offset (index of its first placeholder).
        Raises ValueError when the prompt does not hold exactly one placeholder per image.
        """
        positions = [i for i, token in enumerate(token_ids) if token == self.image_token_id]
        if len(positions) != len(layouts):
            raise ValueError(
                f"the prompt has {len(positions)} image placeholders for {len(layouts)} images"
            )
        expanded: list[int] = []
        offsets: list[int] = []
        start = 0
        for position, layout in zip(positions, layouts, strict=True):
            expanded.extend(token_ids[start:position])
            offsets.append(len(expanded))
            expanded.extend([self.image_token_id] * layout.num_tokens)
            start = position + 1
        expanded.extend(token_ids[start:])
        return expanded, offsets
