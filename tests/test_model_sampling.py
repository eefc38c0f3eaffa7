"""The hf engine's logprobs are the model's own, several choices sample on their own, and a
request that leaves sampling fields out gets the checkpoint's generation_config.json values."""

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer

from tests.stack import ServeHf, Stack

PENALTY = 1.8
"""The repetition penalty this test's checkpoint recommends in its generation config."""
MESSAGES = [{"role": "user", "content": "Tell me about the sea and the sea and the sea."}]


@pytest.fixture(scope="module")
def recommending(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """The tiny checkpoint, its generation config recommending a repetition penalty."""
    copy = tmp_path_factory.mktemp("ckpt") / "tiny-recommending"
    shutil.copytree(tiny_model, copy)
    config = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(
        json.dumps({**config, "repetition_penalty": PENALTY})
    )
    return copy


@pytest.fixture(scope="module")
def served(serve_hf: ServeHf, recommending: Path) -> Iterator[Stack]:
    with serve_hf("E/P/D", recommending) as stack:
        yield stack


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)


def ids_of(reply: Any, index: int = 0) -> list[int]:
    return list(reply.choices[index].model_extra["token_ids"])


def test_models_says_where_defaults_come_from(served: Stack) -> None:
    card = client(served).models.retrieve("tiny-recommending")
    defaults = (card.model_extra or {})["sampling_defaults"]
    assert defaults["repetition_penalty"] == PENALTY
    assert defaults["temperature"] == 1.0  # the checkpoint is silent: OpenAI's


def test_silent_requests_get_the_checkpoints_sampling(served: Stack) -> None:
    def tokens(**fields: Any) -> list[int]:
        reply = client(served).chat.completions.create(
            model="tiny-recommending",
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=16,
            temperature=0,
            extra_body={"return_token_ids": True, **fields},
        )
        return ids_of(reply)

    silent = tokens()
    assert silent == tokens(repetition_penalty=PENALTY)
    assert silent != tokens(repetition_penalty=1.0)


def test_greedy_logprobs_are_the_models_own(served: Stack, recommending: Path) -> None:
    reply = client(served).chat.completions.create(
        model="tiny-recommending",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
        extra_body={"return_token_ids": True, "repetition_penalty": 1.0},
    )
    generated = ids_of(reply)
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == len(generated)
    tokenizer = AutoTokenizer.from_pretrained(recommending)
    model = AutoModelForImageTextToText.from_pretrained(recommending).eval()
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=6,
            do_sample=False,
            repetition_penalty=1.0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert out.sequences[0, len(prompt) :].tolist() == generated
    for step, (token, entry) in enumerate(zip(generated, content, strict=True)):
        expected = torch.log_softmax(out.logits[step][0].float(), -1)
        assert math.isclose(entry.logprob, float(expected[token]), abs_tol=1e-4)
        best = torch.topk(expected, 5)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            best.values.tolist(), abs=1e-4
        )
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)
        assert entry.top_logprobs[0].token == tokenizer.decode([token])


def test_sampled_logprobs_follow_the_temperature(served: Stack) -> None:
    """At temperature 0.5 the distribution is sharper than the model's: the reported top
    alternatives sum to more probability than at temperature 1 for the same first token."""

    def first_top(temperature: float) -> list[float]:
        reply = client(served).chat.completions.create(
            model="tiny-recommending",
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=1,
            temperature=temperature,
            seed=1,
            logprobs=True,
            top_logprobs=20,
        )
        content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
        assert content is not None
        return [t.logprob for t in content[0].top_logprobs]

    cold, warm = first_top(0.5), first_top(1.0)
    assert sum(math.exp(x) for x in cold) > sum(math.exp(x) for x in warm)
    assert cold == sorted(cold, reverse=True)


def test_choices_sample_on_their_own(served: Stack) -> None:
    reply = client(served).chat.completions.create(
        model="tiny-recommending",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=12,
        n=2,
        temperature=1.0,
        extra_body={"return_token_ids": True},
    )
    assert len(reply.choices) == 2
    assert ids_of(reply, 0) != ids_of(reply, 1)
