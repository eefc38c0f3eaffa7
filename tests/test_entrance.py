"""The project's folders are reachable under one name only: ``triptych.<folder>``."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = (
    *("cli", "components", "engines", "models"),
    *("observability", "protocol", "runtime", "transfer"),
)


@pytest.mark.parametrize("folder", FOLDERS)
def test_a_folder_imported_by_its_bare_name_refuses(folder: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", f"import {folder}"],
        cwd=ROOT,  # the repository root is on sys.path, as under pytest or python -m
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert f"ImportError: import triptych.{folder}, not {folder}" in done.stderr


def test_every_folder_imports_under_the_package_name() -> None:
    names = ", ".join(f"triptych.{folder}" for folder in FOLDERS)
    done = subprocess.run(
        [sys.executable, "-c", f"import {names}"],
        cwd=ROOT,
        capture_output=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
