"""Incremental detokenization and stop strings on the tiny checkpoint's tokenizer."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from triptych.components.frontend.detokenizer import Detokenizer, StopMatcher
from triptych.components.frontend.output import Output
from triptych.protocol import TokenChunk

TEXT = "Hello world, déjà vu! 日本語 ok\nnew line"


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> object:
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "window"])
@pytest.mark.parametrize("step", [1, 2, 5])
def test_incremental_text_equals_whole_decode(tokenizer: object, step: int, stream: bool) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)  # type: ignore[attr-defined]
    detokenizer = Detokenizer(tokenizer)
    if not stream:  # as after `tokenizers`' stream refused a step
        detokenizer._stream = None
    pieces = [detokenizer.add(ids[i : i + step]) for i in range(0, len(ids), step)]
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in piece for piece in pieces)


def test_a_character_cut_by_the_end_of_generation_is_flushed(tokenizer: object) -> None:
    ids = tokenizer.encode("ok 日本", add_special_tokens=False)  # type: ignore[attr-defined]
    whole = tokenizer.decode(ids[:-1])  # type: ignore[attr-defined]
    assert whole.endswith("\ufffd"), "the tiny tokenizer splits 本 into byte tokens"
    detokenizer = Detokenizer(tokenizer)
    shown = "".join(detokenizer.add([token]) for token in ids[:-1])
    assert "\ufffd" not in shown
    assert shown + detokenizer.flush() == whole


def test_stop_string_split_across_deltas_is_never_shown() -> None:
    matcher = StopMatcher(("STOP",))
    shown = [matcher.feed(d, final=False) for d in ["abc S", "TO", "P and more"]]
    assert "".join(shown) == "abc "
    assert matcher.stopped


def test_text_is_released_when_no_stop_matches() -> None:
    matcher = StopMatcher(("xyz",))
    shown = matcher.feed("hello x", final=False) + matcher.feed("y", final=True)
    assert shown == "hello xy"
    assert not matcher.stopped


def test_output_counts_tokens_and_finishes(tokenizer: object) -> None:
    ids = tokenizer.encode("one two three", add_special_tokens=False)  # type: ignore[attr-defined]
    output = Output(tokenizer, ("two",))
    output.add(TokenChunk(token_ids=ids, finish_reason="length"))
    assert output.finish_reason == "stop"
    assert "".join(output.text) == "one "
    assert output.completion_tokens == len(ids)


CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi\nthere"},
        {"role": "assistant", "content": "Yes?"},
        {"role": "user", "content": "Again"},
    ],
    [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "What is it?"},
                {"type": "image"},
            ],
        }
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_compiled_template_matches_transformers(
    tokenizer: object, messages: list[dict[str, object]]
) -> None:
    from triptych.components.frontend.template import ChatTemplate

    expected = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        messages, tokenize=False, add_generation_prompt=True
    )
    rendered = ChatTemplate(tokenizer).render(messages)
    assert rendered == expected
    ids = tokenizer.backend_tokenizer.encode(rendered, add_special_tokens=False).ids  # type: ignore[attr-defined]
    assert ids == tokenizer.encode(expected, add_special_tokens=False)  # type: ignore[attr-defined]
