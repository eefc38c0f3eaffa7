"""Videos through every topology on the hf engine: token for token what transformers' greedy
``generate()`` returns given the same frames, for one video, a video beside an image, and two
videos of different sizes; the videos' bytes also cross to the encoder over NIXL."""

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.video_utils import read_video_pyav

from tests.stack import ServeHf, Stack
from tests.test_correctness import (
    MAX_TOKENS,
    TOPOLOGIES,
    Oracle,
    image_part,
    picture,
    request,
    served_tokens,
)
from tests.test_metrics import metrics_ports, scrape, value
from tests.videos import clip, sample_indices, video_part, video_patches

SHORT = clip(56, 56, frames=4, fps=10, seed=1)
"""0.4 s: the minimum of 4 frames, so a temporal patch spans 0.2 s (not Qwen's usual 1 s)."""
WIDE = clip(84, 56, frames=9, fps=3, seed=2)
"""3 s at 3 fps: 6 of its 9 frames are sampled."""
TALL = clip(56, 112, frames=12, fps=4, seed=3)

CASES = [
    [
        {
            "role": "user",
            "content": [video_part(SHORT), {"type": "text", "text": "What happens here?"}],
        }
    ],
    [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Does the picture"},
                image_part(picture(84, 56, 5)),
                {"type": "text", "text": "appear in"},
                video_part(WIDE),
            ],
        }
    ],
    [
        {"role": "user", "content": [video_part(TALL), {"type": "text", "text": "and"}]},
        {"role": "assistant", "content": "Two clips."},
        {"role": "user", "content": [video_part(SHORT), video_part(WIDE)]},
    ],
]


class VideoOracle(Oracle):
    """Plain transformers: the chat template, the image processor, PyAV frames read by
    transformers' own reader, and greedy generate() with ``pixel_values_videos``,
    ``video_grid_thw`` and ``second_per_grid_ts``."""

    def __init__(self, model_path: Path) -> None:
        super().__init__(model_path)
        self.video_token = self.model.config.video_token_id
        # no video_preprocessor_config.json: transformers' video processor reads these
        self.video_size = {
            "shortest_edge": self.processor.size["shortest_edge"],
            "longest_edge": self.processor.size["longest_edge"],
        }

    def tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        ids, media = self.prompt(messages)
        images = media.images
        videos = [self._video(data) for data in media.videos]
        extra: dict[str, Any] = {}
        image_counts: list[int] = []
        if images:
            batch = self.processor(images=images, return_tensors="pt")
            image_counts = (batch["image_grid_thw"].prod(-1) // 4).tolist()
            extra.update(pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
        video_counts = [int(grid.prod()) // 4 for _, grid, _ in videos]
        if videos:
            extra.update(
                pixel_values_videos=torch.cat([pixels for pixels, _, _ in videos]),
                video_grid_thw=torch.cat([grid for _, grid, _ in videos]),
                second_per_grid_ts=torch.tensor([seconds for _, _, seconds in videos]),
            )
        expanded: list[int] = []
        for token in ids:
            if token == self.image_token:
                expanded.extend([token] * image_counts.pop(0))
            elif token == self.video_token:
                expanded.extend([token] * video_counts.pop(0))
            else:
                expanded.append(token)
        input_ids = torch.tensor([expanded])
        extra["mm_token_type_ids"] = (input_ids == self.image_token).int() + 2 * (
            input_ids == self.video_token
        ).int()
        with torch.no_grad():
            out = self.model.generate(
                input_ids, max_new_tokens=MAX_TOKENS, do_sample=False, **extra
            )
        return [int(t) for t in out[0, len(expanded) :]]

    def _video(self, data: bytes) -> tuple[torch.Tensor, torch.Tensor, float]:
        frames, metadata = read_video_pyav(io.BytesIO(data), sample_indices)
        pixels, grid = video_patches(self.processor, frames, self.video_size)
        return pixels, grid, 2 / metadata.sampled_fps


@pytest.fixture(scope="module")
def oracle(tiny_model: Path) -> VideoOracle:
    return VideoOracle(tiny_model)


@pytest.fixture(scope="module", params=TOPOLOGIES)
def served(request: pytest.FixtureRequest, serve_hf: ServeHf) -> Iterator[Stack]:
    topology = request.param
    # in E/P/D every video's bytes wait in the frontend's pool and the encoder READs them
    frontend = ("--max-inline-image-bytes", "0") if topology == "E/P/D" else ()
    with serve_hf(topology, frontend_args=frontend, ready_timeout=180) as stack:
        yield stack


def test_videos_equal_generate(served: Stack, oracle: VideoOracle, tiny_model: Path) -> None:
    # E/P/D (the only topology with both an encoder and a prefill worker) is served with
    # --max-inline-image-bytes 0: its encoder READs every video's bytes from the frontend's pool
    nixl = {"encode", "prefill"} <= {process.name for process in served.processes}
    encoder = ""
    read_before = 0.0
    if nixl:
        encoder = f"http://127.0.0.1:{asyncio.run(metrics_ports(served, 'encode'))[0]}/metrics"
        read_before = value(
            scrape(encoder), "triptych_transfer_bytes_total", kind="video", outcome="ok"
        )
    bodies = [request(case, stream=i == 1) for i, case in enumerate(CASES)]
    got = served_tokens(served.url, tiny_model.name, bodies, timeout=180)
    for case, tokens in zip(CASES, got, strict=True):
        assert len(tokens) == MAX_TOKENS
        assert tokens == oracle.tokens(case)
    if nixl:  # every video's bytes were READ from the frontend's pool: 6 videos in all
        read = value(scrape(encoder), "triptych_transfer_bytes_total", kind="video", outcome="ok")
        assert read - read_before == len(SHORT) * 2 + len(WIDE) * 2 + len(TALL)


@pytest.mark.parametrize("served", ["E/P/D", "E/PD"], indirect=True)  # a dedicated encoder
def test_videos_batched_with_images_across_requests(
    served: Stack, oracle: VideoOracle, tiny_model: Path
) -> None:
    """Requests in flight together share the encoder's forwards (videos and images mixed)."""
    assert any(p.name == "encode" for p in served.processes)
    mixed = [CASES[i % len(CASES)] for i in range(4)]
    bodies = [request(case) for case in mixed]
    got = served_tokens(served.url, tiny_model.name, bodies, together=True, timeout=180)
    for case, tokens in zip(mixed, got, strict=True):
        assert tokens == oracle.tokens(case)
