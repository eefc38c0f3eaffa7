"""Random JSON thrown at the chat endpoint only ever gets 2xx or 4xx, and the server lives."""

import json
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.stack import Stack

SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
CONTENT = st.one_of(
    st.text(max_size=40),
    st.lists(
        st.one_of(
            st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
            st.fixed_dictionaries(
                {
                    "type": st.just("image_url"),
                    "image_url": st.fixed_dictionaries(
                        {
                            "url": st.sampled_from(
                                [
                                    "data:image/png;base64,AAAA",
                                    "ftp://x/y.png",
                                    "http://10.0.0.1/a.png",
                                    "file:///etc/hosts",
                                    "",
                                ]
                            )
                        }
                    ),
                }
            ),
            JSON,
        ),
        max_size=3,
    ),
    JSON,
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "tool", "", "wizard"]),
        "content": CONTENT,
    }
)
NEAR_VALID = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["tiny-qwen2.5-vl", "other", ""]),
        "messages": st.lists(MESSAGE, max_size=3),
    },
    optional={
        "max_tokens": JSON | st.integers(-5, 5),
        "temperature": JSON | st.floats(),
        "top_p": st.floats(),
        "top_k": st.integers(-3, 3),
        "n": st.integers(0, 3),
        "stop": JSON,
        "seed": st.integers(),
        "stream": st.booleans(),
        "stop_token_ids": JSON,
        "min_tokens": st.integers(-2, 4),
    },
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(payload=st.one_of(JSON, NEAR_VALID, st.binary(max_size=64)))
def test_random_bodies_get_2xx_or_4xx(epd_stack: Stack, payload: Any) -> None:
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    reply = httpx.post(
        f"{epd_stack.url}/v1/chat/completions",
        content=content,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert 200 <= reply.status_code < 500, (reply.status_code, reply.text[:300])
    if reply.status_code >= 400:
        assert "error" in reply.json()


def test_still_serving_after_the_fuzz(epd_stack: Stack) -> None:
    body = {
        "model": "tiny-qwen2.5-vl",
        "max_tokens": 3,
        "messages": [{"role": "user", "content": "hello"}],
    }
    assert (
        httpx.post(f"{epd_stack.url}/v1/chat/completions", json=body, timeout=30).status_code == 200
    )
