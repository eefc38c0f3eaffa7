"""Config fields that are also command-line flags: default, type and help declared once.

A process's settings are frozen dataclasses (`FrontendConfig`, `EngineConfig`, ...). A field
declared with `setting` carries its flag's help (and its names, when they are not the field's
own); `add_settings` turns those fields into flags of an argparse group, with the field's
default and a type read from its annotation. The command line is the contract between an
operator and every process, which is why it is declared at the bottom, beside the wire types:
every layer that owns a config declares its flags the same way.
"""

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def setting(default: T, help: str, *flags: str, **argument: Any) -> T:
    """A dataclass field with `default` that is also a flag, explained by `help`.

    `flags`: the flag's names (default ``--`` + the field's name with dashes); `argument`: any
    further `add_argument` keyword (``dest``, ``metavar``).
    """
    metadata = {"help": help, "flags": flags, "argument": argument}
    return dataclasses.field(default=default, metadata=metadata)


def add_settings(group: argparse._ActionsContainer, config: type, *names: str) -> None:
    """Add to `group` a flag for each field of `config` declared with `setting`, in the order
    of the fields (only those in `names`, when given)."""
    hints = typing.get_type_hints(config)
    for field in _settings(config):
        if names and field.name not in names:
            continue
        argument: dict[str, Any] = {"dest": _dest(field), "default": field.default}
        if (scalar := _scalar(hints[field.name])) is not None:
            argument["type"] = scalar
        argument.update(field.metadata["argument"])
        group.add_argument(*_flags(field), help=field.metadata["help"], **argument)


def settings_from(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """The values `args` holds for `config`'s settings, by field name (those `args` has)."""
    given = vars(args)
    return {f.name: given[_dest(f)] for f in _settings(config) if _dest(f) in given}


def _settings(config: type) -> list[dataclasses.Field[Any]]:
    return [field for field in dataclasses.fields(config) if "help" in field.metadata]


def _flags(field: dataclasses.Field[Any]) -> tuple[str, ...]:
    return field.metadata["flags"] or ("--" + field.name.replace("_", "-"),)


def _dest(field: dataclasses.Field[Any]) -> str:
    """Where argparse puts the flag's value: its ``dest``, else its first name's."""
    return str(field.metadata["argument"].get("dest") or _flags(field)[0][2:].replace("-", "_"))


def _scalar(hint: Any) -> type | None:
    """What a flag's text is read as: the annotation without ``| None`` (a str as it is)."""
    if isinstance(hint, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if hint not in (int, float, str):
        raise TypeError(f"a setting holds an int, a float or a str, not {hint}")
    return None if hint is str else typing.cast(type, hint)
