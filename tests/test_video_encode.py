"""The hf encoder with videos: videos and images of concurrent requests share one vision
forward, each request's rows come back in prompt order and equal those encoded alone, and a
video that will not decode fails only its own request."""

import asyncio
from pathlib import Path

import pytest
import torch

from tests.test_hf_engine import image_item
from tests.videos import clip
from triptych.engines.hf.encode import HfEncodeEngine
from triptych.models import load_adapter
from triptych.protocol import ErrorCode, ImageItem, ServiceError, VideoItem


def video_item(
    model_path: Path, data: bytes, frames: int, fps: float, width: int, height: int, offset: int = 0
) -> VideoItem:
    adapter = load_adapter(model_path)
    assert adapter is not None
    layout = adapter.video_layout(frames, fps, height, width)
    return VideoItem(
        width=width,
        height=height,
        frame_indices=list(layout.frame_indices),
        second_per_grid_t=layout.second_per_grid_t,
        grid_thw=layout.grid_thw,
        num_tokens=layout.num_tokens,
        offset=offset,
        data=data,
    )


def at(image: ImageItem, offset: int) -> ImageItem:
    return image.model_copy(update={"offset": offset})


async def test_videos_and_images_share_one_forward_in_prompt_order(tiny_model: Path) -> None:
    engine = HfEncodeEngine(str(tiny_model))
    await engine.start()
    assert engine.tower is not None
    short = video_item(tiny_model, clip(56, 56, 4, 10, seed=1), 4, 10, 56, 56, offset=3)
    wide = video_item(tiny_model, clip(84, 56, 9, 3, seed=2), 9, 3, 84, 56, offset=40)
    image = at(image_item(tiny_model, 84, 56), 20)
    requests: list[tuple[list[ImageItem], list[VideoItem]]] = [
        ([image], [short, wide]),  # video, image, video in the prompt
        ([], [wide]),
    ]
    alone = [await engine.encode(f"r{i}", *request) for i, request in enumerate(requests)]
    # the image's rows sit between the two videos' rows
    only_image = await engine.encode("i", [image])
    torch.testing.assert_close(alone[0].tensor[8:14], only_image.tensor, rtol=1e-5, atol=1e-5)
    assert alone[0].num_tokens == short.num_tokens + image.num_tokens + wide.num_tokens

    forwards = 0
    original = engine.tower.run

    def counting(*args: object) -> torch.Tensor:
        nonlocal forwards
        forwards += 1
        return original(*args)  # type: ignore[arg-type]

    engine.tower.run = counting  # type: ignore[method-assign]
    together = await asyncio.gather(
        *(engine.encode(f"t{i}", *request) for i, request in enumerate(requests))
    )
    assert forwards == 1
    for single, batched in zip(alone, together, strict=True):
        torch.testing.assert_close(batched.tensor, single.tensor, rtol=1e-5, atol=1e-6)
    await engine.close()


async def test_a_video_that_will_not_decode_fails_alone(tiny_model: Path) -> None:
    engine = HfEncodeEngine(str(tiny_model))
    await engine.start()
    good = video_item(tiny_model, clip(56, 56, 4, 10, seed=1), 4, 10, 56, 56)
    broken = good.model_copy(update={"data": b"junk"})
    outcomes = await asyncio.gather(
        engine.encode("good", [], [good]),
        engine.encode("bad", [], [broken]),
        return_exceptions=True,
    )
    assert not isinstance(outcomes[0], BaseException)
    assert outcomes[0].num_tokens == good.num_tokens
    assert isinstance(outcomes[1], ServiceError)
    assert outcomes[1].info.code == ErrorCode.BAD_REQUEST
    assert "video refused by the encoder" in outcomes[1].info.message
    with pytest.raises(ServiceError):
        await engine.encode("bad-again", [], [broken])
    await engine.close()


async def test_the_sglang_engines_refuse_videos(tiny_model: Path) -> None:
    """SGLang's encoder would sample the frames by its own rules: a clear 400, not a guess."""
    from triptych.engines.registry import EngineConfig
    from triptych.engines.sglang.encode import SglangEncodeEngine
    from triptych.engines.sglang.requests import image_item
    from triptych.protocol import GenerateRequest, SamplingOptions

    video = video_item(tiny_model, clip(56, 56, 4, 10, seed=1), 4, 10, 56, 56, offset=1)
    engine = SglangEncodeEngine(EngineConfig(name="sglang", model_path=str(tiny_model)))
    with pytest.raises(ServiceError, match="--encode-engine hf") as refused:
        await engine.encode("r", [], [video])
    assert refused.value.info.code == ErrorCode.BAD_REQUEST
    request = GenerateRequest(
        model="m", token_ids=[1] * 10, videos=[video], sampling=SamplingOptions(max_tokens=4)
    )
    with pytest.raises(ServiceError, match="--engine hf") as refused:
        image_item(request, None)
    assert refused.value.info.code == ErrorCode.BAD_REQUEST
