"""The hf engine's output is the model's own: token for token what transformers' greedy
``generate()`` returns for the same messages and images, in every topology, one request at a
time or eight mixed requests at once; seeded sampling repeats exactly."""

import asyncio
import base64
import io
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
)

from tests.stack import ServeHf, Stack

MAX_TOKENS = 12


def picture(width: int, height: int, seed: int) -> bytes:
    """A noisy PNG (flat images would hide preprocessing mistakes)."""
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height))
    image.putdata(
        [
            (rng.randrange(256), rng.randrange(256), rng.randrange(256))
            for _ in range(width * height)
        ]
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_part(data: bytes) -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    return {"type": "image_url", "image_url": {"url": url}}


ONE = picture(84, 56, 1)
THREE = [picture(56, 56, 2), picture(168, 84, 3), picture(70, 126, 4)]  # square, wide, tall

TEXT_CASES = [
    [{"role": "user", "content": "Tell me about the sea."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why is grass green?"},
    ],
]
IMAGE_CASES = [
    [{"role": "user", "content": [image_part(ONE), {"type": "text", "text": "What is this?"}]}],
    [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare"},
                image_part(THREE[0]),
                image_part(THREE[1]),
                {"type": "text", "text": "and"},
                image_part(THREE[2]),
            ],
        }
    ],
    [
        {"role": "user", "content": [image_part(THREE[1])]},
        {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, image_part(ONE)]},
    ],
]


class Media:
    """The pictures and videos of a chat, collected while its parts become the chat template's
    placeholders."""

    def __init__(self) -> None:
        self.images: list[Image.Image] = []
        self.videos: list[bytes] = []

    def take(self, part: dict[str, Any]) -> dict[str, Any]:
        if part["type"] == "image_url":
            data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
            self.images.append(Image.open(io.BytesIO(data)).convert("RGB"))
            return {"type": "image"}
        if part["type"] == "video_url":
            self.videos.append(base64.b64decode(part["video_url"]["url"].split(",", 1)[1]))
            return {"type": "video"}
        return part


