"""Wire types: sampling options travel whole; bad values are refused with clear messages."""

import math

import pytest
from pydantic import ValidationError

from triptych.protocol import ChatCompletionRequest, GenerateRequest, ImageItem, SamplingOptions

EVERY_OPTION = {
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 40,
    "min_p": 0.05,
    "seed": 1234,
    "max_tokens": 77,
    "stop": ["END", "\n\n"],
    "stop_token_ids": [5, 9],
    "min_tokens": 3,
    "ignore_eos": True,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.25,
    "repetition_penalty": 1.1,
}


def request(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def test_every_sampling_option_survives_the_whole_trip() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "a", "schema": schema, "strict": True},
    }
    chat = request(**EVERY_OPTION, response_format=response_format)
    generate = GenerateRequest(model="m", token_ids=[1, 2], sampling=chat.sampling(77))
    received = GenerateRequest.model_validate_json(generate.model_dump_json())
    sampling = received.sampling.model_dump()
    for name, value in EVERY_OPTION.items():
        expected = tuple(value) if isinstance(value, list) else value
        assert sampling[name] == expected, name
    assert sampling.pop("response_format") == {
        "type": "json_schema",
        "schema_text": '{"properties":{"a":{"type":"integer"}},"type":"object"}',
        "name": "a",
        "strict": True,
    }
    assert set(sampling) == set(EVERY_OPTION)  # nothing the engines see was left unset


def test_max_completion_tokens_wins() -> None:
    assert request(max_tokens=5, max_completion_tokens=9).requested_max_tokens == 9


@pytest.mark.parametrize(
    ("fields", "mentions"),
    [
        ({"n": 3}, "n=1"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": [""]}, "stop"),
        ({"seed": -1}, "seed"),
    ],
)
def test_unsupported_or_out_of_range_options_are_refused(
    fields: dict[str, object], mentions: str
) -> None:
    with pytest.raises(ValidationError, match=mentions):
        request(**fields)


def test_images_only_in_user_messages() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    with pytest.raises(ValidationError, match="only accepted in user messages"):
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "system", "content": [image]}]}
        )


def test_image_bytes_travel_as_base64() -> None:
    item = ImageItem(
        width=2, height=2, grid_thw=(1, 2, 2), num_tokens=1, offset=0, data=b"\x00\xff"
    )
    generate = GenerateRequest(
        model="m", token_ids=[1], images=[item], sampling=SamplingOptions(max_tokens=1)
    )
    assert "AP8=" in generate.model_dump_json()
    assert GenerateRequest.model_validate_json(generate.model_dump_json()) == generate
