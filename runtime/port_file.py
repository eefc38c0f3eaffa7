"""Announcing the ports a process bound, so that nobody has to guess a free one.

A server binds port 0 (or the port it was told), then writes what it got as one JSON object,
``{"http": 41234}``, to the file named by ``--port-file``. The file appears whole (written
aside, then renamed), so a reader that sees it can parse it.
"""

import json
import os
from pathlib import Path


def write_port_file(path: str | os.PathLike[str], ports: dict[str, int]) -> None:
    """Write `ports` to `path` atomically."""
    target = Path(path)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(ports))
    partial.replace(target)


def read_port_file(path: str | os.PathLike[str]) -> dict[str, int] | None:
    """The ports announced in `path`, or None while it does not exist yet."""
    try:
        return {str(k): int(v) for k, v in json.loads(Path(path).read_text()).items()}
    except FileNotFoundError:
        return None
