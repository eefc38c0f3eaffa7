"""What clients send, through the official openai SDK, against real processes on the mock
engine: several choices, logprobs, text completions, model lookup, the API key, values that
change nothing, template options, plain-worded errors with ``param``, the access log."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.stack import Stack, serving
from triptych.runtime.nats_server import NatsServer

MODEL = "tiny-qwen2.5-vl"
HELLO = [{"role": "user", "content": "Hello there"}]


def client(stack: Stack, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=api_key, max_retries=0)


def frontend_log(stack: Stack) -> str:
    return next(p for p in stack.processes if p.name == "frontend").output()


@pytest.fixture(scope="module")
def guarded(
    nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[Stack]:
    """EPD on the mock engine behind an API key, with a chat template of its own."""
    tmp = tmp_path_factory.mktemp("guarded")
    template = tmp / "shout.jinja"
    template.write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if shout %}LOUD {% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    shout = ("--api-key", "s3cret", "--chat-template", str(template))
    with serving(nats_server.url, tmp, "EPD", frontend_args=shout) as stack:
        yield stack


def test_n_choices_each_with_its_own_seed(epd_stack: Stack) -> None:
    reply = client(epd_stack).chat.completions.create(
        model=MODEL, messages=HELLO, n=2, max_tokens=6, seed=11
    )
    assert [c.index for c in reply.choices] == [0, 1]
    first, second = (c.message.content for c in reply.choices)
    assert first and second and first != second
    assert reply.usage is not None and reply.usage.completion_tokens == 12
    # choice 1 of seed 11 is what seed 12 alone gives
    alone = client(epd_stack).chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=6, seed=12
    )
    assert alone.choices[0].message.content == second
    assert alone.usage is not None and reply.usage.prompt_tokens == alone.usage.prompt_tokens


def test_n_choices_stream_interleaved_and_whole(epd_stack: Stack) -> None:
    whole = client(epd_stack).chat.completions.create(
        model=MODEL, messages=HELLO, n=3, max_tokens=5, seed=4
    )
    stream = client(epd_stack).chat.completions.create(
        model=MODEL,
        messages=HELLO,
        n=3,
        max_tokens=5,
        seed=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts = ["", "", ""]
    finishes: list[Any] = [None, None, None]
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == ["length"] * 3
    assert usage is not None and usage.completion_tokens == 15


def test_logprobs_whole_and_streamed(epd_stack: Stack) -> None:
    whole = client(epd_stack).chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=4, seed=5, logprobs=True, top_logprobs=3
    )
    content = whole.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    for token in content:
        assert token.logprob < 0 and len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token  # the mock draws uniformly
        assert bytes(token.bytes or []).decode() == token.token
    streamed = []
    for chunk in client(epd_stack).chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=4,
        seed=5,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    ):
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            streamed.extend(chunk.choices[0].logprobs.content)
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in content]


def test_no_logprobs_unless_asked(epd_stack: Stack) -> None:
    reply = client(epd_stack).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert reply.choices[0].logprobs is None


def test_text_completions(epd_stack: Stack) -> None:
    c = client(epd_stack)
    text = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, seed=1)
    assert text.object == "text_completion" and text.choices[0].finish_reason == "length"
    assert text.usage is not None and text.usage.completion_tokens == 5
    tokenizer = AutoTokenizer.from_pretrained(epd_stack_model(epd_stack))
    ids = tokenizer("Once upon a time")["input_ids"]
    by_ids = c.completions.create(model=MODEL, prompt=ids, max_tokens=5, seed=1)
    assert by_ids.choices[0].text == text.choices[0].text
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == len(ids)
    several = c.completions.create(
        model=MODEL, prompt=["a b c", "d e f"], n=2, max_tokens=3, seed=2, logprobs=2
    )
    assert [choice.index for choice in several.choices] == [0, 1, 2, 3]
    assert several.usage is not None and several.usage.completion_tokens == 12
    logprobs = several.choices[0].logprobs
    assert logprobs is not None and len(logprobs.tokens or []) == 3
    assert all(len(top) == 2 for top in logprobs.top_logprobs or [])
    assert (logprobs.text_offset or [])[0] == 0
    streamed = "".join(
        chunk.choices[0].text
        for chunk in c.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=5, seed=1, stream=True
        )
        if chunk.choices
    )
    assert streamed == text.choices[0].text


def epd_stack_model(stack: Stack) -> Path:
    from triptych.models.tiny import default_model_path

    return default_model_path()


def test_completions_refuse_what_they_cannot_do(epd_stack: Stack) -> None:
    c = client(epd_stack)
    with pytest.raises(openai.BadRequestError) as refused:
        c.completions.create(model=MODEL, prompt="x", echo=True)
    assert refused.value.param == "echo"
    with pytest.raises(openai.BadRequestError) as refused:
        c.completions.create(model=MODEL, prompt=[10**7])
    assert refused.value.param == "prompt"


def test_models_retrieve(epd_stack: Stack) -> None:
    model = client(epd_stack).models.retrieve(MODEL)
    assert model.id == MODEL
    extra = model.model_extra or {}
    assert extra["sampling_defaults"]["temperature"] == 1.0
    assert extra["max_model_len"] == 4096
    with pytest.raises(openai.NotFoundError) as missing:
        client(epd_stack).models.retrieve("no-such-model")
    assert missing.value.param == "model"


HARMLESS: list[dict[str, Any]] = [
    {"response_format": {"type": "text"}},
    {"tool_choice": "none"},
    {"tool_choice": "auto"},
    {"tools": []},
    {"functions": [], "function_call": "none"},
    {"parallel_tool_calls": True},
    {"top_logprobs": 0},
    {"logprobs": False, "top_logprobs": 0},
    {"logprobs": None},
    {"temperature": None},
    {"top_p": None, "presence_penalty": None, "frequency_penalty": None},
    {"n": None},
    {"n": 1},
    {"stop": None},
    {"stop": []},
    {"seed": None},
    {"stream": None},
    {"stream": False, "stream_options": None},
    {"max_tokens": None, "max_completion_tokens": 3},
    {"logit_bias": {}},
    {"logit_bias": None},
    {"user": "someone"},
    {"metadata": {"purpose": "test"}},
    {"store": False},
    {"service_tier": "auto"},
    {"modalities": ["text"]},
    {"audio": None, "prediction": None},
    {"reasoning_effort": "low"},
    {"some_future_field": {"x": 1}},
]


@pytest.mark.parametrize("fields", HARMLESS, ids=",".join)
def test_harmless_values_are_accepted(epd_stack: Stack, fields: dict[str, Any]) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3, **fields}
    reply = httpx.post(f"{epd_stack.url}/v1/chat/completions", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"]


def test_unknown_fields_are_logged_once_per_name(epd_stack: Stack) -> None:
    for _ in range(3):
        client(epd_stack).chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=2, extra_body={"frobnicate_level": 3}
        )
    assert frontend_log(epd_stack).count("'frobnicate_level'") == 1


def test_developer_role_is_system(epd_stack: Stack) -> None:
    def prompt_tokens(role: str) -> int:
        reply = client(epd_stack).chat.completions.create(
            model=MODEL,
            messages=[{"role": role, "content": "Be brief."}, *HELLO],  # type: ignore[misc]
            max_tokens=2,
            seed=3,
        )
        assert reply.usage is not None
        return reply.usage.prompt_tokens

    assert prompt_tokens("developer") == prompt_tokens("system")


def test_generation_prompt_and_continuing_the_final_message(epd_stack: Stack) -> None:
    tokenizer = AutoTokenizer.from_pretrained(epd_stack_model(epd_stack))
    chat = [*HELLO, {"role": "assistant", "content": "Well, hello"}]

    def served(**fields: Any) -> int:
        body = {"model": MODEL, "messages": chat, "max_tokens": 2, **fields}
        reply = httpx.post(f"{epd_stack.url}/v1/chat/completions", json=body, timeout=30)
        assert reply.status_code == 200, reply.text
        return int(reply.json()["usage"]["prompt_tokens"])

    def expected(**options: Any) -> int:
        text = tokenizer.apply_chat_template(chat, tokenize=False, **options)
        return len(tokenizer.encode(text, add_special_tokens=False))

    assert served() == expected(add_generation_prompt=True)
    assert served(add_generation_prompt=False) == expected(add_generation_prompt=False)
    assert served(add_generation_prompt=False, continue_final_message=True) == expected(
        add_generation_prompt=False, continue_final_message=True
    )
    both = {"add_generation_prompt": True, "continue_final_message": True}
    reply = httpx.post(
        f"{epd_stack.url}/v1/chat/completions",
        json={"model": MODEL, "messages": chat, **both},
        timeout=30,
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "continue_final_message"


ERRORS = [
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "must be a string"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "must be one of"),
    (
        {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]},
        "messages[0].content[0]",
        "unknown type 'audio'",
    ),
    ({"temperature": 3}, "temperature", "'temperature' must be at most 2"),
    ({"max_tokens": "many"}, "max_tokens", "'max_tokens' must be an integer (got 'many')"),
    ({"n": 99}, "n", "'n' must be at most 16"),
    ({"top_logprobs": 5}, "top_logprobs", "needs 'logprobs': true"),
    ({"tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "is required"),
    ({"response_format": {"type": "grammar"}}, "response_format", "unknown type 'grammar'"),
    ({"model": "other"}, "model", "model 'other' does not exist"),
    ({"max_tokens": 10**6}, "max_tokens", "over the context length"),
]


@pytest.mark.parametrize(("fields", "param", "says"), ERRORS, ids=[e[1] for e in ERRORS])
def test_errors_name_the_field_in_plain_words(
    epd_stack: Stack, fields: dict[str, Any], param: str, says: str
) -> None:
    body = {"model": MODEL, "messages": HELLO, **fields}
    reply = httpx.post(f"{epd_stack.url}/v1/chat/completions", json=body, timeout=30)
    assert reply.status_code in (400, 404)
    error = reply.json()["error"]
    assert error["param"] == param
    assert says in error["message"]
    for jargon in ("Value error", "body:", ".str", "tagged-union", "list["):
        assert jargon not in error["message"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v1/nothing", 404), ("DELETE", "/v1/models", 405), ("GET", "/v1/completions", 405)],
)
def test_every_status_has_a_json_body(
    epd_stack: Stack, method: str, path: str, status: int
) -> None:
    reply = httpx.request(method, f"{epd_stack.url}{path}", timeout=10)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert error["code"] == status and path in error["message"]


def test_access_log_has_one_line_per_request(epd_stack: Stack) -> None:
    reply = httpx.post(
        f"{epd_stack.url}/v1/chat/completions",
        json={"model": MODEL, "messages": HELLO, "max_tokens": 3},
        headers={"X-Request-Id": "access-log-probe"},
        timeout=30,
    )
    assert reply.status_code == 200
    lines = [line for line in frontend_log(epd_stack).splitlines() if "access-log-probe" in line]
    access = [line for line in lines if "triptych.access" in line]
    assert len(access) == 1, lines
    usage = reply.json()["usage"]
    assert "POST /v1/chat/completions 200 id=access-log-probe" in access[0]
    assert f"prompt_tokens={usage['prompt_tokens']} completion_tokens=3 ttft_ms=" in access[0]
    assert "total_ms=" in access[0]


def test_api_key_guards_all_but_the_probes(guarded: Stack) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(guarded).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        client(guarded, "wrong").models.list()
    reply = client(guarded, "s3cret").chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=2
    )
    assert reply.choices[0].finish_reason == "length"
    assert [m.id for m in client(guarded, "s3cret").models.list()] == [MODEL]
    for probe in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{guarded.url}{probe}", timeout=10).status_code == 200
    refused = httpx.get(f"{guarded.url}/v1/models", timeout=10)
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"


def test_chat_template_flag_and_kwargs(guarded: Stack) -> None:
    c = client(guarded, "s3cret")

    def prompt_tokens(**extra: Any) -> int:
        reply = c.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=2, extra_body=extra or None
        )
        assert reply.usage is not None
        return reply.usage.prompt_tokens

    quiet = prompt_tokens()
    loud = prompt_tokens(chat_template_kwargs={"shout": True})
    assert loud > quiet  # the template's own variable reached it
    tokenizer = AutoTokenizer.from_pretrained(epd_stack_model(guarded))
    own = "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    assert quiet == len(tokenizer.encode(own, add_special_tokens=False))
