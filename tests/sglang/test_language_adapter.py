"""The sglang prefill/decode adapter up to where SGLang's scheduler would start (it cannot here:
no CUDA, no sgl_kernel): SGLang validates its ServerArgs; the image item and input_ids go
through SGLang's own QwenVLImageProcessor to the offsets, embeddings and M-RoPE positions
transformers computes; every sampling option reaches SGLang's SamplingParams; the bootstrap
address and room that decode is given are SGLang's, and a prefill failure reaches decode."""

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from triptych.engines import EngineConfig
from triptych.engines.rooms import RoomPrefillEngine
from triptych.engines.sglang.disaggregated import SglangDecodeEngine, SglangPrefillEngine
from triptych.engines.sglang.language import generate_kwargs
from triptych.engines.sglang.requests import sampling_params
from triptych.engines.sglang.server_args import server_args
from triptych.models import load_adapter
from triptych.protocol import (
    GenerateRequest,
    ImageItem,
    ResponseFormat,
    SamplingOptions,
    ServiceError,
    TensorHandle,
)
from triptych.transfer import ImageEmbeddings

SIZES = [(84, 56), (56, 112)]  # (width, height) of two images of different shapes


def config(model: Path, **fields: Any) -> EngineConfig:
    return EngineConfig(name="sglang", model_path=str(model), device="cuda", **fields)


def image_request(model: Path, **sampling: Any) -> GenerateRequest:
    """A chat prompt with two images, tokenized and expanded as the frontend does."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    adapter = load_adapter(model)
    assert adapter is not None
    content = [
        {"type": "text", "text": "Compare"},
        {"type": "image"},
        {"type": "text", "text": "with"},
        {"type": "image"},
    ]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    layouts = [adapter.image_layout(height, width) for width, height in SIZES]
    ids, offsets = adapter.expand_placeholders(tokenizer.encode(text), layouts)
    images = [
        ImageItem(
            width=width,
            height=height,
            grid_thw=layout.grid_thw,
            num_tokens=layout.num_tokens,
            offset=offset,
        )
        for (width, height), layout, offset in zip(SIZES, layouts, offsets, strict=True)
    ]
    options = SamplingOptions(**{"max_tokens": 8, **sampling})
    return GenerateRequest(
        model="m", token_ids=ids, images=images, sampling=options, eos_token_ids=[1602]
    )


@pytest.mark.parametrize("role", ["prefill", "decode", "agg"])
def test_server_args(tiny_model: Path, role: str) -> None:
    args = server_args(config(tiny_model, bootstrap_port=0, max_model_len=4096), role)  # type: ignore[arg-type]
    assert args.model_path == str(tiny_model)
    assert args.language_only and not args.encoder_only
    assert args.enable_adaptive_dispatch_to_encoder
    assert args.disaggregation_mode == {"agg": "null"}.get(role, role)
    if role != "agg":
        assert args.disaggregation_transfer_backend == "nixl"
    if role == "prefill":
        assert args.disaggregation_bootstrap_port > 0  # a free port, SGLang needs a real one
    assert args.incremental_streaming_output
    assert args.context_length == 4096
    assert args.device == "cuda" and args.tp_size == 1


def test_server_args_of_the_encoder_on_cpu(tiny_model: Path) -> None:
    args = server_args(EngineConfig(name="sglang", model_path=str(tiny_model)), "encoder")
    assert args.encoder_only and not args.language_only
    assert args.device == "cpu" and args.dtype == "float32"
    assert args.attention_backend == "torch_native"


@pytest.fixture(scope="module")
def processor(tiny_model: Path) -> Any:
    """SGLang's multimodal processor, built as its tokenizer manager builds it."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.managers.multimodal_processor import get_mm_processor, import_processors
    from sglang.srt.managers.tokenizer_manager import get_processor_wrapper
    from sglang.srt.multimodal.transport import determine_tensor_transport_mode
    from sglang.srt.runtime_context import publish

    args = server_args(config(tiny_model), "prefill")
    publish(args, role="tokenizer")
    model_config = ModelConfig.from_server_args(args)
    import_processors("sglang.srt.multimodal.processors")
    return get_mm_processor(
        model_config.hf_config,
        args,
        get_processor_wrapper(),
        determine_tensor_transport_mode(),
        model_config=model_config,
    )


