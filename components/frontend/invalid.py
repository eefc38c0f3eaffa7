"""Plain words for a request body that fails validation, and the field at fault (``param``).

pydantic's own wording names its internals ("body: Value error, ...", "content.str",
"list[tagged-union[TextPart,ImagePart]]"); clients need the field as they wrote it
(``messages[0].content``) and what it must be.
"""

from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "none_required": "null",
}

_BOUNDS = {
    "greater_than": "greater than {gt}",
    "greater_than_equal": "at least {ge}",
    "less_than": "less than {lt}",
    "less_than_equal": "at most {le}",
}


def _is_field(part: str | int) -> bool:
    """Whether a location part names a field (not a union member such as ``str`` or
    ``list[...]``, nor a validator wrapper)."""
    return isinstance(part, int) or not (
        "[" in part or part in {"str", "int", "float", "bool", "list", "dict", "none"}
    )


def param_of(location: tuple[str | int, ...]) -> str | None:
    """``('messages', 0, 'content', 'str')`` → ``messages[0].content``."""
    path = ""
    previous: str | int | None = None
    for part in location:
        if not _is_field(part) or part == previous:  # a discriminator tag repeats its field
            continue
        previous = part
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path or None


def _shown(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool) or value is None


def _phrase(error: ErrorDetails) -> str:
    """What the value must be, or what is wrong with it."""
    kind, context = error["type"], error.get("ctx") or {}
    if kind in _EXPECTED:
        return f"must be {_EXPECTED[kind]}"
    if kind in _BOUNDS:
        return "must be " + _BOUNDS[kind].format(**context)
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a known field here"
    if kind == "literal_error":
        return f"must be one of {context.get('expected', '')}"
    if kind in ("too_short", "string_too_short"):
        return "must not be empty"
    if kind == "too_long":
        return f"must have at most {context.get('max_length')} items"
    if kind == "finite_number":
        return "must be a finite number"
    if kind == "union_tag_invalid":
        return (
            f"has an unknown type '{context.get('tag')}' (expected {context.get('expected_tags')})"
        )
    if kind == "union_tag_not_found":
        return f"needs a '{context.get('discriminator', 'type').strip(chr(39))}' field"
    if kind == "value_error":
        return str(context.get("error", error["msg"]))
    return str(error["msg"])


def describe(error: ValidationError) -> tuple[str, str | None]:
    """The message and ``param`` of the first problem of `error`.

    Several errors for one field come from a union (``content`` may be a string or a list):
    they are said as one ("must be a string or a list").
    """
    errors = error.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"malformed JSON: {first['msg'].removeprefix('Invalid JSON: ')}", None
    param = param_of(first["loc"])
    if param is None and first["type"] in ("model_type", "dict_type"):
        return "the request body must be a JSON object", None
    # A union's branch that matched the value's shape errs deeper than the branches that did
    # not: that is the error the client needs.
    deeper = [e for e in errors if _inside(param_of(e["loc"]), param)]
    if deeper:
        first = max(deeper, key=lambda e: len(param_of(e["loc"]) or ""))
        param = param_of(first["loc"])
    same = [e for e in errors if param_of(e["loc"]) == param]
    expected = [_EXPECTED[e["type"]] for e in same if e["type"] in _EXPECTED]
    if len(same) > 1 and len(expected) == len(same):
        phrase = "must be " + " or ".join(dict.fromkeys(expected))
    else:
        phrase = _phrase(first)
    got = first.get("input")
    shows_value = first["type"] not in ("missing", "value_error") and _scalar(got)
    suffix = f" (got {_shown(got)})" if shows_value else ""
    if param is None:
        return phrase[0].upper() + phrase[1:] + suffix, None
    if first["type"] == "value_error" and not phrase.startswith(_PREDICATES):
        return f"'{param}': {phrase}", param
    return f"'{param}' {phrase}{suffix}", param


_PREDICATES = ("is ", "must ", "needs ", "has ", "cannot ", "may ", "takes ")
"""How a validator's message starts when it reads on from the field's name."""


def _inside(param: str | None, parent: str | None) -> bool:
    if param is None or param == parent:
        return False
    return parent is None or param.startswith((parent + ".", parent + "["))
