"""SGLang's MMEncoder, as triptych's ``sglang`` encode engine, embeds images like the ``hf``
encoder: same rows, same grids, values within 1e-4, its forward on a thread of its own."""

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from tests.test_correctness import ONE, THREE
from triptych.engines import EngineConfig, encode_engine
from triptych.engines.sglang.encode import SglangEncodeEngine
from triptych.models import load_adapter
from triptych.protocol import ImageItem


def items(model: Path, pictures: list[bytes]) -> list[ImageItem]:
    import io

    from PIL import Image

    adapter = load_adapter(model)
    assert adapter is not None
    result = []
    for data in pictures:
        width, height = Image.open(io.BytesIO(data)).size
        layout = adapter.image_layout(height, width)
        result.append(
            ImageItem(
                width=width,
                height=height,
                grid_thw=layout.grid_thw,
                num_tokens=layout.num_tokens,
                offset=0,
                data=data,
            )
        )
    return result


@pytest.fixture(scope="module")
async def encoders(tiny_model: Path) -> AsyncIterator[tuple[SglangEncodeEngine, object]]:
    config = EngineConfig(name="sglang", model_path=str(tiny_model))
    sglang = encode_engine(config)
    hf = encode_engine(EngineConfig(name="hf", model_path=str(tiny_model)))
    assert isinstance(sglang, SglangEncodeEngine)
    await sglang.start()
    await hf.start()
    try:
        yield sglang, hf
    finally:
        await sglang.close()
        await hf.close()


@pytest.mark.parametrize("pictures", [[ONE], THREE], ids=["one", "three"])
async def test_embeddings_equal_hf(
    encoders: tuple[SglangEncodeEngine, object], tiny_model: Path, pictures: list[bytes]
) -> None:
    sglang, hf = encoders
    images = items(tiny_model, pictures)
    got = await sglang.encode("r", images)
    want = await hf.encode("r", images)  # type: ignore[attr-defined]
    assert got.num_tokens == want.num_tokens == sum(i.num_tokens for i in images)
    assert got.hidden_size == want.hidden_size
    assert got.tensor.shape == want.tensor.shape
    assert got.tensor.dtype == torch.float32
    difference = (got.tensor - want.tensor).abs().max().item()
    assert difference < 1e-4, difference


async def test_concurrent_requests_share_a_batch_and_keep_their_rows(
    encoders: tuple[SglangEncodeEngine, object], tiny_model: Path
) -> None:
    sglang, hf = encoders
    requests = [items(tiny_model, [ONE]), items(tiny_model, THREE), items(tiny_model, THREE[1:])]
    got = await asyncio.gather(*(sglang.encode(f"r{i}", r) for i, r in enumerate(requests)))
    for images, embeddings in zip(requests, got, strict=True):
        want = await hf.encode("ref", images)  # type: ignore[attr-defined]
        assert embeddings.num_tokens == sum(i.num_tokens for i in images)
        assert (embeddings.tensor - want.tensor).abs().max().item() < 1e-4
    assert not sglang.encoder.req_states  # every request's staged embedding was released


async def test_forward_runs_off_the_event_loop(
    encoders: tuple[SglangEncodeEngine, object], tiny_model: Path
) -> None:
    sglang, _ = encoders
    model = sglang.encoder.model
    threads: list[str] = []
    original = model.get_image_feature

    def recording(mm_items: object) -> torch.Tensor:
        threads.append(threading.current_thread().name)
        return original(mm_items)  # type: ignore[no-any-return]

    model.get_image_feature = recording
    try:
        await sglang.encode("r", items(tiny_model, [ONE]))
    finally:
        model.get_image_feature = original
    assert threads == ["sglang-encoder"]
    assert threading.current_thread().name != "sglang-encoder"


async def test_a_grid_that_disagrees_with_the_prompt_is_an_error(
    encoders: tuple[SglangEncodeEngine, object], tiny_model: Path
) -> None:
    sglang, _ = encoders
    [image] = items(tiny_model, [ONE])
    wrong = image.model_copy(update={"grid_thw": (1, 2, 2), "num_tokens": 1})
    from triptych.protocol import ServiceError

    with pytest.raises(ServiceError, match="grids"):
        await sglang.encode("r", [wrong])