class Oracle:
    """Plain transformers: the chat template, the image processor and greedy generate()."""

    def __init__(self, model_path: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if (model_path / "preprocessor_config.json").exists():
            self.model = AutoModelForImageTextToText.from_pretrained(model_path).eval()
            self.processor = AutoImageProcessor.from_pretrained(model_path)
            self.image_token = self.model.config.image_token_id
        else:
            self.model = AutoModelForCausalLM.from_pretrained(model_path).eval()

    def prompt(self, messages: list[dict[str, Any]]) -> tuple[list[int], Media]:
        """The chat template's token ids (one placeholder a picture or video) and the media of
        `messages`, in order."""
        media = Media()
        rendered = []
        for message in messages:
            content = message["content"]
            if isinstance(content, list):
                content = [media.take(part) for part in content]
            rendered.append({"role": message["role"], "content": content})
        text = self.tokenizer.apply_chat_template(
            rendered, tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer.encode(text, add_special_tokens=False), media

    def tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        ids, media = self.prompt(messages)
        images = media.images
        extra: dict[str, Any] = {}
        if images:
            batch = self.processor(images=images, return_tensors="pt")
            counts = (batch["image_grid_thw"].prod(-1) // 4).tolist()
            expanded: list[int] = []
            for token in ids:
                expanded.extend([token] * counts.pop(0) if token == self.image_token else [token])
            ids = expanded
            extra = {
                "pixel_values": batch["pixel_values"],
                "image_grid_thw": batch["image_grid_thw"],
            }
        input_ids = torch.tensor([ids])
        if images:
            extra["mm_token_type_ids"] = (input_ids == self.image_token).int()
        with torch.no_grad():
            out = self.model.generate(
                input_ids, max_new_tokens=MAX_TOKENS, do_sample=False, **extra
            )
        return [int(t) for t in out[0, len(ids) :]]

    def logprobs(self, messages: list[dict[str, Any]]) -> list[torch.Tensor]:
        """Per generated token, the log-softmax of the logits greedy generate() chose it from
        (text-only messages)."""
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        ids = torch.tensor([self.tokenizer.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            out = self.model.generate(
                ids,
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        return [torch.log_softmax(step[0].float(), -1) for step in out.logits]


def request(messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    body = {
        "model": "unused",
        "messages": messages,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "return_token_ids": True,
    }
    body.update(fields)
    return body


def served_tokens(
    url: str,
    model: str,
    bodies: list[dict[str, Any]],
    *,
    together: bool = False,
    timeout: float = 120,
) -> list[list[int]]:
    """Each body's generated token ids from the frontend at `url`, sent one at a time or all at
    once."""

    async def run() -> list[list[int]]:
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
            calls = [tokens_of(client, model, body) for body in bodies]
            if together:
                return list(await asyncio.gather(*calls))
            return [await call for call in calls]

    return asyncio.run(run())


async def tokens_of(client: httpx.AsyncClient, model: str, body: dict[str, Any]) -> list[int]:
    body = {**body, "model": model}
    if not body.get("stream"):
        reply = await client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        return list(reply.json()["choices"][0]["token_ids"])
    ids: list[int] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        assert reply.status_code == 200
        async for line in reply.aiter_lines():
            if line.startswith("data: {"):
                import json

                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0].get("token_ids"):
                    ids.extend(chunk["choices"][0]["token_ids"])
    return ids


TOPOLOGIES = ["E/P/D", "E/PD", "EPD", "P/D"]


@pytest.fixture(scope="module", params=TOPOLOGIES)
def served(
    request: pytest.FixtureRequest, serve_hf: ServeHf, tiny_model: Path
) -> Iterator[tuple[Stack, Path, list[list[dict[str, Any]]]]]:
    topology = request.param
    if topology == "P/D":  # text-only checkpoint
        from triptych.models.tiny import default_text_model_path

        model, cases = default_text_model_path(), TEXT_CASES
    else:
        model, cases = tiny_model, TEXT_CASES + IMAGE_CASES
    with serve_hf(topology, model) as stack:
        yield stack, model, cases


@pytest.fixture(scope="module")
def oracles() -> dict[Path, Oracle]:
    return {}


def oracle_for(oracles: dict[Path, Oracle], model: Path) -> Oracle:
    if model not in oracles:
        oracles[model] = Oracle(model)
    return oracles[model]


def test_greedy_equals_generate_one_at_a_time(
    served: tuple[Stack, Path, list[list[dict[str, Any]]]], oracles: dict[Path, Oracle]
) -> None:
    stack, model, cases = served
    oracle = oracle_for(oracles, model)
    bodies = [request(case, stream=i % 2 == 0) for i, case in enumerate(cases)]
    got = served_tokens(stack.url, model.name, bodies)
    for case, tokens in zip(cases, got, strict=True):
        assert tokens == oracle.tokens(case)


def test_greedy_equals_generate_eight_in_flight(
    served: tuple[Stack, Path, list[list[dict[str, Any]]]], oracles: dict[Path, Oracle]
) -> None:
    stack, model, cases = served
    oracle = oracle_for(oracles, model)
    mixed = [cases[i % len(cases)] for i in range(8)]
    bodies = [request(case, stream=i % 2 == 1) for i, case in enumerate(mixed)]
    got = served_tokens(stack.url, model.name, bodies, together=True)
    for case, tokens in zip(mixed, got, strict=True):
        assert tokens == oracle.tokens(case)


def test_logprobs_are_the_models_own(
    served: tuple[Stack, Path, list[list[dict[str, Any]]]], oracles: dict[Path, Oracle]
) -> None:
    """Greedy logprobs (temperature counts as 1) equal the log-softmax of the logits transformers
    chose each token from, and the top alternatives are its most likely tokens."""
    stack, model, cases = served
    expected = oracle_for(oracles, model).logprobs(cases[0])
    body = request(cases[0], logprobs=True, top_logprobs=2, ignore_eos=True)
    reply = httpx.post(
        f"{stack.url}/v1/chat/completions", json={**body, "model": model.name}, timeout=120
    )
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == len(choice["token_ids"]) == len(expected)
    for token, entry, want in zip(choice["token_ids"], content, expected, strict=True):
        assert entry["logprob"] == pytest.approx(float(want[token]), abs=1e-3)
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(float(want.max()), abs=1e-3)


def test_seeded_sampling_repeats(
    served: tuple[Stack, Path, list[list[dict[str, Any]]]], oracles: dict[Path, Oracle]
) -> None:
    stack, model, cases = served
    sampled = request(
        cases[-1], temperature=1.0, top_p=0.95, top_k=100, seed=1234, max_tokens=16, ignore_eos=True
    )

    async def run() -> list[list[int]]:
        async with httpx.AsyncClient(base_url=stack.url, timeout=120) as client:
            first = await tokens_of(client, model.name, sampled)
            again = await tokens_of(client, model.name, {**sampled, "stream": True})
            other = await tokens_of(client, model.name, {**sampled, "seed": 99})
            return [first, again, other]

    first, again, other = asyncio.run(run())
    assert len(first) == 16
    assert first == again
    assert first != other
    assert first[:MAX_TOKENS] != oracle_for(oracles, model).tokens(cases[-1])


def test_kv_moves_only_in_disaggregated_topologies(
    served: tuple[Stack, Path, list[list[dict[str, Any]]]],
) -> None:
    stack, model, cases = served

    def kv_reads() -> int:
        return sum(
            "KV cache" in line and "read in" in line
            for process in stack.processes
            for line in process.output().splitlines()
        )

    async def two_requests() -> None:
        async with httpx.AsyncClient(base_url=stack.url, timeout=120) as client:
            for case in cases[:2]:
                await tokens_of(client, model.name, request(case))

    before = kv_reads()
    asyncio.run(two_requests())
    disaggregated = any(process.name == "prefill" for process in stack.processes)
    assert kv_reads() - before == (2 if disaggregated else 0)  # every request, or never
