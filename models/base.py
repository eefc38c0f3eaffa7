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
    """Per-family knowledge: placeholders, token counts, positions, the vision tower.

    Two prompt patterns are covered: a contiguous run of one token that the chat template
    already frames (Qwen-VL: ``<|vision_start|><|image_pad|>...<|vision_end|>``), and a run
    the adapter frames itself with a start/end pair around it (InternVL, MiniCPM-V: the
    template emits one placeholder, the prompt needs ``<img><ctx>...<ctx></img>``).
    """

    image_token_id: int
    """The token repeated once per embedding row."""
    placeholder_token_id: int | None = None
    """What the chat template emits for an image, when it differs from `image_token_id`."""
    image_start_token_id: int | None = None
    """Token that opens an image run (Qwen: ``<|vision_start|>``; None when there is none)."""
    image_end_token_id: int | None = None
    """Token that closes an image run."""
    template_frames_images: bool = True
    """Whether the chat template already puts the start/end tokens around the placeholder."""

    @abc.abstractmethod
    def image_layout(self, height: int, width: int) -> ImageLayout:
        """Token count and patch grid for an image of this size."""

    def expand_placeholders(
        self, token_ids: list[int], layouts: list[ImageLayout]
    ) -> tuple[list[int], list[int]]:
        """Replace each image's placeholder by its run of `image_token_id` (framed if needed).

        Returns the expanded ids and each image's offset (index of its first image token).
        Raises ValueError when the prompt does not hold exactly one placeholder per image.
        """
        placeholder = self.placeholder_token_id or self.image_token_id
        positions = [i for i, token in enumerate(token_ids) if token == placeholder]
        if len(positions) != len(layouts):
            raise ValueError(
                f"the prompt has {len(positions)} image placeholders for {len(layouts)} images"
            )
        frame = not self.template_frames_images
        opening = [self.image_start_token_id] if frame and self.image_start_token_id else []
        closing = [self.image_end_token_id] if frame and self.image_end_token_id else []
        expanded: list[int] = []
        offsets: list[int] = []
        start = 0
        for position, layout in zip(positions, layouts, strict=True):
            expanded.extend(token_ids[start:position])
            expanded.extend(opening)
            offsets.append(len(expanded))
            expanded.extend([self.image_token_id] * layout.num_tokens)
            expanded.extend(closing)
            start = position + 1
        expanded.extend(token_ids[start:])
        return expanded, offsets
