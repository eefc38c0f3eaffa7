"""The model's chat template, compiled once and rendered without per-call overhead.

Rendering goes through transformers' own compiled template (its hardened Jinja sandbox), so the
text is exactly what ``tokenizer.apply_chat_template`` produces; only the wrapper work that
transformers repeats on every call is skipped. A test holds the two outputs equal.
"""

from typing import Any

from transformers.utils.chat_template_utils import _compile_jinja_template


class ChatTemplate:
    """Renders conversations into prompt text with the tokenizer's chat template."""

    def __init__(self, tokenizer: Any) -> None:
        template = tokenizer.chat_template
        if not isinstance(template, str):
            raise ValueError("the checkpoint has no chat template")
        self._template = _compile_jinja_template(template)
        self._variables = dict(tokenizer.special_tokens_map)

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text, ending with the assistant's turn opener."""
        text: str = self._template.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=True,
            **self._variables,
        )
        return text
