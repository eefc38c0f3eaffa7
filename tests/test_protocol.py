"""Wire types: sampling options travel whole; bad values are refused with clear messages."""

import math

import pytest
from pydantic import ValidationError

from triptych.protocol import (
    ChatCompletionRequest,
    GenerateRequest,
    ImageItem,
    SamplingDefaults,
    SamplingOptions,
)

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
    chat = request(**EVERY_OPTION, logprobs=True, top_logprobs=3, response_format=response_format)
    sampling_options = chat.sampling(77, logprobs=chat.top_logprobs_count)
    generate = GenerateRequest(model="m", token_ids=[1, 2], sampling=sampling_options)
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
    assert sampling["logprobs"] == 3
    # nothing the engines see was left unset
    assert set(sampling) == {*EVERY_OPTION, "logprobs"}


def test_silent_fields_take_the_models_defaults_then_openais() -> None:
    defaults = SamplingDefaults(temperature=0.7, top_k=20, repetition_penalty=1.05)
    silent = request(temperature=None).sampling(5, defaults)
    assert (silent.temperature, silent.top_k, silent.repetition_penalty) == (0.7, 20, 1.05)
    assert (silent.top_p, silent.min_p) == (1.0, 0.0)  # OpenAI's, where the model is silent
    assert request(temperature=0.2, top_k=-1).sampling(5, defaults).temperature == 0.2
    assert request(top_k=-1).sampling(5, defaults).top_k == 0  # -1: no top-k, said outright


def test_each_choice_gets_a_seed_of_its_own() -> None:
    chat = request(seed=41, n=3)
    assert [chat.sampling(5, choice=i).seed for i in range(3)] == [41, 42, 43]
    assert request(n=2).sampling(5, choice=1).seed is None


def test_max_completion_tokens_wins() -> None:
    assert request(max_tokens=5, max_completion_tokens=9).requested_max_tokens == 9


@pytest.mark.parametrize(
    ("fields", "mentions"),
    [
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "grammar"}}, "response_format"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"add_generation_prompt": True, "continue_final_message": True}, "continue_final"),
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
