"""The model-adapter interface: what triptych must know about a VLM family."""

import abc
from collections.abc import Sequence
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


@dataclass(frozen=True)
class VideoLayout:
    """How one video appears in the prompt and to the vision tower."""

    frame_indices: tuple[int, ...]
    """The decoded frames the vision tower sees, as the checkpoint's processor samples them."""
    grid_thw: tuple[int, int, int]
    """Patch grid (temporal, height, width) of the sampled, resized frames."""
    num_tokens: int
    """Placeholder tokens (= embedding rows) the video occupies."""
    resized: tuple[int, int]
    """(height, width) of every frame after resizing."""
    second_per_grid_t: float
    """Seconds of video one temporal patch spans (M-RoPE's time axis on Qwen2.5-VL)."""


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
    video_token_id: int | None = None
    """The token repeated once per video embedding row, which the template also emits once
    per video; None for a family that reads no videos."""

    @abc.abstractmethod
    def image_layout(self, height: int, width: int) -> ImageLayout:
        """Token count and patch grid for an image of this size."""

    def video_layout(self, total_frames: int, fps: float, height: int, width: int) -> VideoLayout:
        """Sampled frames, token count and patch grid of a video of `total_frames` frames of
        this size at `fps` frames per second. Raises ValueError when it cannot be sampled."""
        raise ValueError("this model does not accept videos")

    def expand_placeholders(
        self, token_ids: list[int], layouts: Sequence[ImageLayout | VideoLayout]
    ) -> tuple[list[int], list[int]]:
        """Replace each image's and video's placeholder, in prompt order, by its run of
        `image_token_id` or `video_token_id` (framed if needed).

        Returns the expanded ids and each item's offset (index of its first token). Raises
        ValueError when the placeholders do not match the items one for one, kind for kind.
        """
        image_placeholder = self.placeholder_token_id or self.image_token_id
        kinds = {image_placeholder: "image"}
        if self.video_token_id is not None:
            kinds[self.video_token_id] = "video"
        positions = [i for i, token in enumerate(token_ids) if token in kinds]
        found = [kinds[token_ids[i]] for i in positions]
        wanted = ["video" if isinstance(layout, VideoLayout) else "image" for layout in layouts]
        if found != wanted:
            if "video" not in found + wanted:
                raise ValueError(
                    f"the prompt has {len(found)} image placeholders for {len(wanted)} images"
                )
            raise ValueError(
                f"the prompt has {found.count('image')} image and {found.count('video')} video "
                f"placeholders for {wanted.count('image')} images and "
                f"{wanted.count('video')} videos"
            )
        frame = not self.template_frames_images
        opening = [self.image_start_token_id] if frame and self.image_start_token_id else []
        closing = [self.image_end_token_id] if frame and self.image_end_token_id else []
        expanded: list[int] = []
        offsets: list[int] = []
        start = 0
        for position, layout in zip(positions, layouts, strict=True):
            token = self.image_token_id
            if isinstance(layout, VideoLayout) and self.video_token_id is not None:
                token = self.video_token_id
            expanded.extend(token_ids[start:position])
            expanded.extend(opening)
            offsets.append(len(expanded))
            expanded.extend([token] * layout.num_tokens)
            expanded.extend(closing)
            start = position + 1
        expanded.extend(token_ids[start:])
        return expanded, offsets
