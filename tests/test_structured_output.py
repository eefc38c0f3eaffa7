"""Structured outputs: ``response_format`` ``json_object`` and ``json_schema`` are enforced while
decoding by the hf engine (llguidance masks in the batched sampler). The tiny random checkpoint
never writes JSON on its own; under a schema its answers parse and validate, streamed and whole,
eight at once mixed with free requests, in E/P/D and EPD, while the free ones stay token-exact
against transformers. A schema that cannot be enforced is a 400 at the frontend."""

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import torch
from pydantic import ValidationError

from tests.stack import ServeHf, Stack
from tests.test_correctness import TEXT_CASES, Oracle, request, tokens_of
from triptych.engines import grammar
from triptych.engines.hf.sampler import Row, Sampler, apply_bitmask
from triptych.protocol import ChatCompletionRequest, SamplingOptions, ServiceError

RECEIPT = {
    "type": "object",
    "properties": {
        "merchant": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["receipt", "invoice", "form"]},
        "total": {"type": "number", "minimum": 0, "maximum": 1000},
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 6},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["name", "quantity"],
                "additionalProperties": False,
            },
        },
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "paid": {"type": "boolean"},
    },
    "required": ["merchant", "kind", "total", "items", "address", "paid"],
    "additionalProperties": False,
}
SCORES = {
    "type": "object",
    "properties": {
        "scores": {
            "type": "array",
            "items": {"type": "integer", "minimum": -5, "maximum": 5},
            "minItems": 2,
            "maxItems": 4,
        },
        "label": {"type": "string", "enum": ["cat", "dog"]},
    },
    "required": ["scores", "label"],
    "additionalProperties": False,
}
MAX_TOKENS = 160
MODEL = "tiny-qwen2.5-vl"
JSON_OBJECT = {"type": "json_object"}
PROMPT = [{"role": "user", "content": "Read the receipt and answer in JSON."}]


def schema_format(schema: dict[str, Any], name: str = "answer") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


# the protocol


def test_response_formats_parse_and_travel_as_canonical_schema_text() -> None:
    def sampling(fmt: dict[str, Any]) -> SamplingOptions:
        chat = ChatCompletionRequest.model_validate(
            {"model": "m", "messages": PROMPT, "response_format": fmt}
        )
        return chat.sampling(16)

    assert sampling({"type": "text"}).response_format is None
    assert sampling({"type": "json_object"}).response_format is not None
    fmt = sampling(schema_format({"type": "object", "required": ["b", "a"]})).response_format
    assert fmt is not None and fmt.type == "json_schema" and fmt.strict
    assert fmt.schema_text == '{"required":["b","a"],"type":"object"}'
    for bad in (
        {"type": "json_schema"},
        {"type": "xml"},
        {"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}},
    ):
        with pytest.raises(ValidationError):
            sampling(bad)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "foo"},
        {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}},
        {"type": "string", "pattern": "(("},
        {"type": "object", "properties": {"a": {"type": "string", "minLength": "x"}}},
    ],
)
def test_a_schema_that_cannot_be_enforced_is_a_400(schema: dict[str, Any]) -> None:
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": PROMPT, "response_format": schema_format(schema)}
    )
    fmt = chat.sampling(16).response_format
    assert fmt is not None
    with pytest.raises(ServiceError) as raised:
        grammar.check(fmt)
    assert raised.value.code == 400 and raised.value.info.param == "response_format"


# the sampler


def test_masked_rows_take_only_allowed_tokens_and_free_rows_are_untouched() -> None:
    vocab = 70
    sampler = Sampler(vocab, 4, torch.device("cpu"))
    scores = torch.randn(4, vocab, generator=torch.Generator().manual_seed(3))
    allowed = torch.full((4, 3), -1, dtype=torch.int32)
    allowed[1] = 0
    allowed[1, 2] = 1 << 3  # token 67 only
    allowed[2] = 0
    allowed[2, 0] = (1 << 5) | (1 << 9)  # tokens 5 and 9
    rows = [
        Row(i, SamplingOptions(max_tokens=4, temperature=t, seed=1), 1, 0, frozenset())
        for i, t in enumerate([0.0, 0.0, 1.0, 1.0])
    ]
    free = sampler.sample(scores.clone(), rows)
    masked = sampler.sample(scores.clone(), rows, allowed)
    assert masked[1] == 67 and int(masked[2]) in (5, 9)
    assert masked[0] == free[0] and masked[3] == free[3]
    cut = apply_bitmask(scores, allowed)
    assert torch.isinf(cut[1]).sum() == vocab - 1 and not torch.isinf(cut[0]).any()


# served


@pytest.fixture(scope="module", params=["E/P/D", "EPD"])
def served(request: pytest.FixtureRequest, serve_hf: ServeHf) -> Iterator[Stack]:
    with serve_hf(request.param, ready_timeout=400) as stack:
        yield stack


