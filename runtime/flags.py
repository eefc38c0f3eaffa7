"""Command-line flags as users of serving systems expect them.

Every flag of every triptych command shows its help and default in ``--help``, falls back to
an environment variable named after it (``--model-path`` → ``TRIPTYCH_MODEL_PATH``), and may be
set in a YAML file given with ``--config`` (keys are flag names: ``model-path: Qwen/...``).
Precedence: the command line, then the environment, then the config file, then the default.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from triptych.runtime.env import flag_fallback, flag_variable

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
SECRETS = frozenset({"api_key"})
"""Flags that hold credentials: never shown in help, never put on a command line."""


def primary_flag(action: argparse.Action) -> str:
    """The name a flag is known by: its first long option (``--max-model-len``)."""
    longs = [s for s in action.option_strings if s.startswith("--")]
    return (longs or list(action.option_strings))[0]


def is_secret(action: argparse.Action) -> bool:
    """Whether the flag holds a credential (never shown in help, nor put on a command line)."""
    return action.dest in SECRETS


def is_switch(action: argparse.Action) -> bool:
    """Whether the flag takes no value (``--disable-cuda-graph``)."""
    return isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)


def settable(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The flags of `parser` that a user sets (all but --help, --config and hidden ones)."""
    return [
        action
        for action in parser._actions
        if action.option_strings
        and not isinstance(action, argparse._HelpAction)
        and action.dest != "config"
        and action.help != argparse.SUPPRESS
    ]


def add_model_arguments(parser: argparse.ArgumentParser, fetches: str) -> None:
    """``--model-path``, ``--revision``, ``--served-model-name``; `fetches` says which files
    of a hub checkpoint this process fetches."""
    parser.add_argument(
        "--model-path",
        default="",
        help="checkpoint: a local directory or a Hugging Face Hub ID (org/name); "
        f"{fetches} (empty: the tiny test model)",
    )
    parser.add_argument(
        "--revision", default=None, help="hub revision (branch, tag or commit) of a hub ID"
    )
    parser.add_argument(
        "--served-model-name",
        default="",
        help="the model name clients send (empty: the hub ID, or the directory's name)",
    )


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` and ``--log-format``."""
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        default="INFO",
        help="least severe log lines shown",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines as text, or as JSON objects (one per line)",
    )


class _HelpFormatter(argparse.HelpFormatter):
    """Help lines that end with the default and the environment variable."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36, width=100)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            return text
        if action.dest == "config":
            return f"{text} (env {flag_variable('--config')})"
        if is_switch(action):
            # A store_false switch (--no-...) is on when its destination's default is False.
            on = bool(action.default) != isinstance(action, argparse._StoreFalseAction)
            default = "on" if on else "off"
        elif is_secret(action):
            default = "set" if action.default else "none"
        elif action.default in (None, ""):
            default = "none"
        else:
            default = str(action.default).replace("%", "%%")
        return f"{text} (default: {default}; env {flag_variable(primary_flag(action))})"


class FlagParser(argparse.ArgumentParser):
    """An argument parser with help defaults, ``TRIPTYCH_<FLAG>`` fallbacks and ``--config``."""

    def __init__(self, prog: str | None = None, description: str | None = None) -> None:
        super().__init__(prog=prog, description=description, formatter_class=_HelpFormatter)
        self.add_argument(
            "--config",
            metavar="FILE.yaml",
            default=None,
            help="YAML file that sets any of these flags (keys are flag names, e.g. "
            "'model-path: Qwen/Qwen2.5-VL-7B-Instruct'); the command line and the environment "
            "win over it",
        )
        self.builtin_defaults: dict[str, Any] = {}
        """Each flag's default before the environment and the config file were applied."""

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: None = None
    ) -> argparse.Namespace:
        """Parse `args` (default: ``sys.argv[1:]``) over defaults taken from the environment
        and the ``--config`` file."""
        argv = list(sys.argv[1:] if args is None else args)
        self.apply_fallbacks(argv)
        return super().parse_args(argv)

    def apply_fallbacks(self, argv: Sequence[str]) -> None:
        """Replace each flag's default by its config-file value, then by its environment
        value."""
        actions = settable(self)
        self.builtin_defaults = {a.dest: a.default for a in actions}
        path = _config_path(argv)
        if path:
            by_name = {s.lstrip("-"): a for a in actions for s in a.option_strings}
            by_name.update({a.dest: a for a in actions})
            for key, value in _read_config(self, path).items():
                action = by_name.get(str(key).lstrip("-"))
                if action is None:
                    self.error(f"{path}: '{key}' is not a flag of {self.prog}")
                self._set(action, value, f"{key} in {path}")
        for action in actions:
            raw = flag_fallback(primary_flag(action))
            if raw is not None:
                self._set(action, raw, flag_variable(primary_flag(action)))

    def _set(self, action: argparse.Action, value: Any, source: str) -> None:
        converted = self._convert(action, value, source)
        self.set_defaults(**{action.dest: converted})

    def _convert(self, action: argparse.Action, value: Any, source: str) -> Any:
        if is_switch(action):
            text = str(value).strip().lower()
            if text not in _TRUE | _FALSE:
                self.error(f"{source}: expected true or false, got '{value}'")
            on = text in _TRUE
            return on if isinstance(action, argparse._StoreTrueAction) else not on
        if value is None:
            return None
        convert = action.type if callable(action.type) else str
        try:
            converted = convert(str(value))
        except (TypeError, ValueError):
            self.error(f"{source}: '{value}' is not a valid value for {primary_flag(action)}")
        if action.choices is not None and converted not in action.choices:
            choices = ", ".join(str(c) for c in action.choices)
            self.error(f"{source}: '{value}' is not one of {choices}")
        return converted

    def error(self, message: str) -> NoReturn:
        """One line and the usage, exit status 2 (argparse's convention)."""
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _config_path(argv: Sequence[str]) -> str | None:
    for index, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--config" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return flag_fallback("--config")


def _read_config(parser: FlagParser, path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        parser.error(f"cannot read --config {path}: {error.strerror or error}")
    except yaml.YAMLError as error:
        parser.error(f"--config {path} is not valid YAML: {error}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        parser.error(f"--config {path} must be a mapping of flag names to values")
    return data