def through_sglang(processor: Any, kwargs: dict[str, Any]) -> Any:
    """What SGLang's tokenizer manager makes of one async_generate call's inputs."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    request = GenerateReqInput(
        input_ids=kwargs["input_ids"],
        image_data=kwargs["image_data"],
        sampling_params=kwargs["sampling_params"],
        rid=kwargs["rid"],
    )
    return asyncio.run(
        processor.process_mm_data_async(
            image_data=request.image_data,
            input_text=request.input_ids,
            request_obj=request,
            max_req_input_len=100_000,
        )
    )


@pytest.fixture(scope="module")
def rope_of_transformers(tiny_model: Path) -> Iterator[Any]:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model).eval()

    def rope(request: GenerateRequest, image_token: int) -> tuple[torch.Tensor, int]:
        ids = torch.tensor([request.token_ids])
        positions, deltas = model.model.get_rope_index(
            ids,
            image_grid_thw=torch.tensor([list(i.grid_thw) for i in request.images]),
            mm_token_type_ids=(ids == image_token).int(),
        )
        return positions[:, 0], int(deltas.view(-1)[0])

    yield rope


def test_image_item_through_sglangs_processor(
    tiny_model: Path, processor: Any, rope_of_transformers: Any
) -> None:
    request = image_request(tiny_model)
    rows = sum(image.num_tokens for image in request.images)
    embeddings = torch.randn(rows, 64)
    kwargs = generate_kwargs("r1", request, ImageEmbeddings(rows, 64, embeddings), None)
    assert kwargs["input_ids"] == request.token_ids and kwargs["stream"] is True
    assert len(kwargs["image_data"]) == 1  # one item for all images of the request

    output = through_sglang(processor, kwargs)
    assert output.input_ids == request.token_ids  # already expanded: SGLang keeps them
    [item] = output.mm_items
    assert torch.equal(item.precomputed_embeddings, embeddings)
    assert item.model_specific_data["image_grid_thw"].tolist() == [
        list(i.grid_thw) for i in request.images
    ]
    spans = [(i.offset, i.offset + i.num_tokens - 1) for i in request.images]
    assert [tuple(o) for o in item.offsets] == spans
    positions, delta = rope_of_transformers(request, output.im_token_id)
    assert torch.equal(output.mrope_positions, positions)
    assert int(output.mrope_position_delta.view(-1)[0]) == delta != 0


def test_decode_item_gives_the_same_mrope_without_the_embeddings(
    tiny_model: Path, processor: Any, rope_of_transformers: Any
) -> None:
    request = image_request(tiny_model)
    rows = sum(image.num_tokens for image in request.images)
    shape_only = ImageEmbeddings(rows, 64)  # what decode knows from the embedding handle
    output = through_sglang(processor, generate_kwargs("r2", request, shape_only, None))
    positions, delta = rope_of_transformers(request, output.im_token_id)
    assert torch.equal(output.mrope_positions, positions)
    assert int(output.mrope_position_delta.view(-1)[0]) == delta


def test_every_sampling_option_reaches_sglang(tiny_model: Path) -> None:
    from sglang.srt.sampling.sampling_params import SamplingParams

    request = image_request(
        tiny_model,
        temperature=0.7,
        top_p=0.9,
        top_k=20,
        min_p=0.05,
        stop=("done",),
        stop_token_ids=(7, 9),
        min_tokens=2,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        repetition_penalty=1.1,
    )
    params = SamplingParams(**sampling_params(request))
    params.verify(vocab_size=1610)
    assert params.max_new_tokens == 8
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.7, 0.9, 20, 0.05)
    assert params.stop_strs == ["done"]
    assert params.stop_token_ids == {7, 9, 1602}  # with the model's EOS
    assert params.min_new_tokens == 2 and not params.ignore_eos
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, 0.25)
    assert params.repetition_penalty == 1.1
    for field in SamplingOptions.model_fields:  # logprobs travel beside: see the test below
        assert field in {
            "max_tokens",
            "stop",
            "stop_token_ids",
            "min_tokens",
            "seed",
            "logprobs",
            "response_format",  # as json_schema, below
        } or (field in sampling_params(request)), f"{field} is not forwarded"
    assert sampling_params(request)["json_schema"] is None  # free text

    schema = '{"properties":{"a":{"type":"integer"}},"type":"object"}'
    for fmt, expected in (
        (ResponseFormat(type="json_schema", schema_text=schema, strict=True), schema),
        (ResponseFormat(type="json_object"), '{"type":"object"}'),
    ):
        shaped = image_request(tiny_model, response_format=fmt)
        params = SamplingParams(**sampling_params(shaped))
        params.verify(vocab_size=1610)
        assert params.json_schema == expected

    ignoring = image_request(tiny_model, ignore_eos=True, top_k=0, stop_token_ids=(7,))
    loose = SamplingParams(**sampling_params(ignoring))
    assert loose.ignore_eos and loose.stop_token_ids == {7}
    loose.verify(vocab_size=1610)
    assert loose.top_k == -1 or loose.top_k >= 1 << 30  # SGLang's "whole vocabulary"


def test_a_seed_sglang_would_ignore_is_refused(tiny_model: Path) -> None:
    with pytest.raises(ServiceError) as refused:
        sampling_params(image_request(tiny_model, temperature=1.0, seed=3))
    assert refused.value.code == 400 and "seed" in refused.value.info.message
    greedy = sampling_params(image_request(tiny_model, temperature=0.0, seed=3))
    assert greedy["temperature"] == 0.0


async def test_bootstrap_address_and_room_are_sglangs(tiny_model: Path) -> None:
    """Decode is told SGLang's bootstrap server and room, reachable there, plus the room of
    outcomes; a prefill that fails before SGLang saw its request reaches decode at once."""
    from sglang.srt.disaggregation.nixl.conn import NixlKVBootstrapServer

    prefill = SglangPrefillEngine(config(tiny_model))
    prefill.language.server_args = server_args(config(tiny_model), "prefill")
    await RoomPrefillEngine.start(prefill)  # triptych's room; the sglang.Engine cannot start
    decode = SglangDecodeEngine(config(tiny_model))
    try:
        port = prefill.language.server_args.disaggregation_bootstrap_port
        sglang_server = NixlKVBootstrapServer("127.0.0.1", port)  # as SGLang's prefill starts it
        room = prefill.open_room()
        info = prefill.bootstrap_info(room)
        assert (info.bootstrap_host, info.bootstrap_port, info.bootstrap_room) == (
            "127.0.0.1",
            port,
            room,
        )
        assert info.outcome_port == prefill.server.port != port
        kwargs = generate_kwargs("r", image_request(tiny_model), None, info)
        assert (kwargs["bootstrap_host"], kwargs["bootstrap_port"], kwargs["bootstrap_room"]) == (
            "127.0.0.1",
            port,
            room,
        )
        async with httpx.AsyncClient() as client:
            for _ in range(100):
                try:
                    reply = await client.get(f"http://127.0.0.1:{port}/health")
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.05)
        assert reply.status_code == 200
        del sglang_server

        failures: list[ServiceError] = []
        watcher = asyncio.create_task(decode._watch("r", info, failures))
        await asyncio.sleep(0.05)
        prefill.abandon_room(room, "image embeddings unavailable: gone")
        for _ in range(1000):
            if failures:
                break
            await asyncio.sleep(0.01)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        assert failures and "image embeddings unavailable" in str(failures[0])
    finally:
        await decode.close()
        await RoomPrefillEngine.close(prefill)


def test_decode_refuses_a_room_without_sglangs_bootstrap(tiny_model: Path) -> None:
    decode = SglangDecodeEngine(config(tiny_model))
    request = image_request(tiny_model).model_copy(
        update={"embeddings": TensorHandle(agent="a", shape=(12, 64), dtype="float32")}
    )
    from triptych.protocol import BootstrapInfo

    hf_room = BootstrapInfo(bootstrap_host="127.0.0.1", bootstrap_port=1, bootstrap_room=1)

    async def first() -> None:
        async for _ in decode.generate("r", request, hf_room):
            pass

    with pytest.raises(ServiceError, match="not on the sglang engine"):
        asyncio.run(first())


def test_logprobs_are_asked_of_sglang_and_read_back(tiny_model: Path) -> None:
    import inspect

    import sglang

    from triptych.engines.sglang.language import token_logprobs

    accepted = inspect.signature(sglang.Engine.async_generate).parameters
    kwargs = generate_kwargs("r", image_request(tiny_model, logprobs=2), None, None)
    assert kwargs["return_logprob"] is True and kwargs["top_logprobs_num"] == 2
    assert {"return_logprob", "top_logprobs_num", "logprob_start_len"} <= set(accepted)
    assert "return_logprob" not in generate_kwargs("r", image_request(tiny_model), None, None)
    # SGLang's meta_info: (logprob, token id, text) per token, the list so far
    meta = {
        "output_token_logprobs": [(-0.5, 11, None), (-1.25, 12, None), (float("-inf"), 13, None)],
        "output_top_logprobs": [
            [(-0.5, 11, None), (-2.0, 4, None)],
            [(-1.25, 12, None), (-1.5, 5, None)],
            [(-0.1, 6, None), (float("-inf"), 13, None)],
        ],
    }
    last_two = token_logprobs(meta, 2)
    assert [entry.logprob for entry in last_two] == [-1.25, -9999.0]
    assert last_two[0].top == [(12, -1.25), (5, -1.5)]
    assert token_logprobs(meta, 0) == []