@pytest.fixture(scope="module")
def oracle(tiny_model: Path) -> Oracle:
    return Oracle(tiny_model)


async def answer(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[str, str]:
    """The text and finish reason of a chat completion, streamed or whole."""
    body = {"model": MODEL, **body}
    if not body.get("stream"):
        reply = await client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]
    text, finish = "", ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        assert reply.status_code == 200
        async for line in reply.aiter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"].get("content") or ""
                finish = choice["finish_reason"] or finish
    return text, finish


def constrained(fmt: dict[str, Any], stream: bool, **fields: Any) -> dict[str, Any]:
    return {
        "messages": PROMPT,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": stream,
        "response_format": fmt,
        **fields,
    }


def test_free_output_of_the_tiny_model_is_not_json(served: Stack) -> None:
    async def run() -> str:
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as client:
            text, _ = await answer(client, {"messages": PROMPT, "max_tokens": 40, "temperature": 0})
            return text

    with pytest.raises(ValueError):
        json.loads(asyncio.run(run()))


def test_json_answers_validate_mixed_with_free_requests_that_stay_token_exact(
    served: Stack, oracle: Oracle, tiny_model: Path
) -> None:
    cases: list[tuple[dict[str, Any], dict[str, Any]]] = [
        # any object: greedy, this model writes one endless key; these seeds close theirs
        (constrained(JSON_OBJECT, False, temperature=1.0, seed=18), {"type": "object"}),
        (constrained(JSON_OBJECT, True, temperature=1.0, seed=15), {"type": "object"}),
        (constrained(schema_format(RECEIPT), False), RECEIPT),
        (constrained(schema_format(RECEIPT), True), RECEIPT),
        (constrained(schema_format(SCORES, "scores"), True), SCORES),
    ]
    free = [request(messages) for messages in TEXT_CASES] + [request(TEXT_CASES[0], stream=True)]

    async def run() -> tuple[list[tuple[str, str]], list[list[int]]]:
        async with httpx.AsyncClient(base_url=served.url, timeout=300) as client:
            jsons = asyncio.gather(*(answer(client, body) for body, _ in cases))
            frees = asyncio.gather(*(tokens_of(client, MODEL, body) for body in free))
            return await asyncio.gather(jsons, frees)  # type: ignore[return-value]

    answers, free_tokens = asyncio.run(run())
    assert len(cases) + len(free) == 8
    for (text, finish), (_, schema) in zip(answers, cases, strict=True):
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), schema)
    expected = [oracle.tokens(messages) for messages in [*TEXT_CASES, TEXT_CASES[0]]]
    assert free_tokens == expected


def test_max_tokens_cutting_the_json_short_finishes_with_length(served: Stack) -> None:
    async def run() -> tuple[str, str]:
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as client:
            return await answer(client, constrained(schema_format(RECEIPT), False, max_tokens=4))

    text, finish = asyncio.run(run())
    assert finish == "length"
    assert text.startswith("{")
    with pytest.raises(ValueError):
        json.loads(text)


def test_bad_schema_is_a_400_naming_response_format(served: Stack) -> None:
    body = constrained(
        schema_format({"type": "object", "properties": {"a": {"type": "nope"}}}), False
    )
    reply = httpx.post(f"{served.url}/v1/chat/completions", json={"model": MODEL, **body})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == "response_format" and "nope" in error["message"]
    reply = httpx.post(
        f"{served.url}/v1/chat/completions",
        json={"model": MODEL, **constrained({"type": "yaml"}, False)},
    )
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "response_format"


def test_the_mock_engine_refuses_json_output(epd_stack: Stack) -> None:
    body = constrained({"type": "json_object"}, False)
    reply = httpx.post(f"{epd_stack.url}/v1/chat/completions", json={"model": MODEL, **body})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "response_format"
    assert "mock engine" in reply.json()["error"]["message"]


def test_text_completions_take_the_same_formats(served: Stack) -> None:
    completion = {
        "model": MODEL,
        "prompt": "Read the receipt and answer in JSON.",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "response_format": schema_format(RECEIPT),
    }
    whole = httpx.post(f"{served.url}/v1/completions", json=completion, timeout=300)
    assert whole.status_code == 200, whole.text
    choice = whole.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice["text"]
    jsonschema.validate(json.loads(choice["text"]), RECEIPT)

    text = ""
    with httpx.stream(
        "POST", f"{served.url}/v1/completions", json={**completion, "stream": True}, timeout=300
    ) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                text += "".join(c["text"] for c in json.loads(line[6:])["choices"])
    assert text == choice["text"]

    bad = schema_format({"type": "object", "properties": {"a": {"type": "nope"}}})
    reply = httpx.post(
        f"{served.url}/v1/completions", json={**completion, "response_format": bad}, timeout=30
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "response_format"
