"""The model's chat template, compiled once and rendered without per-call overhead.

Rendering goes through transformers' own compiled template (its hardened Jinja sandbox), so the
text is exactly what ``tokenizer.apply_chat_template`` produces; only the wrapper work that
transformers repeats on every call is skipped, and Jinja's own merge of the template's globals
(a chain of dicts, walked key by key on every render) is done once. A test holds the two
outputs equal.
``--chat-template`` replaces the checkpoint's template with a file or an inline template.
"""

from pathlib import Path
from typing import Any

from transformers.utils.chat_template_utils import _compile_jinja_template

_RESERVED = {"messages", "add_generation_prompt", "tools", "documents"}
"""Template variables a request's ``chat_template_kwargs`` may not replace."""


def read_template(value: str) -> str:
    """``--chat-template``: a file's contents, or the value itself when it is a template."""
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value}: no such file, and not a Jinja template")


class ChatTemplate:
    """Renders conversations into prompt text with the tokenizer's chat template."""

    def __init__(self, tokenizer: Any, template: str | None = None) -> None:
        template = template or tokenizer.chat_template
        if not isinstance(template, str):
            raise ValueError("the checkpoint has no chat template (give one with --chat-template)")
        self._template = _compile_jinja_template(template)
        self._globals = dict(self._template.globals)
        self._variables = {**self._globals, **tokenizer.special_tokens_map}
        """The template's globals and the tokenizer's special tokens, merged once."""

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        variables: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text: by default ending with the assistant's turn opener; with
        `continue_final_message`, ending inside the last message (no end-of-turn after it).
        `variables` (a request's ``chat_template_kwargs``) reach the template too."""
        context = {
            **self._variables,
            **{k: v for k, v in (variables or {}).items() if k not in _RESERVED},
            "messages": messages,
            "tools": None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt and not continue_final_message,
        }
        template, env = self._template, self._template.environment
        try:  # Template.render, with the context already holding the globals
            ctx = env.context_class(env, context, template.name, template.blocks, self._globals)
            text = "".join(template.root_render_func(ctx))
        except Exception:
            env.handle_exception()
        if continue_final_message:
            text = _cut_after_final(text, messages[-1])
        return text


def _cut_after_final(text: str, final: dict[str, Any]) -> str:
    """`text` up to the end of the final message's content (as transformers does)."""
    content = final.get("content")
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
    content = str(content or "").strip()
    if not content:
        return text
    end = text.rfind(content)
    if end < 0:
        raise ValueError("the chat template does not show the final message's text")
    return text[: end + len(content)]
